"""The merge guard: oracles where merging is right and where it is wrong, the recorded error against transformers'
own MoE block, and the bookkeeping (ladder, held-out split, choice = lowest recorded error)."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build_model, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.cli import main
from ream_lite.guard import group_size_ladder
from ream_lite.pipeline import CompressConfig, calibration

TEXT = ("the quick brown fox jumps over the lazy dog. 12 + 30 = 42. def f(x): return x * 2\n" * 60)
J, K = 2, 5  # the near-copies in the merge-right oracle


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": TEXT[i:], "domain": d}) for i, d in ((0, "a"), (11, "b"))) + "\n")
    return p


def run(src, out, calib, *args):
    r = CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "40",
                                  "--calib", str(calib), *args])
    assert r.exit_code == 0, r.output
    return json.loads((out / "ream_plan.json").read_text())


def near_copies_model(seed: int = 0):
    """Layer 0: experts J = E + D and K = a neuron permutation of E - D (D random, 30% of E's norm), with
    identical router rows that dominate (logits 30x larger) on the tokens they win; E small, so that J and K are the least salient
    and pruning must drop one of them. Their aligned average is E: merging is right here."""
    m = build_model("qwen3_moe", seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in m.model.layers[:1]:
            ex, router = layer.mlp.experts, layer.mlp.gate
            inter = ex.intermediate_dim
            gu, down = ex.gate_up_proj[0].clone(), 0.15 * ex.down_proj[0].clone()
            d_gu, d_down = torch.randn(gu.shape, generator=g), torch.randn(down.shape, generator=g)
            d_gu *= 0.3 * gu.norm() / d_gu.norm()
            d_down *= 0.3 * down.norm() / d_down.norm()
            ex.gate_up_proj[J], ex.down_proj[J] = gu + d_gu, down + d_down
            perm = torch.randperm(inter, generator=g)
            minus_gu, minus_down = gu - d_gu, down - d_down
            ex.gate_up_proj[K] = torch.cat([minus_gu[:inter][perm], minus_gu[inter:][perm]])
            ex.down_proj[K] = minus_down[:, perm]
            row = 30.0 * router.weight[J].clone()
            router.weight[J], router.weight[K] = row, row
    return m


def test_group_size_ladder():
    assert group_size_ladder(16, 12) == [2, 4, 5]
    assert group_size_ladder(16, 8) == [2, 4, 8, 9]
    assert group_size_ladder(128, 96) == [2, 4, 8, 16, 32, 33]
    assert group_size_ladder(8, 7) == [2]
    assert group_size_ladder(16, 8, n_group=4) == [2, 3]  # per routing group: 4 -> 2
    # (the held-out split itself: tests/test_calib.py)


def chosen_is_lowest(layer: dict) -> dict:
    """Among the unfitted plans, the lowest recorded score (error + 2 standard errors of its difference to REAP's
    error; REAP's score is its error) is chosen; then each refit (in order) replaces the incumbent it names when its
    score (error + 2 standard errors of its difference to the incumbent) is below the incumbent's error. Returns
    name -> error."""
    g = layer["guard"]
    for c in g["candidates"]:
        assert c["score"] == pytest.approx(c["error"] + 2 * c["stderr"])
    plain = [c for c in g["candidates"] if "versus" not in c]
    best = min(plain, key=lambda c: c["score"])
    for c in g["candidates"][len(plain):]:
        assert c["name"].endswith(" +refit") and c["versus"] == best["name"]
        if c["score"] < best["error"]:
            best = c
    assert g["chosen"] == best["name"]
    assert g["candidates"][0]["name"] == "reap" and g["candidates"][0]["stderr"] == 0
    return {c["name"]: c["error"] for c in g["candidates"]}


def test_merging_oracle_guard_merges_the_near_copies(tmp_path, calib):
    src = save_model(near_copies_model(), tmp_path / "src")
    plan = run(src, tmp_path / "out", calib, "--experts", "7")
    assert plan["guard"] == "group" and plan["calibration"]["holdout_sequences"] == 4
    for L in plan["layers"]:
        errors = chosen_is_lowest(L)
        assert errors[L["guard"]["chosen"]] <= errors["reap"]
    L = plan["layers"][0]
    errors = chosen_is_lowest(L)
    # pruning must drop one of the near-copies (they are the least salient: same plan as REAP's kept set) ...
    assert len(set(range(8)) - set(L["kept"])) == 1 and set(range(8)) - set(L["kept"]) <= {J, K}
    # ... the guard merges them instead, and its held-out error is clearly below REAP's
    merged = {int(c): g["members"] for c, g in L["groups"].items()}
    assert [sorted(m) for m in merged.values()] == [[J, K]], (L["guard"], merged)
    assert errors[L["guard"]["chosen"]] < 0.5 * errors["reap"], errors


@pytest.mark.parametrize("family,keep", [("qwen3_moe", 5), ("deepseek_v3", 8), ("qwen2_moe", 4), ("mixtral", 6)])
def test_independent_experts_guard_never_worse_than_pruning(model_dirs, tmp_path, calib, family, keep):
    """Random independent experts (every family's router: group-limited sigmoid, shared experts, ...): the chosen
    plan's held-out error is never above REAP's, and the written model loads."""
    _, src = model_dirs[family]
    n = ModelLayout(str(src)).router_config.num_experts
    plan = run(src, tmp_path / "out", calib, "--experts", str(keep))
    for L in plan["layers"]:
        errors = chosen_is_lowest(L)
        assert errors[L["guard"]["chosen"]] <= errors["reap"]
        assert len(L["guard"]["candidates"]) >= 3  # reap, REAM at one or more group sizes, ream-nearest
    card = (tmp_path / "out" / "README.md").read_text()
    assert "guarded REAM" in card and "--guard off" in card and f"| routed experts per MoE layer | {n} | {keep} |" in card
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.isfinite(m(torch.randint(0, 64, (1, 7))).logits).all()


@pytest.mark.parametrize("family,mode", [("qwen3_moe", "layer"), ("qwen3_moe", "group"), ("granitemoe", "group")])
def test_recorded_error_equals_transformers_block_on_held_out_tokens(model_dirs, tmp_path, calib, family, mode):
    """Oracle for e: non-sequential, so layer 0's held-out MoE inputs are the original model's; transformers'
    MoE block of the original and of the written model on them give y and y_hat (Granite: its block output is
    scaled by residual_multiplier, which the greedy undo's changes must carry too)."""
    model, src = model_dirs[family]
    out = tmp_path / "out"
    plan = run(src, out, calib, "--experts", "5", "--no-sequential", "--guard", mode)
    cfg = CompressConfig(model=str(src), output=str(out), experts=5, calib=str(calib), num_sequences=40, seq_len=32,
                         guard=mode)
    cal = calibration(ModelLayout(str(src)), cfg)
    seqs, n_hold = cal.sequences, cal.n_holdout
    ids = torch.stack(seqs[-n_hold:])
    captured = {}
    attr = ModelLayout(str(src)).spec.moe_attr
    block = getattr(model.model.layers[0], attr)
    handle = block.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        y = block(captured["x"])
        y_hat = getattr(small.model.layers[0], attr)(captured["x"])
    direct = float(((y - y_hat) ** 2).sum() / (y**2).sum())
    L0 = plan["layers"][0]
    errors = chosen_is_lowest(L0)
    assert errors[L0["guard"]["chosen"]] == pytest.approx(direct, rel=1e-4, abs=1e-7)


def test_guard_off_is_the_paper_and_uses_every_sequence(model_dirs, tmp_path, calib):
    _, src = model_dirs["qwen3_moe"]
    plan = run(src, tmp_path / "out", calib, "--experts", "5", "--guard", "off")
    assert plan["guard"] == "off" and plan["calibration"]["holdout_sequences"] == 0
    assert all("guard" not in L and L["method"] == "ream" and L["groups"] for L in plan["layers"])
