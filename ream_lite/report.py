"""The compression report: ream_report.json (everything), ream_plan.json (its deterministic part) and plots.

`compress` builds one report dict (see `write_report`); this module only reads it, so the plots can be redrawn
from a saved report:

    python -m ream_lite.report OUT/ream_report.json

Per MoE layer the record is `LayerPlan.to_json()` plus `seconds`, `peak_device_bytes`, `peak_host_bytes`
(volatile: report only), `frequency_after` (tokens routed to each kept expert, in kept order, by the compressed
router on the statistics tokens) and `tokens` (the statistics tokens).

ream_plan.json is the report without what changes from one run of the same command to the next (times, memory,
bytes read and written, library versions), so a resumed run writes it byte for byte as an uninterrupted one.

Plots (PNG, next to the JSON files; matplotlib is optional: `pip install ream-lite[plots]`):
  saliency.png   REAP saliency of every original expert, per MoE layer, experts sorted by saliency; dropped faded
  groups.png     per layer, the original experts arranged as merged groups, kept singletons and dropped experts
  frequency.png  routing share of every kept expert under the original router vs the compressed one
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_NAME = "ream_report.json"
PLAN_NAME = "ream_plan.json"
PLOT_NAMES = ("saliency.png", "groups.png", "frequency.png")
REPORT_FILES = (REPORT_NAME, PLAN_NAME, *PLOT_NAMES)  # every file write_report may write
PLOTS_EXTRA = "matplotlib is not installed (pip install ream-lite[plots])"

# what differs between two runs of the same command: left out of ream_plan.json
VOLATILE_LAYER_KEYS = ("seconds", "peak_device_bytes", "peak_host_bytes")
DETERMINISTIC_TOTALS = ("size_before_bytes", "size_after_bytes")
# preferred key order in the JSON files (other keys follow, sorted)
TOP_ORDER = ("ream_lite_version", "torch_version", "transformers_version", "python_version", "command", "model",
             "method", "experts", "options", "sequential", "seed", "guard", "calibration", "totals", "layers")
LAYER_ORDER = ("layer", "num_experts", "method", "kept", "groups", "align", "tokens", "frequency_after",
               "seconds", "peak_device_bytes", "peak_host_bytes", "scores", "guard")
TOTALS_ORDER = ("seconds", "peak_device_bytes", "peak_host_bytes", "size_before_bytes", "size_after_bytes",
                "bytes_read", "bytes_written")


# ---------------------------------------------------------------- measuring (called by compress)


def peak_host_bytes() -> int | None:
    """The process's peak resident set so far (VmHWM), in bytes; None where /proc/self/status has none."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return None


class Meter:
    """Wall time and peak memory of one stretch of work (a layer, or the whole run):

        m = Meter(device); ...; record.update(m.read())

    Starting a Meter resets torch's CUDA peak counter of `device`, so nest none inside another on the same GPU;
    the run's device peak is the max of its layers'."""

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def read(self) -> dict:
        import torch

        dev = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        return {"seconds": round(time.perf_counter() - self.t0, 3), "peak_device_bytes": dev,
                "peak_host_bytes": peak_host_bytes()}


def versions() -> dict:
    """ream_lite, torch, transformers and Python versions, for the report's top level."""
    import platform

    import torch
    import transformers

    from ream_lite import __version__

    return {"ream_lite_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python_version": platform.python_version()}


# ---------------------------------------------------------------- JSON


def plan_json(report: dict) -> dict:
    """The deterministic part of the report, for ream_plan.json: without library versions, times and peak memory
    (of the layers, and at the top level where an older report has them), and the totals' times, memory and
    bytes read / written (a resumed run reads and writes less)."""
    out = {k: v for k, v in report.items()
           if not k.endswith("_version") and k not in ("layers", "totals", *VOLATILE_LAYER_KEYS)}
    totals = {k: v for k, v in report.get("totals", {}).items() if k in DETERMINISTIC_TOTALS}
    if totals:
        out["totals"] = totals
    out["layers"] = [{k: v for k, v in L.items() if k not in VOLATILE_LAYER_KEYS} for L in report.get("layers", [])]
    return out


