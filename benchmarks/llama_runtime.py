"""llama.cpp as an external runtime / oracle for benchmarks.

Importable helpers
------------------
- ``llama_logits(gguf_path, token_ids, n_ctx=512)`` -> float32 ``[len(token_ids), n_vocab]``: llama.cpp's
  logits at every position (no BOS is added; the KV cache is cleared before every call).
- ``llama_generate(gguf_path, prompt_ids, n_tokens)`` -> greedy continuation (token ids, prompt excluded).
- ``llama_tokenize(gguf_path, text)`` / ``llama_detokenize(gguf_path, ids)``: llama.cpp's own tokenizer.
- ``convert_hf_to_gguf(hf_dir, outfile, outtype)``: runs llama.cpp's ``convert_hf_to_gguf.py``
  (with a fallback BPE pre-tokenizer name for vocabularies whose hash it does not know, e.g. the testbed's
  restricted Qwen vocabulary).
- ``quantize_gguf(src, dst, qtype)``: runs the ``llama-quantize`` binary.
- ``describe_gguf(path)``: metadata (big arrays shown as their length) and tensor name/shape/type.
- ``validate(gguf_paths, hf_dir, ...)``: KL(transformers || llama.cpp) and top-1 agreement.

CLI
---
    python benchmarks/llama_runtime.py MODEL.gguf --text "def main(" [--n-predict 24]
    python benchmarks/llama_runtime.py MODEL.gguf [MODEL2.gguf ...] --validate-against HF_DIR [--data eval.jsonl]
    python benchmarks/llama_runtime.py MODEL.gguf --describe [--layer 0]
    python benchmarks/llama_runtime.py --convert HF_DIR --outfile X.gguf --outtype f32
    python benchmarks/llama_runtime.py --quantize SRC.gguf --outfile X.gguf --qtype Q4_K_M

Locations (override with environment variables):
    LLAMA_CPP_DIR   llama.cpp source tree holding convert_hf_to_gguf.py and gguf-py/
    LLAMA_QUANTIZE  llama-quantize binary
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_DIR = Path(os.environ.get("LLAMA_CPP_SDIST", f"/tmp/llcpp_sdist/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"))
LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", str(SDIST_DIR / "vendor" / "llama.cpp")))
_QUANTIZE_CANDIDATES = ["/tmp/llcpp_build/bin/llama-quantize", "/tmp/llcpp_build/vendor/llama.cpp/bin/llama-quantize"]

INSTALL_HINT = (
    "llama-cpp-python is not installed. Install it (CPU build from source, ~4 min on 2 cores) with:\n"
    "  cd /work/main && . .venv/bin/activate && pip install diskcache && \\\n"
    f"  pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --no-deps --no-binary :all: -d /tmp/llcpp_sdist && \\\n"
    f"  tar xzf /tmp/llcpp_sdist/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz -C /tmp/llcpp_sdist && \\\n"
    "  CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF' \\\n"
    "  MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \\\n"
    f"  pip install --no-deps /tmp/llcpp_sdist/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION} -C build-dir=/tmp/llcpp_build"
)

QUANTIZE_HINT = (
    "llama-quantize not found (set LLAMA_QUANTIZE). Build it after the install above with:\n"
    "  cmake -S /tmp/llcpp_sdist/llama_cpp_python-0.3.36 -B /tmp/llcpp_build -DLLAMA_BUILD_TOOLS=ON && \\\n"
    "  cmake --build /tmp/llcpp_build --target llama-quantize -j2"
)

# GGML type ids for the KV cache (ggml.h: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1)
_KV_TYPES = {"f32": 0, "f16": 1}


# --------------------------------------------------------------------------------------------- runtime


def _import_llama():
    try:
        from llama_cpp import Llama
    except Exception as e:  # ImportError, or OSError when the shared library is broken
        raise RuntimeError(f"{INSTALL_HINT}\n(import failed: {e!r})") from e
    return Llama


_CACHE: dict = {}


def _get_llama(gguf_path: str, n_ctx: int, kv_type: str = "f32"):
    """One cached llama.cpp context per (file, n_ctx, kv_type); reloaded if the file changed."""
    Llama = _import_llama()
    p = str(Path(gguf_path).resolve())
    st = os.stat(p)
    key = (p, st.st_mtime_ns, st.st_size, int(n_ctx), kv_type)
    llm = _CACHE.get(key)
    if llm is None:
        for k in [k for k in _CACHE if k[0] == p]:  # drop stale contexts of the same file
            _CACHE.pop(k).close()
        kv = _KV_TYPES[kv_type]
        llm = Llama(
            model_path=p,
            logits_all=True,
            n_ctx=int(n_ctx),
            n_batch=int(n_ctx),
            n_ubatch=int(n_ctx),
            n_threads=2,
            n_threads_batch=2,
            type_k=kv,
            type_v=kv,
            verbose=False,
        )
        _CACHE[key] = llm
    return llm


def close_all() -> None:
    """Free every cached llama.cpp context (also run at exit, before the library is unloaded)."""
    while _CACHE:
        _CACHE.popitem()[1].close()


atexit.register(close_all)


def llama_logits(gguf_path: str, token_ids: list[int], n_ctx: int = 512, kv_type: str = "f32") -> np.ndarray:
    """llama.cpp logits for every position: float32 array [len(token_ids), n_vocab].

    Row i is the distribution over the token following token_ids[: i + 1] (same convention as
    transformers' ``model(ids).logits[0]``). No BOS is prepended. ``kv_type`` is the KV-cache precision
    ("f32" by default so the oracle only reflects the weight format; llama.cpp's own default is "f16").
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty")
    n_ctx = max(int(n_ctx), len(ids))
    llm = _get_llama(gguf_path, n_ctx, kv_type)
    n_vocab = llm.n_vocab()
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token ids out of range [0, {n_vocab}): {bad[:5]}")
    llm.reset()  # n_tokens = 0; eval() then removes every KV cell from position 0 on
    llm.eval(ids)
    return np.array(llm.scores[: len(ids), :], dtype=np.float32, copy=True)


def llama_generate(
    gguf_path: str,
    prompt_ids: list[int],
    n_tokens: int,
    n_ctx: int = 512,
    stop_ids: list[int] | None = None,
    kv_type: str = "f32",
) -> list[int]:
    """Greedy (argmax) continuation of prompt_ids; returns only the n_tokens new ids (fewer if a stop id is hit)."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty")
    n_ctx = max(int(n_ctx), len(ids) + int(n_tokens))
    llm = _get_llama(gguf_path, n_ctx, kv_type)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    stop = set(stop_ids or [])
    for _ in range(int(n_tokens)):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt in stop:
            break
        llm.eval([nxt])
    return out


def llama_tokenize(gguf_path: str, text: str, special: bool = False) -> list[int]:
    """llama.cpp's tokenizer, no BOS. special=True parses "<|endoftext|>" etc. as special tokens (as HF does);
    special=False tokenizes them as plain text."""
    llm = _get_llama(gguf_path, 512)
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))


def llama_detokenize(gguf_path: str, ids: list[int]) -> str:
    llm = _get_llama(gguf_path, 512)
    return llm.detokenize([int(t) for t in ids]).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------- tools

_CONVERT_SHIM = r"""
import sys, runpy
ll, pre, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, ll + "/gguf-py"); sys.path.insert(0, ll)
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        if pre == "none":
            raise
        base.logger.warning("unknown BPE pre-tokenizer hash: writing tokenizer.ggml.pre=%r instead", pre)
        return pre
base.TextModel.get_vocab_base_pre = _pre
sys.argv = [ll + "/convert_hf_to_gguf.py"] + argv
runpy.run_path(ll + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_hf_to_gguf(
    hf_dir: str, outfile: str, outtype: str = "f32", pre_tokenizer: str = "qwen2", extra_args: list[str] | None = None
) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py with its own gguf-py.

    ``pre_tokenizer`` is written as ``tokenizer.ggml.pre`` only when the converter does not recognise the
    vocabulary's pre-tokenizer hash (it hashes the token ids of a probe string, so a restricted/re-indexed
    vocabulary never matches). "qwen2" is right for any Qwen2/Qwen3 byte-level BPE; "none" disables the fallback.
    """
    conv = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
    if not conv.exists():
        raise RuntimeError(f"{conv} not found (set LLAMA_CPP_DIR).\n{INSTALL_HINT}")
    Path(outfile).parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-c",
        _CONVERT_SHIM,
        str(LLAMA_CPP_DIR),
        pre_tokenizer,
        str(hf_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(outfile),
        *(extra_args or []),
    ]
    subprocess.run(cmd, check=True)


def quantize_bin() -> str | None:
    cands = [os.environ.get("LLAMA_QUANTIZE", "")] + _QUANTIZE_CANDIDATES + [shutil.which("llama-quantize") or ""]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def quantize_gguf(src: str, dst: str, qtype: str, extra_args: list[str] | None = None, nthreads: int = 2) -> None:
    """llama-quantize [extra_args] src dst qtype nthreads (e.g. extra_args=["--allow-requantize"])."""
    qb = quantize_bin()
    if qb is None:
        raise RuntimeError(QUANTIZE_HINT)
    subprocess.run([qb, *(extra_args or []), str(src), str(dst), qtype, str(nthreads)], check=True)


def _gguf_reader(path: str):
    from gguf import GGUFReader  # the pip gguf 0.19 reads every type llama-quantize writes here (incl. MXFP4)

    return GGUFReader(path)


def describe_gguf(path: str) -> dict:
    """{"metadata": {key: value or "<array len N>"}, "tensors": [(name, shape, type)], "type_counts": {...}}"""
    from gguf import GGUFValueType

    r = _gguf_reader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            n = len(f.data)
            if n > 16:
                meta[k] = f"<array len {n}>"
                continue
        meta[k] = f.contents()
    tensors = [(t.name, [int(x) for x in t.shape], t.tensor_type.name) for t in r.tensors]
    counts: dict[str, int] = {}
    for _, _, ty in tensors:
        counts[ty] = counts.get(ty, 0) + 1
    return {"metadata": meta, "tensors": tensors, "type_counts": counts}


# --------------------------------------------------------------------------------------------- validation


def _load_sequences(data: str, tok, n_seq: int, seq_len: int) -> list[tuple[str, list[int], str]]:
    """First seq_len tokens of n_seq documents, round-robin over domains."""
    by_dom: dict[str, list[dict]] = {}
    with open(data) as f:
        for line in f:
            d = json.loads(line)
            by_dom.setdefault(d.get("domain", "all"), []).append(d)
    doms, out, i = sorted(by_dom), [], 0
    while len(out) < n_seq and any(by_dom.values()):
        dom = doms[i % len(doms)]
        i += 1
        if not by_dom[dom]:
            continue
        d = by_dom[dom].pop(0)
        ids = tok(d["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len:
            out.append((dom, ids[:seq_len], d["text"]))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def validate(
    gguf_paths: list[str],
    hf_dir: str,
    data: str | None = None,
    n_seq: int = 5,
    seq_len: int = 64,
    kv_types: tuple[str, ...] = ("f32",),
) -> list[dict]:
    """KL(transformers || llama.cpp) per token (mean / max) and top-1 agreement for each GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = data or str(Path(hf_dir).resolve().parent / "data" / "eval.jsonl")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    seqs = _load_sequences(data, tok, n_seq, seq_len)
    with torch.no_grad():
        ref = [_log_softmax(model(torch.tensor([ids])).logits[0].float().numpy()) for _, ids, _ in seqs]
    results = []
    for path in gguf_paths:
        # tokenizer agreement: llama.cpp's tokenizer on the text prefix that the HF ids decode to
        tok_ok = 0
        for _, ids, _ in seqs:
            prefix = tok.decode(ids)
            tok_ok += int(llama_tokenize(path, prefix) == list(ids))
        for kv in kv_types:
            kls, agree, maxabs = [], [], 0.0
            for (dom, ids, _), lp_ref in zip(seqs, ref):
                lg = llama_logits(path, ids, n_ctx=max(512, seq_len), kv_type=kv)
                lp = _log_softmax(lg)
                kls.append((np.exp(lp_ref) * (lp_ref - lp)).sum(-1))
                agree.append(lp_ref.argmax(-1) == lp.argmax(-1))
                maxabs = max(maxabs, float(np.abs(lp - lp_ref).max()))
            kl, ag = np.concatenate(kls), np.concatenate(agree)
            results.append(
                {
                    "gguf": path,
                    "kv": kv,
                    "n_tokens": int(kl.size),
                    "kl_mean": float(kl.mean()),
                    "kl_max": float(kl.max()),
                    "top1": float(ag.mean()),
                    "max_abs_logprob_diff": maxabs,
                    "tokenizer_match": f"{tok_ok}/{len(seqs)}",
                }
            )
    return results


# --------------------------------------------------------------------------------------------- CLI


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="GGUF file(s)")
    ap.add_argument("--text", help="prompt text (tokenized by llama.cpp's tokenizer)")
    ap.add_argument("--n-predict", type=int, default=24)
    ap.add_argument("--validate-against", metavar="HF_DIR")
    ap.add_argument("--data", help="JSONL with 'text' (and 'domain'); default HF_DIR/../data/eval.jsonl")
    ap.add_argument("--n-seq", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--kv", default="f32", help="KV cache type(s) for validation, comma-separated: f32,f16")
    ap.add_argument("--describe", action="store_true", help="print metadata and tensors (of --layer)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--convert", metavar="HF_DIR")
    ap.add_argument("--quantize", metavar="SRC_GGUF")
    ap.add_argument("--outfile")
    ap.add_argument("--outtype", default="f32", help="converter --outtype: f32, f16, bf16, q8_0, ...")
    ap.add_argument("--qtype", default="Q4_K_M", help="llama-quantize type: Q4_K_M, Q6_K, Q4_0, MXFP4_MOE, ...")
    ap.add_argument("--pre-tokenizer", default="qwen2")
    a = ap.parse_args(argv)

    if a.convert:
        convert_hf_to_gguf(a.convert, a.outfile, a.outtype, a.pre_tokenizer)
        return 0
    if a.quantize:
        quantize_gguf(a.quantize, a.outfile, a.qtype)
        return 0
    if not a.models:
        ap.error("give a GGUF file")
    if a.validate_against:
        res = validate(a.models, a.validate_against, a.data, a.n_seq, a.seq_len, tuple(a.kv.split(",")))
        print(
            f"{'gguf':48s} {'kv':4s} {'tokens':>6s} {'KL mean':>10s} {'KL max':>10s} {'top1':>7s} "
            f"{'max|dlogp|':>10s} tok"
        )
        for r in res:
            print(
                f"{Path(r['gguf']).name:48s} {r['kv']:4s} {r['n_tokens']:6d} {r['kl_mean']:10.3e} "
                f"{r['kl_max']:10.3e} {r['top1']:7.4f} {r['max_abs_logprob_diff']:10.3e} {r['tokenizer_match']}"
            )
        return 0
    for m in a.models:
        if a.describe:
            d = describe_gguf(m)
            print(f"== {m}\n-- metadata")
            for k, v in d["metadata"].items():
                print(f"{k} = {v}")
            print(f"-- tensor types: {d['type_counts']}")
            for name, shape, ty in d["tensors"]:
                if name.startswith(f"blk.{a.layer}.") or not name.startswith("blk."):
                    print(f"{name:32s} {shape!s:20s} {ty}")
            continue
        if a.text is None:
            ap.error("give --text, --describe or --validate-against")
        ids = llama_tokenize(m, a.text)
        lg = llama_logits(m, ids)[-1].astype(np.float64)
        p = np.exp(lg - lg.max())
        p /= p.sum()
        print(f"== {m}\nprompt ids ({len(ids)}): {ids}")
        print("top-5 next tokens:")
        for t in np.argsort(-p)[:5]:
            print(f"  {int(t):6d} p={p[t]:.4f} {llama_detokenize(m, [int(t)])!r}")
        gen = llama_generate(m, ids, a.n_predict)
        print(f"greedy ({a.n_predict}): {gen}\n{a.text!r} + {llama_detokenize(m, gen)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
