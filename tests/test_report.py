"""ream_report.json / ream_plan.json, the plots and the model card, from hand-built reports (no model run)."""

import copy
import json
import sys
import time

import numpy as np
import pytest

from ream_lite import report as rpt
from ream_lite.model_card import model_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMAND = "ream-lite compress Qwen/Qwen3-30B-A3B out --experts 96 --seed 0"


def layer_record(index: int, n: int, groups: dict[int, list[int]], rng: np.random.Generator, top_k: int = 2,
                 tokens: int = 4096, reap: np.ndarray | None = None) -> dict:
    """One layer's record as compress writes it: LayerPlan.to_json() + times, memory, frequency_after, tokens.
    `groups`: every kept expert -> its members (itself first); experts in no group are dropped."""
    kept = sorted(groups)
    freq = rng.multinomial(tokens * top_k, rng.dirichlet(np.full(n, 0.8)))
    reap = rng.lognormal(0.0, 0.7, n) * (1 + index) if reap is None else reap
    # after: a kept expert keeps its own and most of its members' traffic; the rest is spread over all kept
    own = np.array([freq[m].sum() * 0.9 + freq[c] * 0.1 for c, m in sorted(groups.items())])
    after = np.floor(own / own.sum() * tokens * top_k).astype(int)
    after[np.argmax(after)] += tokens * top_k - after.sum()
    return {
        "layer": index,
        "num_experts": n,
        "method": "ream" if any(len(m) > 1 for m in groups.values()) else "reap",
        "kept": kept,
        "groups": {str(c): {"members": m, "weights": [round(1 / len(m), 4)] * len(m)}
                   for c, m in sorted(groups.items()) if len(m) > 1},
        "align": "act+weight",
        "scores": {"reap": reap.tolist(), "frequency": freq.tolist(), "ean": (reap * freq).tolist()},
        "guard": {"mode": "group", "holdout_sequences": 3, "holdout_tokens": 1536, "chosen": "reap",
                  "candidates": [{"name": "reap", "method": "reap", "error": 0.1, "stderr": 0.0, "score": 0.1,
                                  "merged_groups": 0}]},
        "seconds": 1.5 + index,
        "peak_device_bytes": 2_000_000_000 + index,
        "peak_host_bytes": 3_000_000_000 + index,
        "frequency_after": after.tolist(),
        "tokens": tokens,
    }


def top_report(layers: list[dict], n: int, n_keep: int) -> dict:
    return {
        "ream_lite_version": "0.1.0", "torch_version": "2.13.0", "transformers_version": "5.0.0",
        "python_version": "3.11.7", "command": COMMAND, "model": "/models/Qwen3-30B-A3B", "method": "ream",
        "experts": {"before": n, "after": n_keep},
        "options": {"saliency": "reap", "group_size": None, "align": "act+weight"},
        "sequential": True, "seed": 0, "guard": "group",
        "calibration": {"sources": ["builtin", "data/code.jsonl"], "mix": {"code": 0.5, "prose": 0.5},
                        "sequences": 16, "seq_len": 512, "packing": "concat-eos",
                        "tokens_per_domain": {"prose": 4096, "code": 4096}, "holdout_sequences": 2},
        "layers": layers,
        "totals": {"seconds": 12.5, "peak_device_bytes": 2_000_000_002, "peak_host_bytes": 3_000_000_002,
                   "size_before_bytes": 61_064_245_248, "size_after_bytes": 45_917_093_888,
                   "bytes_read": 61_100_000_000, "bytes_written": 45_917_100_000},
    }


def small_report() -> dict:
    """3 MoE layers, 16 -> 10 experts: layer 1 merges (and drops two), layer 3 merges everything, layer 5 prunes."""
    rng = np.random.default_rng(0)
    g1 = {0: [0, 5, 9], 3: [3, 12], 1: [1], 2: [2], 4: [4], 6: [6], 7: [7], 8: [8], 10: [10], 11: [11]}  # 13, 14, 15 dropped
    g3 = {c: [c] for c in range(10)}
    g3[0], g3[2], g3[7] = [0, 10, 11], [2, 12, 13], [7, 14, 15]
    g5 = {c: [c] for c in (0, 1, 2, 3, 5, 8, 9, 11, 13, 15)}
    return top_report([layer_record(1, 16, g1, rng), layer_record(3, 16, g3, rng), layer_record(5, 16, g5, rng)],
                      16, 10)