def _key(k: str) -> tuple:
    """Sort key: numeric keys (expert ids) by value and before words, words alphabetically."""
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def _ordered(d: dict, first: tuple[str, ...]) -> dict:
    """`d` with the keys of `first` in that order, then the others sorted (so the order never depends on how the
    dict was built, e.g. fresh or re-read from a resumed run's files)."""
    return {**{k: d[k] for k in first if k in d}, **{k: d[k] for k in sorted(d, key=_key) if k not in first}}


def canonical(obj, first: tuple[str, ...] = ()):
    """A copy of a JSON value with every dict's keys in a stable order."""
    if isinstance(obj, dict):
        obj = _ordered(obj, first)
        nested = {"layers": LAYER_ORDER, "totals": TOTALS_ORDER} if first is TOP_ORDER else {}
        return {k: [canonical(x, nested[k]) for x in v] if k == "layers" else canonical(v, nested.get(k, ()))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(x) for x in obj]
    return obj


def dumps(report: dict) -> str:
    """JSON text as written: canonical key order, indent 1, trailing newline."""
    return json.dumps(canonical(report, TOP_ORDER), indent=1) + "\n"


def write_json(out_dir: Path, report: dict) -> None:
    """ream_report.json (everything) and ream_plan.json (the deterministic part)."""
    from ream_lite.checkpoint import files  # (not at the top: the checkpoint package imports this module)

    out_dir = Path(out_dir)
    files.write_file(out_dir / REPORT_NAME, dumps(report), REPORT_NAME)
    files.write_file(out_dir / PLAN_NAME, dumps(plan_json(report)), PLAN_NAME)


def write_report(out_dir: Path, report: dict) -> list[str]:
    """Writes ream_report.json, ream_plan.json and the plots into out_dir. Returns notes for the user (plots
    skipped and why); never raises for a plot."""
    write_json(out_dir, report)
    return write_plots(out_dir, report)


# ---------------------------------------------------------------- per-layer data


def layer_roles(layer: dict):
    """Per original expert: 0 dropped, 1 kept alone, 2 kept as the centroid of a merged group, 3 merged into one.
    Returns (roles int array [N], centroid of each expert, -1 for dropped)."""
    import numpy as np

    n = int(layer["num_experts"])
    roles = np.zeros(n, dtype=np.int8)
    owner = np.full(n, -1, dtype=np.int64)
    roles[layer["kept"]] = 1
    owner[layer["kept"]] = layer["kept"]
    for c, g in layer.get("groups", {}).items():
        members = g["members"]
        roles[members[1:]] = 3
        owner[members] = int(c)
        roles[int(c)] = 2 if len(members) > 1 else 1
    return roles, owner


def group_row(layer: dict):
    """The layer's experts arranged for groups.png: merged groups (largest first; centroid first in each), kept
    singletons, dropped. Returns the category of each position: 0 dropped, 1 singleton, 2 centroid,
    3 / 4 member of an even / odd merged group (alternating, so neighbouring groups stay apart)."""
    import numpy as np

    groups = sorted(((int(c), g["members"]) for c, g in layer.get("groups", {}).items() if len(g["members"]) > 1),
                    key=lambda cg: (-len(cg[1]), cg[0]))
    row: list[int] = []
    for i, (_, members) in enumerate(groups):
        row += [2] + [3 + i % 2] * (len(members) - 1)
    singles = len(layer["kept"]) - len(groups)
    row += [1] * singles + [0] * (int(layer["num_experts"]) - len(row) - singles)
    return np.array(row, dtype=np.int8)


def frequency_shares(layer: dict):
    """(before, after) routing shares of the kept experts, in kept order: before = the original router's routed
    slots to each kept expert / all its routed slots (the dropped experts' share is missing from the sum);
    after = the compressed router's (sums to 1). None when the layer lacks frequency_after or scores.frequency."""
    import numpy as np

    freq, after = layer.get("scores", {}).get("frequency"), layer.get("frequency_after")
    if freq is None or after is None or len(after) != len(layer["kept"]):
        return None
    freq, after = np.asarray(freq, dtype=np.float64), np.asarray(after, dtype=np.float64)
    before = freq[layer["kept"]] / max(freq.sum(), 1.0)
    return before, after / max(after.sum(), 1.0)


# ---------------------------------------------------------------- plots


