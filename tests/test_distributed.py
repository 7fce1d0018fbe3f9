"""`compress` under torchrun (torch.distributed, gloo on CPU, ranks on 127.0.0.1 started by the tests).

The statistics pass of each MoE layer is split over the ranks by expert chunks; every other number is computed as
in one process, so outputs and plans must be byte-identical for 1, 2 and 3 ranks (one thread per process, as
torchrun sets it: float reductions split over threads round otherwise).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build_model, save_model

from ream_lite.cli import main
from ream_lite.distributed import World

BASE = ("--seq-len", "32", "--num-sequences", "12", "--device", "cpu")


def one_process(src, out, *args):
    """The one-process run, in this process, on one thread (as each torchrun rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, ["compress", str(src), str(out), *BASE, *map(str, args)])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return out


def torchrun(n: int, src, out, *args, timeout: float = 300, wait: bool = True, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "ream_lite", "compress", str(src), str(out), *BASE, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def plan_without_command(out: Path) -> dict:
    plan = json.loads((out / "ream_plan.json").read_text())
    plan.pop("command", None)  # (it names the output directory)
    return plan


def assert_same_output(a: Path, b: Path) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert plan_without_command(a) == plan_without_command(b)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def statistics_tokens(out: Path) -> int:
    """Calibration tokens the statistics passes saw, over all MoE layers."""
    return sum(x["tokens"] for x in json.loads((out / "ream_report.json").read_text())["layers"])


def ranks_of(out: Path) -> list[dict]:
    return json.loads((out / "ream_report.json").read_text())["totals"]["distributed"]["ranks"]


def test_shares_are_contiguous_balanced_and_cover_everything():
    for size in (1, 2, 3, 5):
        for n in (0, 1, 2, 7, 8):
            shares = [World(r, size).share(n) for r in range(size)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert all(len(a) >= len(b) for a, b in zip(shares, shares[1:]))  # (the last ranks may get none)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_model(build_model("qwen3_moe"), tmp_path_factory.mktemp("qwen"))


def test_tensors_travel_as_bytes_beside_the_rest():
    """What `World.broadcast` and `World.gather` send: the object without its tensors (pickled), then each tensor's
    raw bytes, any dtype, rebuilt bit for bit."""
    from ream_lite.distributed import as_bytes, pack, unpack

    g = torch.Generator().manual_seed(0)
    obj = {"merged": {3: (torch.randn(4, 5, generator=g).bfloat16(), torch.randn(2, 3, generator=g)[:, 1])},
           "perms": {(1, 2): torch.randperm(7, generator=g)}, "n": 5, "empty": torch.zeros(0, 8),
           "scalar": torch.tensor(2.5, dtype=torch.float64), "fp8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
           "plain": [1, (2, "three")]}
    tensors: list[torch.Tensor] = []
    skeleton, metas = pack(obj, tensors)
    assert len(tensors) == len(metas) == 6 and not any(isinstance(v, torch.Tensor) for v in skeleton.values())
    wire = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]  # (what the receiver allocates)
    for src, dst in zip(tensors, wire, strict=True):
        as_bytes(dst).copy_(as_bytes(src))
    back = unpack(skeleton, wire)
    assert back["n"] == 5 and back["plain"] == [1, (2, "three")]
    for a, b in [(obj["merged"][3][0], back["merged"][3][0]), (obj["merged"][3][1], back["merged"][3][1]),
                 (obj["perms"][(1, 2)], back["perms"][(1, 2)]), (obj["empty"], back["empty"]),
                 (obj["scalar"], back["scalar"]), (obj["fp8"], back["fp8"])]:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a.contiguous()), as_bytes(b))


@pytest.mark.parametrize("n,method", [(2, ["--method", "reap"]), (3, ["--method", "ream", "--guard", "off", "--group-size", "2"]),
                                      (2, []), (3, [])])
def test_world_sizes_give_the_same_bytes(qwen, calib_file, tmp_path, n, method):
    """REAP, paper REAM (--guard off, three merged groups of two per layer: one per rank to align and merge) and
    the default (guarded REAM with refit): three chunks of 3, 3 and 2 experts split over the ranks; every rank
    reads only its chunks in the statistics passes, each expert once."""
    args = ("--experts", "5", "--calib", calib_file, "--experts-per-chunk", "3", "--expert-cache", "off",
            "--batch-tokens", "64", *method)
    ref = one_process(qwen, tmp_path / "one", *args)
    out = torchrun(n, qwen, tmp_path / "many", *args)
    assert_same_output(ref, out)
    ranks = ranks_of(out)
    assert [r["rank"] for r in ranks] == list(range(n))
    stats_reads = [r["stats_pass_bytes_read"] for r in ranks]
    assert all(b > 0 for b in stats_reads)
    # 3 MoE layers of 8 experts, 3 float32 [16, 32]-ish matrices each: every expert byte read by exactly one rank
    from ream_lite.arch import ModelLayout

    layout = ModelLayout(str(qwen))
    expert_bytes = sum(layout.reader.entry(k).nbytes for x in layout.moe_layers for k in layout.expert_keys(x.index))
    layout.close()
    assert sum(stats_reads) == expert_bytes
    per_expert = expert_bytes // (3 * 8)
    shares = [World(r, n).share(3) for r in range(n)]
    assert stats_reads == [3 * per_expert * sum((3, 3, 2)[c] for c in s) for s in shares]
    # `plan --nproc` says so before the run
    plan_args = [str(a) for a in args if str(a) not in ("--group-size", "2")]  # (plan has no --group-size)
    r = CliRunner().invoke(main, ["plan", str(qwen), *BASE, *plan_args, "--nproc", str(n), "--no-measure", "--json"])
    assert r.exit_code == 0, r.output
    planned = json.loads(r.output)["ranks"]
    assert [x["stats_pass_bytes_read"] for x in planned] == stats_reads
    # rank 0 reads the others' experts again where a sum over every expert is needed (the default's refit target)
    again = ranks[0]["sums_bytes_read"]
    assert again == planned[0]["sums_bytes_read"] and again in (0, expert_bytes - stats_reads[0])
    ranks = [dict(r, tokens=dict(r["tokens"])) for r in ranks]
    assert (again > 0) == ("--guard" not in method)  # (REAP and the default refit; paper REAM does not)
    if "reap" not in method:  # paper REAM, and each of the guard's merging candidates: every rank solved its
        assert all(r["alignments_solved"] > 0 for r in ranks)  # share of the neuron alignments (by pair) and merged
        assert all(r["merged_groups"] > 0 for r in ranks)  # the groups of its centroids (those it aligned)
    # attention (and the dense layer) and the sequential pass: the 6 batches of 2 sequences split over the ranks
    for r, batches in zip(ranks, [len(World(r, n).share(6)) for r in range(n)], strict=True):
        assert r["tokens"].pop("attention") == r["tokens"].pop("sequential") == 3 * 64 * batches  # (3 layers)
    # the sums over every expert (the refit's target), continued by each rank for its share of the statistics
    # batches with the chunks rank 0 did not run: every statistics token once, each rank reading those chunks
    if again:
        assert sum(r["tokens"].pop("sums") for r in ranks) == statistics_tokens(out)
        assert [r["sums_bytes_read"] for r in ranks] == [again] * n == [x["sums_bytes_read"] for x in planned]
    assert all(not r["tokens"] for r in ranks)


