"""The least-squares refit of kept experts (ream_lite.refit): oracles where the answer is known, the streamed
solution against a dense joint solve, and its place in compress / the guard / apply."""

import json
from pathlib import Path

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_streamer import assert_loads_and_streams_as_transformers_runs_it
from tiny_models import build_model, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.cli import main
from ream_lite.engine.streamer import LayerStreamer, StreamOptions
from ream_lite.methods.plan import pruning_plan
from ream_lite.methods.refit import ridge_solve
from ream_lite.passes import collect_stats, compressed_loader
from ream_lite.pipeline import CompressConfig, compress
from ream_lite.refit import Refitter, RefitOptions, RoutedTarget

KEPT = [0, 2, 5, 7]  # of the tiny Qwen3-MoE's 8 experts (top-2)


def test_ridge_solve_is_the_augmented_least_squares_solution():
    """argmin ||T - W F||^2 + lam ||W - W0||^2 == least squares on [F, sqrt(lam) I] against [T, sqrt(lam) W0]."""
    g = torch.Generator().manual_seed(0)
    f, t, w0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((50, 6), (50, 4), (4, 6)))
    gram, cross = f.T @ f, t.T @ f
    ridge = 0.3
    lam = ridge * float(gram.diagonal().mean())
    a = torch.cat([f, lam**0.5 * torch.eye(6, dtype=torch.float64)])
    b = torch.cat([t, lam**0.5 * w0.T])
    oracle = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(ridge_solve(gram, cross, w0, ridge), oracle, rtol=1e-5, atol=1e-6)  # (float32 solves)
    # no tokens: the expert stays as it is
    assert torch.equal(ridge_solve(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64),
                                   w0, ridge), w0)


def layer0(model_dir, seed=0, sequences=6, length=24):
    """The streamer of a checkpoint, its layer-0 MoE block and that block's inputs on random token sequences."""
    layout = ModelLayout(str(model_dir))
    s = LayerStreamer(layout, StreamOptions(progress=False, tokens_per_batch=64))
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 60, (length,), generator=g) for _ in range(sequences)]
    h = s.embed(seqs)
    out = s.new_store(h.lengths)
    block = s.attention_phase(0, h, out)
    return layout, s, block, h


def fit(s, block, h, plan, sweeps=2, ridge=1e-2, feature_room=None):
    r = Refitter(s, block, h, RefitOptions("on", sweeps, ridge))
    r.holds_target = False  # y from a pass of the original block (the statistics pass is not run here)
    if feature_room is not None:
        r.feature_room = feature_room
    try:
        return r.fit(plan, {}, compressed_loader(s, plan, {}))
    finally:
        r.close()


@pytest.fixture(scope="module")
def qwen(model_dirs):
    return model_dirs["qwen3_moe"][1]