def write_plots(out_dir: Path, report: dict) -> list[str]:
    """saliency.png, groups.png and frequency.png from the report alone. Returns notes (plots skipped, why)."""
    layers = report.get("layers") or []
    if not layers:
        return ["plots skipped: the report has no MoE layers"]
    try:
        import matplotlib  # noqa: F401  (first: a None in sys.modules must stop us here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return [f"plots skipped: {PLOTS_EXTRA}"]
    notes = []
    for name, draw in (("saliency.png", plot_saliency), ("groups.png", plot_groups),
                       ("frequency.png", plot_frequency)):
        try:
            fig = draw(report)
        except Exception as e:  # a plot must never cost the user a finished compression
            log.warning("%s not drawn", name, exc_info=True)
            notes.append(f"{name} skipped: {type(e).__name__}: {e}")
            continue
        if isinstance(fig, str):
            notes.append(f"{name} skipped: {fig}")
            continue
        save(fig, Path(out_dir) / name)
    return notes


def new_figure(width: float, height: float):
    """A figure on the Agg canvas, outside pyplot: no GUI backend is chosen, the user's is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> None:
    from ream_lite.checkpoint import files

    png = io.BytesIO()
    fig.savefig(png, format="png", metadata={"Software": None})
    files.write_file(path, png.getvalue(), Path(path).name)


def _size(report: dict) -> tuple[float, float]:
    """Figure (width, height) in inches for a layer x expert map: >= 2 px per expert, ~7 px per layer row."""
    n = max(int(L["num_experts"]) for L in report["layers"])
    rows = len(report["layers"])
    return min(max(11.0, 2.2 * n / 100 + 4.5), 17.0), min(max(3.8, 1.9 + 0.075 * rows), 10.0)


def _interpolation(n: int) -> str:
    """Crisp cells while the map has >= 2 px per expert (up to ~600 experts, see _size), smoothed beyond."""
    return "nearest" if n <= 600 else "antialiased"


def _plain_log_axis(axis) -> None:
    """Log-scale ticks as plain numbers (0.5, 1, 2, 1,000) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _layer_axis(ax, layers: list[dict]) -> None:
    """Rows = MoE layers, top to bottom, labelled with their layer numbers (every k-th when many)."""
    step = max(1, -(-len(layers) // 24))
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks, [str(layers[i]["layer"]) for i in ticks])
    ax.set_ylabel("MoE layer")


def _title(report: dict) -> str:
    e = report.get("experts", {})
    return f"{report.get('model', '?')}  ·  {report.get('method', '?')}  ·  {e.get('before', '?')} → {e.get('after', '?')} experts"


def saliency_matrix(layers: list[dict]):
    """[layers, N] REAP saliency / the layer's mean, each row sorted descending; and whether each cell is a kept
    expert. Rows shorter than N are padded with NaN."""
    import numpy as np

    n = max(int(L["num_experts"]) for L in layers)
    values = np.full((len(layers), n), np.nan)
    kept = np.zeros((len(layers), n), dtype=bool)
    for i, L in enumerate(layers):
        s = np.asarray(L["scores"]["reap"], dtype=np.float64)
        order = np.lexsort((np.arange(len(s)), -s))  # descending, ties by expert id
        values[i, : len(s)] = s[order] / max(s.mean(), 1e-300)
        mask = np.zeros(len(s), dtype=bool)
        mask[L["kept"]] = True
        kept[i, : len(s)] = mask[order]
    return values, kept


def plot_saliency(report: dict):
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = report["layers"]
    if any("reap" not in L.get("scores", {}) for L in layers):
        return "the layers have no REAP scores"
    values, kept = saliency_matrix(layers)
    n_keep = len(layers[0]["kept"])
    positive = values[np.isfinite(values) & (values > 0)]
    lo, hi = (np.percentile(positive, [1, 99.5]) if positive.size else (0.1, 10.0))
    lo, hi = min(lo, 0.5), max(hi, 2.0)
    shown = np.clip(np.nan_to_num(values, nan=lo), lo, hi)  # 0 (never routed) drawn as the lowest colour
    w, h = _size(report)
    fig = new_figure(w, h)
    ax, side = fig.subplots(1, 2, width_ratios=[6, 1], sharey=True)
    im = ax.imshow(shown, aspect="auto", interpolation=_interpolation(values.shape[1]), cmap="viridis",
                   norm=LogNorm(lo, hi), extent=(-0.5, values.shape[1] - 0.5, len(layers) - 0.5, -0.5))
    fade = np.zeros((*values.shape, 4))
    fade[~kept] = (1.0, 1.0, 1.0, 0.72)  # removed experts (dropped or merged away): washed out
    ax.imshow(fade, aspect="auto", interpolation=_interpolation(values.shape[1]),
              extent=(-0.5, values.shape[1] - 0.5, len(layers) - 0.5, -0.5))
    ax.axvline(n_keep - 0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel(f"the layer's experts, sorted by REAP saliency (highest left)\n"
                  f"washed out: not kept (dropped, or merged into a kept expert); dashed line: {n_keep} kept")
    _layer_axis(ax, layers)
    ax.set_title("REAP saliency of every original expert (mean over routed tokens of gate × expert output norm), "
                 "relative to the layer's mean", fontsize=10)
    bar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03, label="saliency / layer mean")
    bar.set_ticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi])
    _plain_log_axis(bar.ax.yaxis)
    share = np.array([np.nansum(np.where(k, v, 0)) / max(np.nansum(v), 1e-300) for v, k in zip(values, kept)])
    y = np.arange(len(layers))
    side.barh(y, share, height=0.85, color="#3b528b")
    side.set_xlim(0, 1)
    side.set_xlabel("kept share of\ntotal saliency")
    side.grid(axis="x", alpha=0.3)
    side.tick_params(labelleft=False)
    fig.suptitle(_title(report), fontsize=11)
    return fig


