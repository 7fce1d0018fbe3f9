"""Compression quality on the trained testbed: every method at 25% and 50% expert reduction, several seeds.

    python benchmarks/quality.py [--testbed ../shared/testbed] [--seeds 0 1 2] [--ratios 0.25 0.5]
                                 [--methods reap frequency ...] [--json results.json] [--model DIR]
                                 [--num-sequences 96] [--seq-len 256] [--refit-ridge R] [--refit-sweeps S]

Calibrates on data/calib.jsonl (default 96 x 256 tokens, 32 sequences per domain, as the testbed's reference
figures), evaluates on all of data/eval.jsonl against the original model: perplexity, KL(original || compressed)
per predicted token and top-1 agreement, overall and per domain. The seed picks the calibration sample (and the
experts, for `random`). The reference is streamed once; each compressed model is streamed against it.
`reap`, `ream`, `ream-C*` and the other baselines are the papers' algorithms (`--guard off`, no refit); `ream-guard`
is the default of `ream-lite compress` (guard `group`, then the refit judged on held-out tokens), `reap-refit` the
default of `compress --method reap`, `ream-guard-norefit` the guard alone, `*-refit-on` the paper's plan refit on
every statistics token without a judge; `ream-guard-layer` chooses among whole candidates only. For guarded runs
the table below the figures says which candidate each layer chose. `--model` points at another model with the
testbed's tokenizer (e.g. an upcycled one trained with the testbed's scripts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ream_lite.engine.streamer import StreamOptions
from ream_lite.evaluate import Evaluator
from ream_lite.methods import MethodOptions
from ream_lite.pipeline import CompressConfig, compress
from ream_lite.refit import RefitOptions

OFF, ON = RefitOptions("off"), RefitOptions("on")
# (label, method, options, compress kwargs). "--guard off" is each paper's algorithm; the default of `compress` is
# the guard with `--refit auto` for every method (reap-refit, ream-guard)
VARIANTS = {
    "reap": ("reap", {}, {"guard": "off"}),
    "reap-refit": ("reap", {}, {}),  # default: refit judged on held-out tokens
    "reap-refit-on": ("reap", {}, {"guard": "off", "refit": ON}),  # refit on every statistics token, unjudged
    "frequency": ("frequency", {}, {"sequential": False, "guard": "off"}),
    "ean": ("ean", {}, {"guard": "off"}),
    "random": ("random", {}, {"sequential": False, "guard": "off"}),
    "hc-smoe": ("hc-smoe", {}, {"guard": "off"}),
    "m-smoe": ("m-smoe", {}, {"guard": "off"}),
    "ream": ("ream", {}, {"guard": "off"}),
    "ream-refit-on": ("ream", {}, {"guard": "off", "refit": ON}),
    "ream-C2": ("ream", {"group_size": 2}, {"guard": "off"}),
    "ream-C2-refit-on": ("ream", {"group_size": 2}, {"guard": "off", "refit": ON}),
    "ream-C4": ("ream", {"group_size": 4}, {"guard": "off"}),
    "ream-C8": ("ream", {"group_size": 8}, {"guard": "off"}),
    "ream-guard": ("ream", {}, {"guard": "group"}),  # default of compress: guard + refit auto
    "ream-guard-norefit": ("ream", {}, {"guard": "group", "refit": OFF}),
    "ream-guard-layer": ("ream", {}, {"guard": "layer"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(Path(__file__).resolve().parents[2] / "shared" / "testbed"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="share of experts removed")
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-sequences", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None, help="write every run's figures here")
    ap.add_argument("--model", default=None, help="model directory (default: the testbed's tiny-qwen3-moe)")
    ap.add_argument("--calib", action="append", default=None,
                    help="calibration source, repeatable (default: the testbed's data/calib.jsonl; 'builtin' = the "
                    "corpus shipped with ream-lite)")
    ap.add_argument("--mix", default=None, help="domain ratios, as compress --mix")
    ap.add_argument("--refit-ridge", type=float, default=None, help="ridge of every refit variant (default: compress's)")
    ap.add_argument("--refit-sweeps", type=int, default=None, help="sweeps of every refit variant")
    args = ap.parse_args()
    tb = Path(args.testbed)
    model, calib, data = tb / "tiny-qwen3-moe", tb / "data" / "calib.jsonl", tb / "data" / "eval.jsonl"
    model = Path(args.model) if args.model else model
    calib = args.calib or [str(calib)]
    if not model.exists():
        sys.exit(f"no testbed at {tb}")
    opts = StreamOptions(device="cpu", progress=False)
    t = time.perf_counter()
    ev = Evaluator(str(data), str(model), reference=str(model), seq_len=256, options=opts)
    print(f"reference streamed in {time.perf_counter() - t:.0f} s; {ev.tokens:,} eval tokens", flush=True)
    config = json.loads((model / "config.json").read_text())
    n = config.get("num_experts") or config["num_local_experts"]
    work = Path(tempfile.mkdtemp(prefix="ream-quality-"))
    runs = []
    for ratio in args.ratios:
        keep = n - int(round(n * ratio))
        for label in args.methods:
            method, mopts, kw = VARIANTS[label]
            kw = with_refit_settings(kw, args.refit_ridge, args.refit_sweeps)
            for seed in args.seeds:
                out = work / f"{label}-{keep}-{seed}"
                t = time.perf_counter()
                compress(CompressConfig(
                    model=str(model), output=str(out), experts=keep, method=method,
                    options=MethodOptions(**mopts), calib=calib, mix=args.mix, num_sequences=args.num_sequences,
                    seq_len=args.seq_len, seed=seed, stream=opts, **kw,
                ))
                secs = time.perf_counter() - t
                r = ev.run(str(out))
                plan = json.loads((out / "ream_plan.json").read_text())
                shutil.rmtree(out)
                row = {"method": label, "keep": keep, "seed": seed, "compress_s": round(secs, 1),
                       "overall": r.overall, "domains": r.domains,
                       "guard": [L["guard"] for L in plan["layers"] if "guard" in L],
                       "refit": [L.get("refit") for L in plan["layers"]]}
                runs.append(row)
                o = r.overall
                print(f"{label:<10} {n}->{keep} seed {seed}: KL {o['kl']:.4f} top-1 {o['top1_agreement']:.3f} "
                      f"PPL {o['perplexity']:.2f} ({secs:.0f} s)", flush=True)
    ev.close()
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs, ev.domains)
    report_guard(runs)


def with_refit_settings(kw: dict, ridge: float | None, sweeps: int | None) -> dict:
    """The variant's compress arguments with the benchmark's --refit-ridge / --refit-sweeps."""
    base = kw.get("refit", RefitOptions())
    changes = {k: v for k, v in (("ridge", ridge), ("sweeps", sweeps)) if v is not None}
    return {**kw, "refit": replace(base, **changes)} if changes else kw


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(runs: list[dict], domains: list[str]) -> None:
    keeps = sorted({r["keep"] for r in runs}, reverse=True)
    labels = list(dict.fromkeys(r["method"] for r in runs))
    for keep in keeps:
        print(f"\n### {keep} experts kept (mean ± std over seeds)\n")
        print("| method | KL | top-1 | PPL | " + " | ".join(f"KL {d}" for d in domains) + " |")
        print("|---|---|---|---|" + "---|" * len(domains))
        for label in labels:
            rs = [r for r in runs if r["method"] == label and r["keep"] == keep]
            if not rs:
                continue
            cells = [_ms([r["overall"][k] for r in rs]) for k in ("kl", "top1_agreement", "perplexity")]
            cells += [_ms([r["domains"][d]["kl"] for r in rs]) for d in domains]
            print(f"| {label} | " + " | ".join(cells) + " |")


def report_guard(runs: list[dict]) -> None:
    """Per guarded run: the candidate each layer chose, its held-out error, REAP's, and the compress time."""
    guarded = [r for r in runs if r["guard"]]
    if not guarded:
        return
    print("\n### guard choices per layer (held-out error e of the chosen plan / of REAP)\n")
    print("| variant | kept | seed | " + " | ".join(f"L{i}" for i in range(len(guarded[0]["guard"]))) + " | time |")
    print("|---|---|---|" + "---|" * len(guarded[0]["guard"]) + "---|")
    for r in guarded:
        cells = []
        for g in r["guard"]:
            e = {c["name"]: c["error"] for c in g["candidates"]}
            base = next(iter(e))  # REAP, or the method's own plan
            cells.append(f"{g['chosen']} {e[g['chosen']]:.3f}/{e[base]:.3f}")
        print(f"| {r['method']} | {r['keep']} | {r['seed']} | " + " | ".join(cells) + f" | {r['compress_s']} s |")


if __name__ == "__main__":
    main()
