"""Check ream_lite.checkpoint.ggml_blocks against llama.cpp's own C quantizers, byte for byte.

    python benchmarks/ggml_oracle.py                   # build the oracle, compare, time
    python benchmarks/ggml_oracle.py --write-golden    # also (re)write tests/data/ggml_golden.npz

What it does:
  1. gets llama.cpp's C sources from the llama-cpp-python sdist (`pip download llama-cpp-python --no-deps
     --no-binary :all:`; the sdist vendors llama.cpp/ggml), unless --ggml-dir points at a ggml tree;
  2. compiles ggml/src/ggml-quants.c alone plus a 10-line stub (the four ggml.c functions it links against, which
     the reference quantizers never call, and exports of GGML_FP32_TO_FP16 / GGML_FP32_TO_BF16) into a shared
     library, twice: "ref" as ggml-base is built on x86-64 (-O2, no FMA contraction) and "fma"
     (-O2 -ffp-contract=fast, plus -mfma on x86), what an FMA-contracting build such as aarch64 GCC computes;
  3. calls quantize_row_<type>_ref / dequantize_row_<type> through ctypes on many kinds of rows and counts the
     rows and bytes where ggml_blocks.encode / decode differ;
  4. times encode / decode for Q4_K and Q6_K on 4096 x 2048 float32 (CPU);
  5. with --write-golden, stores small inputs with llama.cpp's bytes (and a few dequantized outputs) for
     tests/test_ggml_blocks.py, so the tests never need a C compiler.

Not a test: pytest never collects it (benchmarks/ is outside testpaths).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ream_lite.checkpoint import ggml_blocks

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "ggml_golden.npz"

# types with a C reference quantizer that ggml_blocks encodes, and their C names
C_NAMES = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1", Q.Q8_0: "q8_0", Q.MXFP4: "mxfp4",
           Q.Q2_K: "q2_K", Q.Q3_K: "q3_K", Q.Q4_K: "q4_K", Q.Q5_K: "q5_K", Q.Q6_K: "q6_K"}
GOLDEN_DEQUANT = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4)

STUB = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "ggml-impl.h"
/* ggml-quants.c references these ggml.c functions only on paths the reference quantizers never take */
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)fmt; fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void)type; (void)ne; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void)type; return "?"; }
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
/* the conversions ggml-quants.c uses for its fp16 fields, and ggml's fp32 -> bf16 */
void oracle_fp32_to_fp16(const float * x, uint16_t * y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = GGML_FP32_TO_FP16(x[i]); }
void oracle_fp32_to_bf16(const float * x, uint16_t * y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = GGML_FP32_TO_BF16(x[i]).bits; }
"""


# ---------------------------------------------------------------------------------------------------------------
# building the oracle


def find_ggml(sdist_dir: Path) -> Path:
    hits = sorted(glob.glob(str(sdist_dir / "*" / "vendor" / "llama.cpp" / "ggml")))
    if hits:
        return Path(hits[-1])
    tarballs = sorted(glob.glob(str(sdist_dir / "llama_cpp_python-*.tar.gz")))
    if not tarballs:
        sdist_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading the llama-cpp-python sdist into {sdist_dir} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-deps",
                        "--no-binary", ":all:", "-d", str(sdist_dir)], check=True)
        tarballs = sorted(glob.glob(str(sdist_dir / "llama_cpp_python-*.tar.gz")))
    with tarfile.open(tarballs[-1]) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/ggml/" in m.name]
        tar.extractall(sdist_dir, members=members, filter="data")
    return Path(max(glob.glob(str(sdist_dir / "*" / "vendor" / "llama.cpp" / "ggml"))))


def build(ggml: Path, out_dir: Path, variant: str) -> ctypes.CDLL:
    out_dir.mkdir(parents=True, exist_ok=True)
    stub = out_dir / "oracle_stub.c"
    stub.write_text(STUB)
    lib = out_dir / f"libggml_quants_{variant}.so"
    flags = ["-O2", "-DNDEBUG", "-fPIC", "-shared"]  # NDEBUG as in release builds: nearest_int asserts
    if variant == "ref":
        flags.append("-ffp-contract=off")
    else:
        flags.append("-ffp-contract=fast")
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-mfma")
    cmd = [os.environ.get("CC", "cc"), *flags, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
           str(ggml / "src" / "ggml-quants.c"), str(stub), "-lm", "-o", str(lib)]
    src_time = max(os.path.getmtime(ggml / "src" / "ggml-quants.c"), os.path.getmtime(stub))
    if not lib.exists() or os.path.getmtime(lib) < src_time:
        subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