def test_nothing_removed_changes_nothing(qwen):
    layout, s, block, h = layer0(qwen)
    n = block.router_cfg.num_experts
    fitted, rec = fit(s, block, h, pruning_plan(0, n, "reap", list(range(n)), {}))
    assert rec["calib_error_before"] < 1e-10 and rec["calib_error_after"] < 1e-10
    for e in range(n):
        orig = s.experts(0, [e], torch.float32)
        for a, b in zip(fitted[e], orig.expert(0)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    layout.close()


def reachable_model(tmp_path):
    """Layer 0 with a zero router (every token routed to the same two experts, weight 1/2 each) and every expert
    sharing expert 0's gate and up projections: whatever two experts are kept, their down projections can carry
    the removed pair's output exactly."""
    m = build_model("qwen3_moe", 3)
    with torch.no_grad():
        mlp = m.model.layers[0].mlp
        mlp.gate.weight.zero_()
        for e in range(1, mlp.experts.gate_up_proj.shape[0]):
            mlp.experts.gate_up_proj[e] = mlp.experts.gate_up_proj[0]
    return save_model(m, tmp_path / "reachable")


def test_refit_recovers_a_reachable_output(tmp_path):
    layout, s, block, h = layer0(reachable_model(tmp_path))
    plan = pruning_plan(0, 8, "reap", [0, 3], {})  # not the two experts the zero router picks (torch.topk: 6, 5)
    fitted, rec = fit(s, block, h, plan, sweeps=3, ridge=1e-9)
    assert rec["calib_error_before"] > 0.1
    assert rec["calib_error_after"] < 1e-8
    layout.close()


def dense_joint_solution(s, block, h, kept, ridge):
    """Independent oracle: the features of every kept expert on every token (router of the kept rows, softmax,
    top-k, renormalised; SwiGLU), the original block's routed output, and one joint ridge solve in float64."""
    x = h.buf.double()
    rc = block.router_cfg
    w = s.experts(0, list(range(rc.num_experts)), torch.float32)

    def routing(rows):
        probs = torch.softmax(x @ block.router_weight[rows].double().T, -1)
        top_w, top_i = torch.topk(probs, rc.top_k, -1)
        return top_i, top_w / top_w.sum(-1, keepdim=True)

    def act(e):
        return F.silu(x @ w.gate[e].double().T) * (x @ w.up[e].double().T)

    idx, wt = routing(list(range(rc.num_experts)))
    y = torch.zeros_like(x)
    for slot in range(rc.top_k):
        for e in range(rc.num_experts):
            sel = idx[:, slot] == e
            y[sel] += wt[sel, slot, None] * (act(e)[sel] @ w.down[e].double().T)
    idx, wt = routing(kept)
    feats, lams, w0 = [], [], []
    for p, e in enumerate(kept):
        g = ((idx == p) * wt).sum(-1)  # the weight of expert p on each token (0 where not chosen)
        z = g[:, None] * act(e)
        feats.append(z)
        lams.append(ridge * float((z * z).sum(0).mean()))
        w0.append(w.down[e].double())
    z = torch.cat(feats, 1)
    inter = feats[0].shape[1]
    lam = torch.cat([torch.full((inter,), v, dtype=torch.float64) for v in lams])
    rhs = z.T @ y + lam[:, None] * torch.cat(w0, 1).T
    sol = torch.linalg.solve(z.T @ z + torch.diag(lam), rhs).T
    return [sol[:, p * inter : (p + 1) * inter] for p in range(len(kept))]


def test_streamed_refit_converges_to_the_dense_joint_solve(qwen):
    layout, s, block, h = layer0(qwen, sequences=8)
    ridge = 0.05
    oracle = dense_joint_solution(s, block, h, KEPT, ridge)
    fitted, rec = fit(s, block, h, pruning_plan(0, 8, "reap", KEPT, {}), sweeps=150, ridge=ridge)
    assert rec["calib_error_after"] < rec["calib_error_before"]
    for p, e in enumerate(KEPT):
        torch.testing.assert_close(fitted[e][2].double(), oracle[p], rtol=2e-4, atol=2e-5)
    # two sweeps already take most of the way
    two, rec2 = fit(s, block, h, pruning_plan(0, 8, "reap", KEPT, {}), sweeps=2, ridge=ridge)
    assert rec2["calib_error_after"] < rec["calib_error_before"]
    layout.close()


def test_kept_features_change_no_bit(qwen):
    """An expert's features kept between its normal equations and its residual update (all of them, the first
    blocks', none) give the same fit to the bit: they are the numbers computed again otherwise."""
    layout, s, block, h = layer0(qwen, sequences=8)
    s.opts = replace(s.opts, tokens_per_batch=16)  # (several blocks of routed rows per expert)
    plan = pruning_plan(0, 8, "reap", KEPT, {})
    runs = [fit(s, block, h, plan, sweeps=3, feature_room=room) for room in (0, 2 * 16 * 16 * 4, 2**30)]  # (2: blocks of 16 rows x 16)
    for fitted, record in runs[1:]:
        assert record == runs[0][1]
        for e in KEPT:
            assert all(torch.equal(a, b) for a, b in zip(fitted[e], runs[0][0][e], strict=True))
    assert runs[0][1]["calib_error_after"] < runs[0][1]["calib_error_before"]
    layout.close()


def test_statistics_pass_target_is_the_routed_output(qwen):
    """The refit's target added up by the statistics pass equals a pass of the routed-only block."""
    from ream_lite.methods import METHODS, MethodOptions

    layout, s, block, h = layer0(qwen)
    r = Refitter(s, block, h, RefitOptions("on"))
    collect_stats(s, block, h, METHODS["reap"], MethodOptions(), also=r.observer())
    expect = s.new_store(h.lengths, torch.float32)
    expect.buf.zero_()
    s.run_moe(r.block, h, expect)
    assert isinstance(r.observer(), RoutedTarget)
    torch.testing.assert_close(r.store.buf, expect.buf)
    r.close()
    layout.close()


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_compress_refit_is_judged_recorded_and_applied_byte_for_byte(model_dirs, qwen, calib_file, tmp_path, method):
    out = tmp_path / "out"
    run("compress", qwen, out, "--experts", 4, "--method", method, "--calib", calib_file, "--num-sequences", 20,
        "--seq-len", 32)
    plan = json.loads((out / "ream_plan.json").read_text())
    for layer in plan["layers"]:
        rec = layer["refit"]
        assert rec["calib_error_after"] <= rec["calib_error_before"]
        names = [c["name"] for c in layer["guard"]["candidates"]]
        assert any(n.endswith("+refit") for n in names)
        chosen = layer["guard"]["chosen"]
        assert rec["used"] == chosen.endswith("+refit")
    # what was fitted is what transformers runs: the output loads, and ream-lite streams it as transformers' forward
    assert_loads_and_streams_as_transformers_runs_it(out, model_dirs["qwen3_moe"][0], AutoModelForCausalLM)
    # the refit layers' experts are copied from OUT by apply, checked against the plan's digest
    run("apply", out, qwen, tmp_path / "again")
    for f in sorted(out.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()
    # deterministic: a second run writes the same bytes
    run("compress", qwen, tmp_path / "twice", "--experts", 4, "--method", method, "--calib", calib_file,
        "--num-sequences", 20, "--seq-len", 32)
    for f in sorted(out.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "twice" / f.name).read_bytes()


def test_refit_off_and_guard_off_are_unfitted(qwen, calib_file, tmp_path):
    for flags in (["--refit", "off"], ["--guard", "off"]):
        out = tmp_path / flags[0].strip("-")
        run("compress", qwen, out, "--experts", 4, "--method", "reap", "--calib", calib_file, "--num-sequences", 12,
            "--seq-len", 32, *flags)
        plan = json.loads((out / "ream_plan.json").read_text())
        assert all("refit" not in layer for layer in plan["layers"])


def test_refit_on_without_guard_fits_every_layer(qwen, calib_file, tmp_path):
    out = tmp_path / "on"
    run("compress", qwen, out, "--experts", 4, "--method", "reap", "--calib", calib_file, "--num-sequences", 12,
        "--seq-len", 32, "--guard", "off", "--refit", "on")
    plan = json.loads((out / "ream_plan.json").read_text())
    assert all(layer["refit"]["used"] and "guard" not in layer for layer in plan["layers"])
    # a bare ream_plan.json cannot bring the fitted experts: apply says where they are
    bare = tmp_path / "plan.json"
    bare.write_text((out / "ream_plan.json").read_text())
    r = CliRunner().invoke(main, ["apply", str(bare), str(qwen), str(tmp_path / "x")])
    assert r.exit_code != 0 and "compressed output" in r.output


def test_alignment_grams_parked_chunk_by_chunk_are_the_same_numbers(qwen):
    """On a GPU an alignment pass parks each chunk's Grams in host memory once the chunk is done
    (`passes.gram_park`): each is moved once, after its last batch, and holds the same numbers as when it stays;
    a pair in two chunks is summed on after the first parked it. (Here on the CPU, with a park that records.)"""
    from ream_lite.methods.stats import AlignmentCollector

    layout, s, block, h = layer0(qwen, sequences=8)
    s.opts = replace(s.opts, tokens_per_batch=48)  # (several batches per chunk)
    pairs = [(0, 1), (0, 2), (3, 4), (5, 6)]
    chunks = [[0, 1, 2], [3, 4, 5, 6], [5, 6]]  # ((5, 6) in two chunks: summed in both)
    parked: list[tuple[int, int]] = []

    def park(t):
        parked.append(next(p for p, g in acts.cross.items() if g is t))
        return t.clone()

    plain = AlignmentCollector(pairs, block.act)
    acts = AlignmentCollector(pairs, block.act, park=park)
    for collector in (plain, acts):
        s.run_moe(block, h, None, observer=collector, chunks=chunks)
    assert parked == [(0, 1), (0, 2), (3, 4), (5, 6)]  # (chunks 1 and 2 done; the last one waits for finish)
    acts.finish()
    assert parked[4:] == [(5, 6)]
    for p in pairs:
        assert torch.equal(acts.gram(*p), plain.gram(*p))
    layout.close()


def test_alignment_grams_spilled_to_the_work_dir_are_the_same_numbers(qwen, tmp_path):
    """Where the plan puts parked Grams in the work dir (`MemoryPlan.gram_tier`, Kimi-K2's ~50 GiB a layer), each
    goes to a mapped file of its own, unlinked at once (nothing left behind), with the same numbers; its mapping
    goes when the Gram does."""
    from ream_lite.engine.store import spill
    from ream_lite.methods.stats import AlignmentCollector

    layout, s, block, h = layer0(qwen, sequences=8)
    pairs = [(0, 1), (0, 2), (3, 4), (5, 6)]
    chunks = [[0, 1, 2], [3, 4, 5, 6], [5, 6]]
    work = tmp_path / "work"
    plain = AlignmentCollector(pairs, block.act)
    acts = AlignmentCollector(pairs, block.act, park=lambda t: spill(t, work, "alignment Grams"))
    s.run_moe(block, h, None, observer=plain, chunks=chunks)
    s.run_moe(block, h, None, observer=acts, chunks=chunks)
    acts.finish()

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum(str(work) in line for line in f)

    assert list(work.iterdir()) == [] and mapped() == len(pairs)
    for p in pairs:
        assert torch.equal(acts.gram(*p), plain.gram(*p))
    del acts
    assert mapped() == 0
    layout.close()


@pytest.mark.parametrize("guard", ["group", "off"])
def test_merged_experts_kept_in_work_dir_files_write_the_same_bytes(model_dirs, tmp_path, monkeypatch, guard):
    """Where the plan keeps merged experts in the work dir (`MemoryPlan.merged_tier`: a GPU run whose host budget
    has no room for the guard's candidate sets, Kimi-K2's ~24 GiB a layer), every merge is held in a mapped file,
    and the guard's judging, the refit, the sequential pass and the writer use them as they do host tensors: the
    output is byte for byte the same. (Forced here on the CPU.)"""
    from ream_lite import passes
    from ream_lite.engine.store import spill

    src = model_dirs["qwen3_moe"][1]

    def run(name: str) -> Path:
        return compress(CompressConfig(model=str(src), output=str(tmp_path / name), experts=5, num_sequences=8,
                                       seq_len=32, guard=guard, stream=StreamOptions(device="cpu", progress=False)))

    plain = run("host")
    held: list[int] = []

    def to_files(streamer):
        def hold(parts):
            held.append(len(parts))
            return tuple(spill(t, tmp_path / "work", "merged experts") for t in parts)
        return hold

    monkeypatch.setattr(passes, "merged_hold", to_files)
    spilled = run("files")
    assert held  # (merges were held in files)
    assert (plain / "model.safetensors").read_bytes() == (spilled / "model.safetensors").read_bytes()
    assert list((tmp_path / "work").iterdir()) == []
