"""The CUDA path against the CPU path on every supported family's tiny model: same plans, close outputs.

    python benchmarks/gpu_check.py [--dir DIR]

For each family (tests/tiny_models.py), `ream-lite compress` with REAP and with guarded REAM runs on the CPU and on
CUDA from the same checkpoint and calibration; the kept experts and merged groups must agree (they are decided from
float sums that differ only by rounding between devices: a disagreement is printed, not hidden), and the two
outputs are compared by `ream-lite eval` KL on CUDA. Needs a GPU; exits at once without one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from tiny_models import FAMILIES, build_model, save_model  # noqa: E402

from ream_lite.cli import main as cli  # noqa: E402
from ream_lite.testing import save_char_tokenizer  # noqa: E402


def run(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if r.exit_code:
        raise SystemExit(f"ream-lite {' '.join(map(str, args))} failed:\n{r.output}")
    return r.output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    root = Path(args.dir or tempfile.mkdtemp(prefix="ream-gpu-"))
    text = "the quick brown fox jumps over the lazy dog; 12 + 30 = 42. def f(x): return x * 2\n"
    calib = root / "calib.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    calib.write_text("\n".join(json.dumps({"domain": d, "text": text * 40}) for d in ("a", "b")) + "\n")
    rows = []
    for family in FAMILIES:
        src = save_model(build_model(family).to(torch.bfloat16), root / family)
        save_char_tokenizer(src, 64)
        n = json.loads((src / "config.json").read_text())
        n = n.get("num_experts") or n.get("n_routed_experts") or n.get("num_local_experts")
        for method in ("reap", "ream"):
            plans = {}
            for device in ("cpu", "cuda"):
                out = root / f"{family}-{method}-{device}"
                run("compress", src, out, "--experts", n // 2 + n // 4, "--method", method, "--calib", calib,
                    "--num-sequences", 16, "--seq-len", 64, "--device", device, "--overwrite")
                plans[device] = json.loads((out / "ream_plan.json").read_text())["layers"]
            same_kept = all(a["kept"] == b["kept"] for a, b in zip(plans["cpu"], plans["cuda"]))
            same_groups = all(a["groups"] == b["groups"] for a, b in zip(plans["cpu"], plans["cuda"]))
            ev = json.loads(run("eval", root / f"{family}-{method}-cuda", "--data", calib, "--reference",
                                root / f"{family}-{method}-cpu", "--device", "cuda", "--seq-len", 64, "--json"))
            kl = ev["overall"].get("kl")
            rows.append((family, method, same_kept, same_groups, kl))
            print(f"{family:<12} {method:<5} kept same: {same_kept}  groups same: {same_groups}  "
                  f"KL(cpu output || cuda output) {kl}", flush=True)
    bad = [r for r in rows if not (r[2] and r[3])]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} runs: the CUDA plan equals the CPU plan")


if __name__ == "__main__":
    main()
