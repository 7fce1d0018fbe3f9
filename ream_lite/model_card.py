"""OUT/README.md: what the compressed model is, how it was made, how to load it and how to make it again.

Built from the report dict alone (see ream_lite.report) and deterministic: no times, memory or library versions
other than ream-lite's, so a resumed run writes the same card as an uninterrupted one.
"""

from __future__ import annotations

import re
from collections import Counter

GiB = 1024**3
MiB = 1024**2
PAPERS = {"ream": "REAM, arXiv 2604.04356", "reap": "REAP, arXiv 2510.13999"}


def _choices(layers: list[dict]) -> str:
    """One line on what the guard chose, e.g. '3 layers pruned (REAP), 1 merged (ream-C4 (auto))'."""
    chosen = Counter(L["guard"]["chosen"].removesuffix(" +refit") for L in layers if "guard" in L)
    if not chosen:
        return ""
    pruned = chosen.pop("reap", 0)
    parts = [f"{pruned} layer(s) pruned (REAP)"] if pruned else []
    parts += [f"{n} layer(s) merged by {name}" for name, n in sorted(chosen.items())]
    return ", ".join(parts)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n:,} bytes"


def _percent(share: float) -> str:
    p = 100 * share
    return f"{p:.0f}%" if abs(p - round(p)) < 1e-6 else f"{p:.1f}%"


def hub_id(model: str) -> str | None:
    """The Hugging Face id of the base model when its path says it (a hub cache snapshot, or an id itself)."""
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", model)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith("."):
        return model
    return None


def _sizes(report: dict, size_before: int | None, size_after: int | None) -> tuple[int | None, int | None]:
    totals = report.get("totals", {})
    before = size_before if size_before is not None else totals.get("size_before_bytes")
    after = size_after if size_after is not None else totals.get("size_after_bytes")
    return before, after


def summary_table(report: dict, size_before: int | None, size_after: int | None) -> list[str]:
    e = report["experts"]
    n_layers = len(report.get("layers", []))
    rows = ["| | before | after |", "|---|---|---|",
            f"| routed experts per MoE layer | {e['before']} | {e['after']} |"]
    if n_layers:
        rows.append(f"| routed experts in all {n_layers} MoE layers | {e['before'] * n_layers:,} | "
                    f"{e['after'] * n_layers:,} |")
    change = f" ({(size_after - size_before) / size_before:+.1%})" if size_before and size_after is not None else ""
    rows.append(f"| tensor data | {_bytes(size_before)} | {_bytes(size_after)}{change} |")
    return rows


def calibration_lines(report: dict) -> list[str]:
    cal = report["calibration"]
    sources = cal.get("sources") or ([cal["source"]] if "source" in cal else [])
    lines = [f"- calibration text: {', '.join(f'`{s}`' for s in sources) or '?'}; {cal['sequences']} sequences of "
             f"{cal['seq_len']} tokens" + (f", packed `{cal['packing']}`" if cal.get("packing") else "")]
    mix = cal.get("mix") or {}
    total = sum(mix.values())
    if mix and total > 0:
        lines.append("- domain mix: " + ", ".join(f"{d}: {_percent(r / total)}" for d, r in sorted(mix.items())))
    per = cal.get("tokens_per_domain") or {}
    if per:
        lines.append("- tokens per domain: " + ", ".join(f"{d}: {t:,} tokens" for d, t in sorted(per.items())))
    if cal.get("holdout_sequences"):
        lines.append(f"- {cal['holdout_sequences']} of the sequences held out from the statistics, for the guard")
    return lines


def method_lines(report: dict) -> list[str]:
    method, guard = report["method"], report.get("guard", "off")
    paper = f" ({PAPERS[method]})" if method in PAPERS else ""
    lines = [f"- method: `{method}`{paper}"]
    opts = report.get("options") or {}
    if opts:
        lines.append("- method options: " + ", ".join(f"`{k}={v}`" for k, v in opts.items()))
    lines += [
        f"- seed {report['seed']}; statistics "
        + ("sequential (each layer sees the already compressed layers before it)" if report["sequential"]
           else "from the original model at every layer"),
        f"- merge guard: `{guard}`",
    ]
    if method == "ream":
        if guard == "off":
            lines.append("- REAM exactly as in the paper (arXiv 2604.04356): `--guard off`")
        else:
            held = report["calibration"].get("holdout_sequences", 0)
            lines += [
                f"- **guarded REAM** (`--guard {guard}`, the default): in every MoE layer, REAP pruning and REAM at "
                f"several group sizes were judged on {held} held-out calibration sequences "
                "by the error of the layer's routed output, and the plan with the lowest error was written"
                + (" (after undoing single merged groups where that lowered the error)" if guard == "group" else "")
                + "." + (f" Choices: {_choices(report['layers'])}." if _choices(report["layers"]) else ""),
                "- the paper's algorithm unchanged: `ream-lite compress ... --guard off`",
            ]
    lines += refit_lines(report["layers"])
    return lines


