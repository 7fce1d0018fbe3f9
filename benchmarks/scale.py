"""ream-lite at real layer shapes: memory and time against their floors, and against the reference's way of working.

    python benchmarks/scale.py [--shape qwen3-30b-a3b] [--layers 4] [--device cpu|cuda] [--methods reap ream]
                               [--experts 0.75] [--sequences 64] [--seq-len 512] [--budgets 20GB ...]
                               [--reference-style] [--ref-batch 1] [--dir DIR] [--json RESULTS.json]

1. Writes (once) a random-weight checkpoint with the model's real tensor shapes and `--layers` layers
   (benchmarks/synth.py), and drops it from the page cache before every run: each run reads it from the disk, as a
   checkpoint far larger than RAM would be.
2. Measures the two floors on this machine, in this run: the sequential read speed of the checkpoint's disk (a cold
   read of its largest shard, up to 4 GiB, as `ream-lite plan` measures it) and the matmul rate of the device at
   the shapes the work runs at (full token batches against an expert; the few tokens top-k routing sends one
   expert; float64 for the weight-alignment costs).
   Read floor = checkpoint bytes / read speed; compute floor = the FLOPs the method does (from `ream-lite plan`'s
   count, pass by pass) / those rates.
3. Runs `ream-lite compress` for each method and device budget in a fresh process (benchmarks/scale_child.py):
   peak GPU memory (torch's allocated, and the driver's used memory, CUDA context included), peak host RSS, bytes
   read from the checkpoint, bytes through the work dir, and the wall time split into read / compute / store /
   write / snapshot (ream_lite.timing; on CUDA each phase boundary synchronizes, so the split is attributable).
4. With --reference-style, the same checkpoint and calibration through benchmarks/reference_style.py (the whole
   model loaded with transformers, REAP statistics by hooks, save_pretrained), in a fresh process.
Prints one table; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import evict_from_page_cache, matmul_rate  # noqa: E402
from shapes import SHAPES  # noqa: E402
from synth import synthesize  # noqa: E402

from ream_lite import timing  # noqa: E402
from ream_lite.arch.layout import ModelLayout  # noqa: E402
from ream_lite.checkpoint.reader import CheckpointReader  # noqa: E402
from ream_lite.rates import measure_read_speed  # noqa: E402

HERE = Path(__file__).parent
GiB = 1024**3


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def plan(model: Path, method: str, args, budget: str | None) -> dict:
    """`ream-lite plan --json` for the run: FLOPs per kind of work, predicted peaks and bytes read (`--extra` goes
    to both: they must be options `plan` takes too)."""
    cmd = [sys.executable, "-m", "ream_lite", "plan", str(model), "--experts", args.experts, "--method", method,
           "--num-sequences", str(args.sequences), "--seq-len", str(args.seq_len), "--device", args.device,
           "--no-measure", "--json", *(["--max-gpu-memory", budget] if budget else []),
           *args.extra.split()]  # (the run's own settings: `--guard off` plans no candidates, `--refit off` no refit)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"plan failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout)


def floor_rates(cfg, device: str, batch_tokens: int) -> dict[str, float]:
    """FLOP/s of the device at the shapes each kind of work runs at (see the module docstring)."""
    h, inter = cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    n = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_local_experts
    k = cfg.num_experts_per_tok
    routed_rows = max(1, batch_tokens * k // n)
    secs = 1.0 if device.startswith("cuda") else 2.0

    def expert_rate(rows: int) -> float:  # gate and up [rows, H] x [I, H]; down [rows, I] x [H, I]
        up, down = matmul_rate(rows, h, inter, torch.bfloat16, device, secs), \
            matmul_rate(rows, inter, h, torch.bfloat16, device, secs)
        return 3 / (2 / up + 1 / down)

    return {"batch": expert_rate(batch_tokens), "routed": expert_rate(routed_rows),
            "float64": matmul_rate(inter, h, inter, torch.float64, device, secs), "routed_rows": routed_rows}


def compute_floor(work: dict, rates: dict) -> float:
    return ((work["layers"] + work["dense"] + work["alignment"]) / rates["batch"] + work["routed"] / rates["routed"]
            + work["float64"] / rates["float64"])


def run_child(script: str, args: list[str], result: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    r = json.loads(result.read_text())
    r["process_seconds"] = time.perf_counter() - t
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["reap", "ream"])
    ap.add_argument("--experts", default="0.75", help="experts kept per layer: a count or a fraction")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--budgets", nargs="+", default=[None], help="--max-gpu-memory values (default: the card's)")
    ap.add_argument("--extra", default="", help="more compress (and plan) arguments, one string")
    ap.add_argument("--reference-style", action="store_true", help="also run the reference's way (see above)")
    ap.add_argument("--ref-batch", type=int, default=1, help="sequences per forward in the reference-style run")
    ap.add_argument("--dir", default=None, help="checkpoint, outputs and work dir (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write every figure here (rewritten after every run)")
    ap.add_argument("--fp8", action="store_true", help="the checkpoint FP8 block-scaled, as the FP8 releases are")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the compressed models (default: deleted "
                    "after each run is measured, so a large checkpoint's outputs do not fill the disk)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ream-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    model = root / f"{args.shape}-{args.layers}L{'-fp8' if args.fp8 else ''}"
    t = time.perf_counter()
    synthesize(args.shape, model, args.layers, args.dense_layers,
               device="cuda" if args.device.startswith("cuda") else "cpu", fp8=args.fp8)
    print(f"checkpoint {model} ready in {time.perf_counter() - t:.0f} s", flush=True)
    files = shards(model)
    ckpt_bytes = CheckpointReader(model).total_bytes()
    evict_from_page_cache(files)  # (synced first: a checkpoint just written is in the page cache, dirty)
    read_rate, _ = measure_read_speed(ModelLayout(model), 4 * GiB)  # as `ream-lite plan` measures the disk
    cfg = SHAPES[args.shape](args.layers, args.dense_layers)
    rates = floor_rates(cfg, args.device, 4096)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the runs' own GPU figures should not count this process's matmul buffers
    print(f"read {read_rate / 1e9:.2f} GB/s (cold, largest shard, up to 4 GiB); matmul bf16 "
          f"{rates['batch'] / 1e12:.2f} TFLOP/s at 4096 rows, {rates['routed'] / 1e12:.2f} at {rates['routed_rows']} "
          f"rows; float64 {rates['float64'] / 1e12:.3f} TFLOP/s", flush=True)

    rows: list[dict] = []

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({
                "shape": args.shape, "fp8": args.fp8, "layers": args.layers, "device": args.device, "sequences": args.sequences,
                "seq_len": args.seq_len, "experts": args.experts, "checkpoint_bytes": ckpt_bytes,
                "read_rate": read_rate, "rates": rates,
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "runs": rows},
                indent=2) + "\n")

    def finished(out: Path) -> None:
        save()
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)

    for method in args.methods:
        for budget in args.budgets:
            p = plan(model, method, args, budget)
            out, result = root / f"out-{method}-{budget or 'default'}", root / f"result-{method}-{budget}.json"
            cmd = ["compress", str(model), str(out), "--experts", args.experts, "--method", method,
                   "--num-sequences", str(args.sequences), "--seq-len", str(args.seq_len), "--device", args.device,
                   "--work-dir", str(root / "work"), "--overwrite", *(["--max-gpu-memory", budget] if budget else []),
                   *args.extra.split()]
            evict_from_page_cache(files)
            r = run_child("scale_child.py", [str(result), *cmd], result)
            floor_read = ckpt_bytes / read_rate
            floor_compute = compute_floor(p["work"], rates)
            rows.append({"run": f"ream-lite {method}" + (f" {budget}" if budget else ""), "method": method,
                         "budget": budget, "result": r, "plan": {k: p[k] for k in (
                             "peak_device_bytes", "host_peak_bytes", "read_bytes", "work", "seconds", "memory")},
                         "read_floor_s": floor_read, "compute_floor_s": floor_compute})
            print(f"done: {rows[-1]['run']} in {r['wall_seconds']:.0f} s", flush=True)
            finished(out)
    if args.reference_style:
        out, result = root / "out-reference-style", root / "result-reference.json"
        evict_from_page_cache(files)
        r = run_child("reference_style.py", [str(model), str(out), "--experts", args.experts, "--num-sequences",
                                             str(args.sequences), "--seq-len", str(args.seq_len), "--device",
                                             args.device, "--batch-size", str(args.ref_batch), "--result",
                                             str(result)], result)
        rows.append({"run": "reference-style reap", "method": "reap", "budget": None, "result": r,
                     "read_floor_s": ckpt_bytes / read_rate, "compute_floor_s": None})
        print(f"done: reference-style in {r['wall_seconds']:.0f} s", flush=True)
        finished(out)

    print_table(args, model, ckpt_bytes, read_rate, rates, rows)


def print_table(args, model: Path, ckpt_bytes: int, read_rate: float, rates: dict, rows: list[dict]) -> None:
    g = lambda b: f"{b / GiB:.2f}" if b is not None else "-"  # noqa: E731
    print(f"\n{args.shape}, {args.layers} layers ({ckpt_bytes / GiB:.2f} GiB), {args.sequences} x {args.seq_len} "
          f"tokens, -> {args.experts} experts, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"{'run':<26} {'GPU alloc':>9} {'GPU proc':>8} {'host RSS':>8} {'read':>7} {'workdir':>8} {'wall':>7} "
          f"{'layers':>7} "
          f"{'read':>6} {'compute':>7} {'store':>6} {'write':>6} {'snap':>6} {'floor R':>7} {'floor C':>7} "
          f"{'x floor':>7}")
    print(f"{'':<26} {'GiB':>9} {'GiB':>8} {'GiB':>8} {'x ckpt':>7} {'GiB':>8} {'s':>7} {'s':>7} {'s':>6} {'s':>7} "
          f"{'s':>6} "
          f"{'s':>6} {'s':>6} {'s':>7} {'s':>7}")
    for row in rows:
        r = row["result"]
        ph = r.get("phases", {})
        wall = r["wall_seconds"]
        if "report_totals" in r:
            read_x = r["report_totals"]["bytes_read"] / ckpt_bytes
            named = sum(ph.get(k, 0.0) for k in ("read", "store", "write", "snapshot", "calibration"))
            split = [ph.get("read", 0.0), wall - named, ph.get("store", 0.0), ph.get("write", 0.0),
                     ph.get("snapshot", 0.0)]
        else:  # reference-style: load = read, forward = compute, save = write
            read_x = 1.0
            split = [ph.get("load", 0.0), ph.get("forward_and_hooks", 0.0) + ph.get("prune", 0.0), 0.0,
                     ph.get("save", 0.0), 0.0]
        work_dir = sum(r.get("bytes", {}).get(k, 0) for k in ("work_dir_read", "work_dir_written"))
        fc = row["compute_floor_s"]
        ratio = f"{wall / (row['read_floor_s'] + fc):.2f}" if fc else "-"
        proc = r.get("gpu_process_peak_bytes", r.get("gpu_driver_peak_bytes"))
        print(f"{row['run']:<26} {g(r.get('gpu_torch_peak_allocated_bytes')):>9} {g(proc):>8} "
              f"{g(r['host_peak_bytes']):>8} {read_x:>7.2f} {work_dir / GiB:>8.2f} {wall:>7.1f} "
              f"{r.get('report_totals', {}).get('seconds') or 0:>7.1f} "
              + " ".join(f"{x:>6.1f}" if i != 1 else f"{x:>7.1f}" for i, x in enumerate(split))
              + f" {row['read_floor_s']:>7.1f} " + (f"{fc:>7.1f}" if fc else f"{'-':>7}") + f" {ratio:>7}")
    for row in rows:
        ph = row["result"].get("phases", {})
        if any(k in ph for k in timing.PASSES):
            parts = [(k, ph.get(k, 0.0)) for k in timing.PASSES if ph.get(k)]
            named = sum(ph.get(k, 0.0) for k in ("read", "store", "write", "snapshot", "calibration", *timing.PASSES))
            print(f"  {row['run']}: compute = " + ", ".join(f"{k} {v:.1f}" for k, v in parts)
                  + f", the rest (start-up, plan, embedding, side files) {row['result']['wall_seconds'] - named:.1f} s")
    ours = [row for row in rows if row["run"].startswith("ream-lite reap")]
    ref = [row for row in rows if row["run"].startswith("reference")]
    if ours and ref:
        o, f = ours[0]["result"], ref[0]["result"]
        line = f"reference-style / ream-lite reap: host peak {f['host_peak_bytes'] / o['host_peak_bytes']:.1f}x, " \
               f"time {f['wall_seconds'] / o['wall_seconds']:.2f}x"
        if o.get("gpu_driver_peak_bytes"):
            line += f", GPU (driver) {f['gpu_driver_peak_bytes'] / o['gpu_driver_peak_bytes']:.1f}x"
        print(line)
    print("wall: the whole command in its process (start-up, plan, calibration, copies, side files); layers: the "
          "layer loop alone; split of wall: read = checkpoint reads with decode and host-to-device copies; store = "
          "hidden states moved to/from host or disk tiers; compute = the rest (calibration tokenizing excluded)")


if __name__ == "__main__":
    main()