def group_size_counts(layers: list[dict]) -> dict[int, int]:
    """How many kept experts, over all layers, head a group of each size (1: kept alone)."""
    counts: dict[int, int] = {}
    for L in layers:
        sizes = [len(g["members"]) for g in L.get("groups", {}).values()]
        for size in sizes + [1] * (len(L["kept"]) - len(sizes)):
            counts[size] = counts.get(size, 0) + 1
    return counts


GROUP_COLORS = ("#e3e3e3", "#4a90c8", "#8c2d04", "#f16913", "#fdae6b")  # dropped, singleton, centroid, members
GROUP_LABELS = ("dropped", "kept alone", "kept: centroid of a merged group", "merged into the centroid on its left")


def plot_groups(report: dict):
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    layers = report["layers"]
    n = max(int(L["num_experts"]) for L in layers)
    grid = np.zeros((len(layers), n), dtype=np.int8)
    for i, L in enumerate(layers):
        row = group_row(L)
        grid[i, : len(row)] = row
    w, h = _size(report)
    fig = new_figure(w, h)
    ax, side = fig.subplots(1, 2, width_ratios=[5, 1.3])
    cmap = ListedColormap(GROUP_COLORS)
    ax.imshow(grid, aspect="auto", cmap=cmap, norm=BoundaryNorm(np.arange(-0.5, 5), cmap.N),
              interpolation=_interpolation(n), interpolation_stage="rgba",
              extent=(-0.5, n - 0.5, len(layers) - 0.5, -0.5))
    _layer_axis(ax, layers)
    ax.set_xlabel("the layer's original experts, arranged: merged groups (largest first), kept alone, dropped")
    merging = sum(1 for L in layers if any(len(g["members"]) > 1 for g in L.get("groups", {}).values()))
    ax.set_title(f"what became of each expert ({merging} of {len(layers)} layers merge, the others prune)",
                 fontsize=10)
    handles = [Patch(facecolor=GROUP_COLORS[i], edgecolor="#999999", lw=0.5, label=GROUP_LABELS[i])
               for i in (2, 3, 1, 0)]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    counts = group_size_counts(layers)
    xs = sorted(counts)
    bars = side.bar([str(x) for x in xs], [counts[x] for x in xs],
                    color=[GROUP_COLORS[1] if x == 1 else GROUP_COLORS[3] for x in xs])
    side.bar_label(bars, [f"{counts[x]:,}" for x in xs], fontsize=7, padding=1)
    side.set_yscale("log")
    side.set_ylim(top=max(counts.values()) * 3)
    _plain_log_axis(side.yaxis)
    side.set_xlabel("group size (1 = kept alone)")
    side.set_ylabel("kept experts, all layers")
    dropped = sum(int(L["num_experts"]) for L in layers) - sum(x * c for x, c in counts.items())
    side.set_title(f"group sizes\n({dropped:,} experts dropped)", fontsize=10)
    side.grid(axis="y", alpha=0.3)
    if len(xs) > 12:
        side.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.suptitle(_title(report), fontsize=11)
    return fig