def large_report(n_layers: int = 48, n: int = 128, n_keep: int = 96) -> dict:
    """REAP-like: the most salient experts kept; in every third layer the removed ones merged into the most salient
    (pseudo-pruning groups of 4), in the others dropped."""
    rng = np.random.default_rng(1)
    layers = []
    for i in range(n_layers):
        reap = rng.lognormal(0.0, 0.7, n) * (1 + i)
        order = np.lexsort((np.arange(n), -reap)).tolist()
        kept, removed = order[:n_keep], order[n_keep:]
        groups = {c: [c] for c in kept}
        if i % 3 == 1:
            for j, e in enumerate(removed):
                groups[kept[j // 3]].append(e)
        layers.append(layer_record(i, n, groups, rng, top_k=8, reap=reap))
    return top_report(layers, n, n_keep)


def no_matplotlib(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_write_report_json_files(tmp_path):
    report = small_report()
    rpt.write_report(tmp_path, report)
    full = json.loads((tmp_path / "ream_report.json").read_text())
    plan = json.loads((tmp_path / "ream_plan.json").read_text())
    assert full == json.loads(json.dumps(report))  # nothing lost
    assert (tmp_path / "ream_plan.json").read_text().endswith("}\n")
    for key in ("ream_lite_version", "torch_version", "transformers_version", "python_version"):
        assert key not in plan
    assert plan["totals"] == {"size_before_bytes": 61_064_245_248, "size_after_bytes": 45_917_093_888}
    for L in plan["layers"]:
        assert not {"seconds", "peak_device_bytes", "peak_host_bytes"} & set(L)
        assert len(L["frequency_after"]) == len(L["kept"]) and L["tokens"] == 4096
    assert [L["kept"] for L in plan["layers"]] == [L["kept"] for L in report["layers"]]
    assert plan["calibration"] == report["calibration"] and plan["command"] == COMMAND


def test_plan_identical_when_only_times_differ(tmp_path):
    a, b = small_report(), small_report()
    b["ream_lite_version"], b["torch_version"] = "0.2.0", "2.14.0"
    a["seconds"], b["seconds"] = 1.0, 2.0  # where an older pipeline put the run's time
    b["totals"].update(seconds=99.0, peak_device_bytes=None, peak_host_bytes=None, bytes_read=1, bytes_written=2)
    for L in b["layers"]:
        L.update(seconds=L["seconds"] * 7, peak_device_bytes=None, peak_host_bytes=123)
    b["calibration"] = dict(reversed(list(b["calibration"].items())))  # e.g. re-read by a resumed run
    b["layers"][0] = dict(reversed(list(b["layers"][0].items())))
    for name, report in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        rpt.write_json(tmp_path / name, report)
    assert (tmp_path / "a" / "ream_plan.json").read_bytes() == (tmp_path / "b" / "ream_plan.json").read_bytes()
    assert (tmp_path / "a" / "ream_report.json").read_bytes() != (tmp_path / "b" / "ream_report.json").read_bytes()


def test_key_order_is_stable_and_readable():
    text = rpt.dumps(small_report())
    top = list(json.loads(text))
    assert top[:2] == ["ream_lite_version", "torch_version"] and top[-1] == "layers"
    layer = json.loads(text)["layers"][0]
    assert list(layer)[:4] == ["layer", "num_experts", "method", "kept"]
    assert list(layer["groups"]) == ["0", "3"]
    rec = layer_record(0, 16, {c: [c] + ([c + 10] if c < 3 else []) for c in range(10)}, np.random.default_rng(0))
    rec["groups"] = {"2": rec["groups"]["2"], "10": {"members": [10], "weights": [1.0]}, "0": rec["groups"]["0"]}
    assert list(json.loads(rpt.dumps({"layers": [rec]}))["layers"][0]["groups"]) == ["0", "2", "10"]


def test_plan_json_does_not_modify_report():
    report = small_report()
    before = copy.deepcopy(report)
    rpt.plan_json(report)
    rpt.dumps(report)
    assert report == before


def check_pngs(out, max_bytes=None):
    for name in rpt.PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        if max_bytes:
            assert len(data) < max_bytes, (name, len(data))


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    notes = rpt.write_report(tmp_path, small_report())
    assert notes == []
    check_pngs(tmp_path)


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    no_matplotlib(monkeypatch)
    notes = rpt.write_report(tmp_path, small_report())
    assert len(notes) == 1 and "matplotlib is not installed" in notes[0] and "ream-lite[plots]" in notes[0]
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "ream_report.json").exists() and (tmp_path / "ream_plan.json").exists()


def test_plot_skipped_when_data_missing(tmp_path):
    pytest.importorskip("matplotlib")
    report = small_report()
    for L in report["layers"]:
        del L["frequency_after"]
    notes = rpt.write_plots(tmp_path, report)
    assert notes == ["frequency.png skipped: the layers have no frequency_after"]
    assert (tmp_path / "saliency.png").exists() and not (tmp_path / "frequency.png").exists()


def test_redraw_from_saved_report(tmp_path):
    pytest.importorskip("matplotlib")
    rpt.write_json(tmp_path, small_report())
    assert rpt.main([str(tmp_path / "ream_report.json"), "--out", str(tmp_path / "plots")]) == 0
    check_pngs(tmp_path / "plots")


def test_roles_and_rows():
    L = small_report()["layers"][0]
    roles, owner = rpt.layer_roles(L)
    assert roles[[0, 3]].tolist() == [2, 2] and roles[[5, 9, 12]].tolist() == [3, 3, 3]
    assert roles[[13, 14, 15]].tolist() == [0, 0, 0] and roles[1] == 1
    assert owner[9] == 0 and owner[12] == 3 and owner[14] == -1
    assert rpt.group_row(L).tolist() == [2, 3, 3, 2, 4] + [1] * 8 + [0] * 3
    before, after = rpt.frequency_shares(L)
    assert len(before) == len(after) == 10 and abs(after.sum() - 1) < 1e-9 and before.sum() < 1


def test_plots_at_scale(tmp_path):
    pytest.importorskip("matplotlib")
    report = large_report()
    t = time.perf_counter()
    assert rpt.write_plots(tmp_path, report) == []
    assert time.perf_counter() - t < 10
    check_pngs(tmp_path, max_bytes=1_000_000)


def test_model_card():
    card = model_card(small_report(), output_name="Qwen3-30B-A3B-REAM-10")
    assert "from **16 to 10 per MoE layer**" in card
    assert "56.87 GiB" in card and "42.76 GiB" in card  # the totals' sizes
    assert f"```bash\n{COMMAND}\n```" in card
    assert "builtin" in card and "data/code.jsonl" in card and "code: 50%" in card and "prose: 4,096 tokens" in card
    assert "seed 0" in card and "vLLM" in card and "llama.cpp" in card
    assert "12.5" not in card  # no times: the card is part of the byte-identical output
    b = small_report()
    b["totals"]["seconds"], b["layers"][0]["seconds"], b["torch_version"] = 1.0, 2.0, "9"
    assert model_card(b, output_name="Qwen3-30B-A3B-REAM-10") == card


def test_model_card_without_command_and_old_report():
    report = small_report()
    del report["command"], report["totals"]
    report["calibration"] = {"source": "builtin", "sequences": 16, "seq_len": 512,
                             "tokens_per_domain": {"prose": 8192}, "holdout_sequences": 2}
    card = model_card(report, 2 * 1024**3, 1024**3, "out")  # the positional call compress makes today
    assert "```bash" not in card and "2.00 GiB" in card and "1.00 GiB" in card and "builtin" in card


def test_report_says_where_the_time_went(model_dirs, calib_file, tmp_path):
    """`compress` records its wall time split by part (read, store, write, each pass's compute) and against the
    plan's floor: the parts are positive, never more than the wall time, and the passes the run made are there."""
    from click.testing import CliRunner

    from ream_lite.cli import main
    from ream_lite.pipeline import time_line

    _, src = model_dirs["qwen3_moe"]
    r = CliRunner().invoke(main, ["compress", str(src), str(tmp_path / "out"), "--experts", "6", "--calib",
                                  str(calib_file), "--seq-len", "32", "--num-sequences", "12"])
    assert r.exit_code == 0, r.output
    split = json.loads((tmp_path / "out" / "ream_report.json").read_text())["totals"]["time"]
    parts = split["parts_seconds"]
    assert {"read", "stats", "guard", "sequential", "attention", "write"} <= set(parts)
    assert all(v > 0 for v in parts.values())
    assert sum(parts.values()) <= split["wall_seconds"] * 1.001 and split["other_seconds"] >= 0
    assert split["floor_rates"] == "assumed" and split["wall_over_floor"] > 0
    assert time_line(split).startswith(f"time {split['wall_seconds']:.1f} s: ") and time_line(split) in r.output
