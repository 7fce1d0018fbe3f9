"""OUT/README.md: what the compressed model is, how it was made, and how to load it."""

from __future__ import annotations

from collections import Counter

GiB = 1024**3


def _choices(layers: list[dict]) -> str:
    """One line on what the guard chose, e.g. '3 layers pruned (REAP), 1 merged (ream-C4 (auto))'."""
    chosen = Counter(L["guard"]["chosen"] for L in layers if "guard" in L)
    if not chosen:
        return ""
    pruned = chosen.pop("reap", 0)
    parts = [f"{pruned} layer(s) pruned (REAP)"] if pruned else []
    parts += [f"{n} layer(s) merged by {name}" for name, n in sorted(chosen.items())]
    return ", ".join(parts)


def model_card(report: dict, size_before: int, size_after: int, output_name: str) -> str:
    e = report["experts"]
    cal = report["calibration"]
    guard = report.get("guard", "off")
    lines = [
        "---",
        "tags: [moe, expert-merging, ream-lite]",
        "---",
        f"# {output_name}",
        "",
        f"`{report['model']}` with its routed experts reduced from **{e['before']} to {e['after']} per MoE layer** "
        f"by ream-lite {report['ream_lite_version']}, method `{report['method']}`.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| routed experts per MoE layer | {e['before']} | {e['after']} |",
        f"| tensor data | {size_before / GiB:.2f} GiB | {size_after / GiB:.2f} GiB |",
        "",
        "## How it was made",
        "",
        f"- calibration: `{cal['source']}`, {cal['sequences']} sequences of {cal['seq_len']} tokens "
        f"({', '.join(f'{d}: {t:,} tokens' for d, t in cal['tokens_per_domain'].items())}), seed {report['seed']}",
        f"- statistics {'sequential (each layer sees the already compressed layers before it)' if report['sequential'] else 'from the original model at every layer'}",
    ]
    if report["method"] == "ream":
        if guard == "off":
            lines.append("- REAM exactly as in the paper (arXiv 2604.04356): `--guard off`")
        else:
            lines += [
                f"- **guarded REAM** (`--guard {guard}`, the default): in every MoE layer, REAP pruning and REAM at "
                f"several group sizes were judged on {cal.get('holdout_sequences', 0)} held-out calibration sequences "
                "by the error of the layer's routed output, and the plan with the lowest error was written"
                + (" (after undoing single merged groups where that lowered the error)" if guard == "group" else "")
                + ". Choices: " + _choices(report["layers"]) + ".",
                "- the paper's algorithm unchanged: `ream-lite compress ... --guard off`",
            ]
    lines += [
        "",
        "Per layer: kept experts, merged groups with their weights, every expert's scores and the guard's candidate "
        "errors are in `ream_plan.json`.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{output_name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{output_name}")',
        "```",
        "",
        "The checkpoint keeps the base model's architecture, key names and layout; only the expert count in "
        "`config.json` changed, so the tools that load the base model load this one.",
        "",
    ]
    return "\n".join(lines)