def plot_frequency(report: dict):
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    layers = report["layers"]
    pairs = [frequency_shares(L) for L in layers]
    if all(p is None for p in pairs):
        return "the layers have no frequency_after"
    fig = new_figure(13.0, 5.6)
    ax, side = fig.subplots(1, 2, width_ratios=[1.15, 1])
    xs, ys, cs, merged = [], [], [], []
    for i, (L, p) in enumerate(zip(layers, pairs)):
        if p is None:
            continue
        roles, _ = layer_roles(L)
        xs.append(p[0])
        ys.append(p[1])
        cs.append(np.full(len(p[0]), float(L["layer"])))
        merged.append(roles[L["kept"]] == 2)
    x, y, c, m = (np.concatenate(a) for a in (xs, ys, cs, merged))
    pos = np.concatenate([x[x > 0], y[y > 0]])
    floor = pos.min() / 2 if pos.size else 1e-6
    x, y = np.maximum(x, floor), np.maximum(y, floor)
    norm = Normalize(min(L["layer"] for L in layers), max(max(L["layer"] for L in layers), min(L["layer"] for L in layers) + 1))
    dot = 9 if len(x) < 3000 else 4
    sc = ax.scatter(x[~m], y[~m], c=c[~m], cmap="viridis", norm=norm, s=dot, alpha=0.6, lw=0, marker="o")
    ax.scatter(x[m], y[m], c=c[m], cmap="viridis", norm=norm, s=dot * 3, alpha=0.9, lw=0.4, edgecolors="black",
               marker="^")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lim = (floor * 0.8, max(x.max(), y.max()) * 1.25)
    ax.plot(lim, lim, color="black", lw=0.8, ls="--")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("before: share of the original router's routed slots")
    ax.set_ylabel("after: share of the compressed router's routed slots")
    ax.set_title("every kept expert of every MoE layer", fontsize=10)
    handles = [Line2D([], [], ls="", marker="o", ms=4, color="#777777", label="kept alone"),
               Line2D([], [], ls="", marker="^", ms=6, color="#777777", mec="black", mew=0.5,
                      label="centroid of a merged group"),
               Line2D([], [], color="black", lw=0.8, ls="--", label="unchanged share (y = x)")]
    if (x == floor).any() or (y == floor).any():
        handles.append(Line2D([], [], ls="", label=f"(a share of 0 is drawn at {floor:.1g})"))
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.grid(alpha=0.25, which="major")
    fig.colorbar(sc, ax=ax, pad=0.01, label="layer").ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    idx = [L["layer"] for L, p in zip(layers, pairs) if p is not None]
    kept_share = [float(p[0].sum()) for p in pairs if p is not None]
    shift = [0.5 * float(np.abs(p[1] - p[0] / max(p[0].sum(), 1e-300)).sum()) for p in pairs if p is not None]
    style = {"marker": "o", "ms": 3} if len(idx) <= 64 else {}
    side.plot(idx, kept_share, color="#21918c", label="share of routed slots the original router gave the kept experts",
              **style)
    side.plot(idx, shift, color="#d95f02", label="routing shift: ½ Σ |after − before renormalised over the kept|",
              **style)
    side.set_ylim(0, 1.02)
    side.set_xlabel("MoE layer")
    side.xaxis.set_major_locator(MaxNLocator(integer=True))
    side.set_title("per layer", fontsize=10)
    side.grid(alpha=0.3)
    side.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
    tokens = sorted({L.get("tokens") for L in layers if L.get("tokens") is not None})
    on = f" on {tokens[0]:,} calibration tokens" if len(tokens) == 1 else " on the calibration tokens"
    fig.suptitle(f"{_title(report)}\nrouting frequency of the kept experts before vs after compression{on}",
                 fontsize=11)
    return fig


# ---------------------------------------------------------------- python -m ream_lite.report REPORT.json


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ream_lite.report",
                                description="Redraw the plots of a compression from its ream_report.json.")
    p.add_argument("report", type=Path, help="ream_report.json (ream_plan.json works too)")
    p.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: the report's)")
    args = p.parse_args(argv)
    report = json.loads(args.report.read_text())
    out = args.out or args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    notes = write_plots(out, report)
    for note in notes:
        print(note, file=sys.stderr)
    drawn = [name for name in PLOT_NAMES if not any(note.startswith(f"{name} ") for note in notes)]
    if any(note.startswith("plots skipped") for note in notes):
        return 1
    for name in drawn:
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
