"""One measured `ream-lite` run in a fresh process (scale.py starts it):

    python benchmarks/scale_child.py RESULT.json ream-lite-args...

Runs the command in this process with ream_lite.timing on (phases synchronized on CUDA), samples the driver's view
of GPU memory, and writes RESULT.json: wall time, seconds per phase, byte counters, peak host RSS (VmHWM), peak GPU
memory (torch's allocated / reserved, the driver's used), and the run's own report totals.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import GpuSampler, host_peak  # noqa: E402

from ream_lite import timing  # noqa: E402
from ream_lite.cli import main as cli  # noqa: E402  (before CUDA starts: it sets the allocator's options)


def main() -> None:
    result_path, args = Path(sys.argv[1]), sys.argv[2:]
    cuda = any(a.startswith("cuda") for a in args)
    timing.enable(sync="cuda" if cuda else None)
    sampler = GpuSampler() if cuda else None
    t = time.perf_counter()
    cli(args=args, prog_name="ream-lite", standalone_mode=False)
    wall = time.perf_counter() - t
    result = {"wall_seconds": wall, "phases": timing.totals(), "phase_calls": timing.calls(),
              "bytes": timing.byte_totals(), "host_peak_bytes": host_peak()}
    if sampler is not None:
        result.update(sampler.stop())
    out = Path(args[2]) if args[0] == "compress" else None
    if out is not None and (out / "ream_report.json").exists():
        report = json.loads((out / "ream_report.json").read_text())
        result["report_totals"] = report["totals"]
    result_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