def refit_lines(layers: list[dict]) -> list[str]:
    """What the least-squares refit did (ream_lite.refit), if it ran."""
    tried = [L["refit"] for L in layers if L.get("refit")]
    if not tried:
        return []
    used = [r for r in tried if r.get("used")]
    judged = any("heldout_error" in r for r in tried)
    line = (f"- **refit experts**: in {len(used)} of {len(layers)} MoE layers the kept experts' down projections were "
            f"re-fitted by ridge least squares ({tried[0]['sweeps']} sweeps, ridge {tried[0]['ridge']:g}) so that the "
            "compressed layer reproduces the original layer's routed output on the calibration tokens")
    if judged:
        line += ("; a fit was used only where it lowered the error on held-out calibration sequences by more than "
                 "2 standard errors (`--refit auto`)")
    if used:
        before = sum(r["calib_error_before"] for r in used) / len(used)
        after = sum(r["calib_error_after"] for r in used) / len(used)
        line += f". Mean relative layer error on the calibration tokens of the refit layers: {before:.3f} -> {after:.3f}"
    return [line + ". Without it: `--refit off`."]


def structure_line(layers: list[dict]) -> str:
    """e.g. '2 of 3 MoE layers merge experts (5 merged groups, up to 3 experts each); the others only prune.'"""
    sizes = [len(g["members"]) for L in layers for g in L.get("groups", {}).values() if len(g["members"]) > 1]
    merging = sum(1 for L in layers if any(len(g["members"]) > 1 for g in L.get("groups", {}).values()))
    if not merging:
        return f"- result: all {len(layers)} MoE layers prune (no experts merged)"
    rest = "; the others only prune" if merging < len(layers) else ""
    return (f"- result: {merging} of {len(layers)} MoE layers merge experts ({len(sizes)} merged groups, up to "
            f"{max(sizes)} experts each){rest}")


def load_lines(output_name: str, auto_class: str = "AutoModelForCausalLM") -> list[str]:
    return [
        "## Load",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'model = {auto_class}.from_pretrained("{output_name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{output_name}")',
        "```",
        "",
        ("The checkpoint keeps the base model's architecture, key names and layout; only the expert count in "
         "`config.json` changed. Tools that load the base model load this one as the same architecture with fewer "
         f"experts: e.g. vLLM (`vllm serve {output_name}`) and llama.cpp's converter "
         f"(`python convert_hf_to_gguf.py {output_name}`)."),
    ]


def reproduce_lines(report: dict) -> list[str]:
    version = report.get("ream_lite_version")
    lines = ["## Reproduce", ""]
    if report.get("command"):
        lines += [f"With ream-lite {version}:" if version else "With ream-lite:", "", "```bash",
                  report["command"], "```"]
    else:
        lines.append("`ream-lite compress` with the settings above.")
    return lines


def files_lines() -> list[str]:
    return [
        "## Files",
        "",
        ("- `ream_plan.json`: per MoE layer the kept experts (original ids), the merged groups with their weights, "
         "every expert's REAP / frequency / EAN scores, the routing of the compressed layer on the calibration "
         "tokens and the guard's candidate errors"),
        "- `ream_report.json`: the same plus time, peak memory and library versions",
        ("- `saliency.png`, `groups.png`, `frequency.png` (when matplotlib was installed): REAP saliency per layer "
         "and expert, what became of every expert, and routing frequency before vs after; redraw them with "
         "`python -m ream_lite.report ream_report.json`"),
    ]


def model_card(report: dict, size_before: int | None = None, size_after: int | None = None,
               output_name: str = "model") -> str:
    """The card; sizes default to the report's totals (size_before_bytes, size_after_bytes)."""
    size_before, size_after = _sizes(report, size_before, size_after)
    e = report["experts"]
    base = hub_id(report["model"])
    by = f"ream-lite {report['ream_lite_version']}" if report.get("ream_lite_version") else "ream-lite"
    # a multimodal checkpoint (its text model compressed, the vision tower unchanged) loads with its wrapper class
    auto_class = "AutoModelForImageTextToText" if report.get("multimodal") else "AutoModelForCausalLM"
    lines = ["---", "tags: [moe, expert-merging, ream-lite]"]
    if base:
        lines.append(f"base_model: {base}")
    lines += [
        "---",
        f"# {output_name}",
        "",
        (f"`{base or report['model']}` with its routed experts reduced from **{e['before']} to {e['after']} per MoE "
         f"layer** by {by}, method `{report['method']}`."),
        "",
        *summary_table(report, size_before, size_after),
        "",
        "## How it was made",
        "",
        f"- base model: `{report['model']}`",
        *method_lines(report),
        *([structure_line(report["layers"])] if report.get("layers") else []),
        *calibration_lines(report),
        "", *reproduce_lines(report), "", *load_lines(output_name, auto_class), "", *files_lines(), "",
    ]
    return "\n".join(lines)