def test_a_rank_without_chunks_and_a_grouped_sigmoid_router(model_dirs, calib_file, tmp_path):
    """DeepSeek-V3's group-limited sigmoid router and shared experts, two chunks over three ranks: the last rank
    owns none (rank 0 holds the layer's experts in its cache, read once for all its passes, so its statistics pass
    reads nothing). Non-sequential: the original MoE output is added in the one-process chunk order, the shared
    expert once."""
    _, src = model_dirs["deepseek_v3"]
    args = ("--experts", "8", "--calib", calib_file, "--experts-per-chunk", "8", "--no-sequential",
            "--batch-tokens", "96")
    ref = one_process(src, tmp_path / "one", *args)
    out = torchrun(3, src, tmp_path / "many", *args)
    assert_same_output(ref, out)
    ranks = ranks_of(out)
    assert [r["stats_pass_bytes_read"] > 0 for r in ranks] == [False, True, False]
    # (attention and the dense first layer, 3 layers: 4 batches of 3 sequences over 3 ranks; no sequential pass;
    # the original MoE output of the 2 MoE layers' statistics tokens continued by each rank over its batches)
    assert [r["tokens"]["attention"] for r in ranks] == [batches * 96 * 3 for batches in (2, 1, 1)]
    sums = [r["tokens"]["sums"] for r in ranks]
    assert all(t > 0 for t in sums) and sum(sums) == statistics_tokens(out)


def test_residual_streams_and_hash_routed_layers(tmp_path, calib_file):
    """DeepSeek-V4: rows of several residual streams (the MoE block's input and its stream weights travel with
    them) and hash-routed layers (the token ids travel too), default REAM, batches split over two ranks."""
    from test_deepseek_v4 import build_v4

    src = save_model(build_v4(), tmp_path / "v4")
    args = ("--experts", "5", "--calib", calib_file, "--experts-per-chunk", "3", "--batch-tokens", "64")
    assert_same_output(one_process(src, tmp_path / "one", *args), torchrun(2, src, tmp_path / "many", *args))


def test_fused_experts(tmp_path, calib_file):
    src = save_model(build_model("qwen3_moe"), tmp_path / "fused", layout="fused")
    args = ("--experts", "5", "--calib", calib_file, "--experts-per-chunk", "2", "--method", "reap")
    assert_same_output(one_process(src, tmp_path / "one", *args), torchrun(2, src, tmp_path / "many", *args))


def _rank_pids(run_id_parent: int) -> dict[int, int]:
    """rank -> pid of the worker processes under torchrun's process `run_id_parent` (read from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(x.split("=", 1) for x in (d / "environ").read_text().split("\0") if "=" in x)
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if "RANK" in env and ppid == run_id_parent:
            out[int(env["RANK"])] = int(d.name)
    return out


def test_a_killed_rank_stops_the_run_and_resume_finishes_it(qwen, calib_file, tmp_path):
    """SIGKILL rank 1 after the first layer is recorded: every rank exits (torchrun stops them) within a bound,
    and the same command with --resume under torchrun, with another number of processes (3), writes what an
    uninterrupted run writes."""
    args = ("--experts", "5", "--calib", calib_file, "--experts-per-chunk", "3", "--snapshot-every", "layer")
    out = tmp_path / "out"
    ref = one_process(qwen, out, *args)
    ref = ref.rename(tmp_path / "uninterrupted")
    proc = torchrun(2, qwen, out, *args, wait=False, env={"REAM_LITE_TEST_LAYER_DELAY": "1.5"})
    manifest = out.with_name("out.partial") / "resume" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manifest.exists(), "no layer was recorded"
    pids = _rank_pids(proc.pid)
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert time.monotonic() - t0 < 60 and proc.returncode != 0
    assert not out.exists() and out.with_name("out.partial").exists()
    torchrun(3, qwen, out, *args, "--resume")
    assert_same_output(ref, out)