class Oracle:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def quantize(self, q: Q, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((*x.shape[:-1], ggml_blocks.row_bytes(q, x.shape[-1])), dtype=np.uint8)
        fn = getattr(self.lib, f"quantize_row_{C_NAMES[q]}_ref")
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        return out

    def dequantize(self, q: Q, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.zeros((*raw.shape[:-1], cols), dtype=np.float32)
        fn = getattr(self.lib, f"dequantize_row_{C_NAMES[q]}")
        fn(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
        return out

    def half_bits(self, x: np.ndarray, bf16: bool) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(x.shape, dtype=np.uint16)
        fn = self.lib.oracle_fp32_to_bf16 if bf16 else self.lib.oracle_fp32_to_fp16
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        return out


# ---------------------------------------------------------------------------------------------------------------
# inputs


def to_bf16_grid(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 value (checkpoints are stored in bf16)."""
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def cases(rng: np.random.Generator, rows: int, cols: int) -> dict[str, np.ndarray]:
    n = (rows, cols)
    out = {"normal": rng.standard_normal(n, dtype=np.float32)}
    x = rng.standard_normal(n, dtype=np.float32) * 0.02
    hot = rng.random(n) < 0.005
    x[hot] *= 100.0
    out["outliers"] = x
    out["zeros"] = np.zeros(n, dtype=np.float32)
    out["tiny"] = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-7)  # fp16 scales go subnormal / zero
    out["denormal"] = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-30)
    out["bf16"] = to_bf16_grid((rng.standard_t(5, size=n) * 0.02).astype(np.float32))
    # a coarse grid: exact ties in every rounding step, and many flat or one-sided sub-blocks
    out["ties"] = (rng.integers(-16, 17, size=n) * 0.125).astype(np.float32)
    out["positive"] = np.abs(rng.standard_normal(n, dtype=np.float32)) + 0.5  # min > 0 paths of the K-quants
    # sub-blocks of wildly different magnitude: many 6-bit / int8 sub-scales round to 0 (the `if (!d) continue`
    # paths keep the search's levels), fp16 scales overflow for the largest
    mag = np.exp(rng.uniform(np.log(1e-6), np.log(1e6), size=(rows, cols // 16, 1))).astype(np.float32)
    out["mixed"] = (rng.standard_normal((rows, cols // 16, 16), dtype=np.float32) * mag).reshape(n)
    out["huge"] = rng.standard_normal(n, dtype=np.float32) * np.float32(1e8)
    # float32's edges, nothing a model holds: near FLT_MIN the searches' 1/range overflows, near FLT_MAX their sums do
    out["flt_min"] = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-38)
    out["flt_max"] = rng.standard_normal(n, dtype=np.float32) * np.float32(1e37)
    c = np.repeat(rng.standard_normal((rows, 1), dtype=np.float32), cols, axis=1)  # constant rows
    c[: rows // 4] = 1.0
    out["constant"] = c
    # block maxima just below / at powers of two: MXFP4's floor(log2f(amax)) rounding
    k = rng.integers(-20, 20, size=(rows, cols // 32, 1)).astype(np.float32)
    base = rng.uniform(-1, 1, size=(rows, cols // 32, 32)).astype(np.float32)
    peak = np.where(rng.random((rows, cols // 32, 1)) < 0.5, np.nextafter(np.float32(1), np.float32(0)),
                    np.float32(1)).astype(np.float32)
    base[..., :1] = peak
    out["pow2"] = (base * np.exp2(k)).astype(np.float32).reshape(n)
    return out


def real_shaped(rng: np.random.Generator, scale: int) -> dict[str, np.ndarray]:
    """Rows shaped like Qwen3-30B-A3B's experts (hidden 2048, moe_intermediate 768) and a 4096-wide row set,
    heavy-tailed and on the bf16 grid like real checkpoint weights."""
    shapes = {"qwen3 gate/up [768 x 2048]": (256 * scale, 2048), "qwen3 down [2048 x 768]": (256 * scale, 768),
              "4096-col rows": (128 * scale, 4096)}
    return {name: to_bf16_grid((rng.standard_t(4, size=s) * 0.02).astype(np.float32)) for name, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------
# comparisons


def compare_encode(oracle: Oracle, inputs: dict[str, np.ndarray], fma: Oracle | None) -> list[tuple]:
    rows = []
    for q in C_NAMES:
        n_rows = diff_rows = diff_bytes = total = fma_bytes = fma_blocks = n_blocks = 0
        dec_diff = 0
        for x in inputs.values():
            ref = oracle.quantize(q, x)
            ours = ggml_blocks.encode(q, torch.from_numpy(x)).numpy()
            bad = ref != ours
            n_rows += x.shape[0]
            diff_rows += int(bad.any(-1).sum())
            diff_bytes += int(bad.sum())
            total += ref.size
            cref = oracle.dequantize(q, ref, x.shape[-1])
            cours = ggml_blocks.decode(q, torch.from_numpy(ref), x.shape[-1]).numpy()
            dec_diff += int((cref.view(np.uint32) != cours.view(np.uint32)).sum())
            if fma is not None:
                alt = fma.quantize(q, x)
                size = GGML_QUANT_SIZES[q][1]
                fma_bytes += int((alt != ref).sum())
                blocks_differ = (alt != ref).reshape(-1, size).any(-1)
                fma_blocks += int(blocks_differ.sum())
                n_blocks += blocks_differ.size
        rows.append((q.name, n_rows, diff_rows, diff_bytes, total, dec_diff,
                     f"{fma_blocks}/{n_blocks}" if fma is not None else "-"))
    return rows


def compare_halves(oracle: Oracle, rng: np.random.Generator) -> list[tuple]:
    # every float class: random bit patterns (NaN, inf, subnormal) and the rounding boundaries of fp16
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x, rng.standard_normal(1 << 18, dtype=np.float32) * 1e-5, np.float32([65504, 65520, 65519.996])])
    out = []
    for q, bf16 in ((Q.F16, False), (Q.BF16, True)):
        ref = oracle.half_bits(x, bf16)
        ours = ggml_blocks.encode(q, torch.from_numpy(x)).numpy().view(np.uint16)
        finite = np.isfinite(x)
        bad = ref != ours
        # fp16 NaN payloads are not specified by ggml's caller contract; count them apart
        out.append((q.name, x.size, int(bad[finite].sum()), int(bad[~finite].sum())))
    return out


def bench(n_rows: int, cols: int, oracle: Oracle) -> list[tuple]:
    x = to_bf16_grid((np.random.default_rng(1).standard_t(4, size=(n_rows, cols)) * 0.02).astype(np.float32))
    t = torch.from_numpy(x)
    mb = x.nbytes / 1e6
    res = []
    for q in (Q.Q4_K, Q.Q6_K):
        ggml_blocks.encode(q, t[:64])  # warm-up
        t0 = time.perf_counter()
        raw = ggml_blocks.encode(q, t)
        t1 = time.perf_counter()
        ggml_blocks.decode(q, raw, cols)
        t2 = time.perf_counter()
        oracle.quantize(q, x)
        t3 = time.perf_counter()
        res.append((q.name, mb / (t1 - t0), mb / (t2 - t1), mb / (t3 - t2)))
    return res


def table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(f"{c:.1f}" if isinstance(c, float) else str(c) for c in r)
                                                for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_golden(oracle: Oracle, path: Path) -> None:
    rng = np.random.default_rng(20250611)
    keep = ("normal", "outliers", "zeros", "tiny", "bf16", "ties", "mixed", "pow2")
    inputs = {k: v for k, v in cases(rng, 8, 512).items() if k in keep}
    arrays: dict[str, np.ndarray] = {}
    for name, x in inputs.items():
        arrays[f"x/{name}"] = x
        for q in C_NAMES:
            arrays[f"q/{name}/{q.name}"] = oracle.quantize(q, x)
    for q in GOLDEN_DEQUANT:  # llama.cpp's dequantize_row_* of its own bytes, first 2 rows of "normal"
        arrays[f"dq/normal/{q.name}"] = oracle.dequantize(q, arrays[f"q/normal/{q.name}"][:2], 512)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist-dir", type=Path, default=Path("/tmp/llcpp_sdist"),
                    help="where the llama-cpp-python sdist is (or is downloaded and extracted)")
    ap.add_argument("--ggml-dir", type=Path, help="an existing llama.cpp ggml/ tree instead of the sdist")
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/ggml_oracle_build"))
    ap.add_argument("--rows", type=int, default=64, help="rows per synthetic case (default 64)")
    ap.add_argument("--cols", type=int, default=1024, help="columns of the synthetic cases (default 1024)")
    ap.add_argument("--real-scale", type=int, default=1, help="multiplies the real-shaped row counts (256/256/128)")
    ap.add_argument("--no-fma", action="store_true", help="skip the FMA-contracted build")
    ap.add_argument("--bench-rows", type=int, default=4096, help="rows of 2048 for the throughput run (0: skip)")
    ap.add_argument("--write-golden", action="store_true", help=f"write {GOLDEN.relative_to(REPO)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: comparable with the single-threaded C reference)")
    args = ap.parse_args()

    ggml = args.ggml_dir or find_ggml(args.sdist_dir)
    print(f"ggml sources: {ggml}")
    oracle = Oracle(build(ggml, args.build_dir, "ref"))
    fma = None if args.no_fma else Oracle(build(ggml, args.build_dir, "fma"))
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    inputs = cases(rng, args.rows, args.cols)
    inputs.update(real_shaped(rng, args.real_scale))
    print(f"cases: {', '.join(f'{k} {v.shape[0]}x{v.shape[1]}' for k, v in inputs.items())}\n")

    t0 = time.perf_counter()
    rows = compare_encode(oracle, inputs, fma)
    print(table(("type", "rows", "rows differing", "bytes differing", "bytes", "decode floats differing",
                 "FMA build: blocks differing from ref"), rows))
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    print(table(("type", "values", "differing (finite)", "differing (NaN/inf)"), compare_halves(oracle, rng)))
    if args.bench_rows:
        print(f"\nthroughput, {args.bench_rows} x 2048 float32 rows, CPU, {torch.get_num_threads()} threads; "
              "MB/s of float32 values:")
        print(table(("type", "encode MB/s", "decode MB/s", "llama.cpp C ref encode MB/s (1 thread)"),
                    bench(args.bench_rows, 2048, oracle)))
    if args.write_golden:
        write_golden(oracle, GOLDEN)


if __name__ == "__main__":
    main()
