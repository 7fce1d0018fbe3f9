"""bitsandbytes 4-bit (NF4 / FP4) weights as transformers serializes them, in plain torch (bitsandbytes not needed).

A weight W of shape S (any dtype) quantized by bitsandbytes' `Linear4bit` is stored as these tensors, for `X.weight`:

    X.weight                                   uint8 [ceil(n / 2), 1]    two 4-bit codes per byte, first one high
    X.weight.absmax                            float32 [nb]              max |w| of each block of `blocksize`
                                                                         consecutive elements of W flattened
                                               (uint8 [nb] with double quant: the absmax, less their mean,
                                               8-bit quantized in blocks of 256)
    X.weight.quant_map                         float32 [16]              the code's values, indexed by 4-bit code
    X.weight.nested_absmax                     float32 [ceil(nb / 256)]  (double quant only)
    X.weight.nested_quant_map                  float32 [256]             (double quant only) the 8-bit dynamic code
    X.weight.quant_state.bitsandbytes__<type>  uint8 [len]               UTF-8 JSON: quant_type, blocksize, dtype
                                                                         and shape of W (+ nested_blocksize,
                                                                         nested_dtype, nested_offset)

(n = W.numel(), nb = ceil(n / blocksize)). Element i decodes to quant_map[code_i] * absmax[i // blocksize].

Rounding follows bitsandbytes' reference (CPU) quantizer: each element is scaled by the reciprocal of its block's
absmax and given the code of the nearest value, ties going to the smaller value; the packed bytes, absmax,
quant_map and JSON written here are bit for bit those of `bitsandbytes.functional.quantize_4bit` (tests prove it).
For double quant, bitsandbytes' own 8-bit search is approximate (its CPU kernel picks a neighbour of the nearest
code for about 0.2% of values); here the 8-bit codes of the absmax are exactly the nearest, so they can differ from
bitsandbytes' in those few places (never farther from the true absmax). Every stored part is self-describing
(quant_map, nested_quant_map and offset are in the file), so either decodes with either implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import torch

from ream_lite.checkpoint.format import shape_numel
from ream_lite.errors import ReamLiteError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' kernels accept
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256, whatever the weight's blocksize
STATE_PREFIX = ".quant_state.bitsandbytes__"
# companion parts of a weight key, in the order bitsandbytes writes them
BNB4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                 STATE_PREFIX + "nf4", STATE_PREFIX + "fp4")

# NF4: the 16 quantiles of N(0, 1) of QLoRA (arXiv 2305.14314), normalised to [-1, 1], in code order (sorted).
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2 as bitsandbytes defines it): code bit 3 is the sign; the three
# low bits give 0, 0.0625 (subnormal), 8, 12, 4, 6, 2, 3; divided by 12 so the largest magnitude is 1.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def quant_map(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of code 0..15 (what bitsandbytes stores as `quant_map`)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        # computed as a float32 division by the largest magnitude, so the values are those bitsandbytes writes
        return torch.tensor(_FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES), dtype=torch.float32) / 12.0
    raise ReamLiteError(f"bnb 4-bit quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers, arXiv 1511.04561), used for double-quant statistics:
    for decade e = 0..6, 2**e values evenly spread over (0.1, 1) x 10**(e-6) (midpoints of 2**e + 1 float32
    edges), both signs, plus 0 and 1; sorted, float32."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (e - 6)) * mids  # float32 products, exactly as the reference builds them
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_codes(scaled: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index into `values` of the value nearest to each of `scaled`, ties to the smaller value (int64).

    Searching the float32 midpoints of the sorted values is the reference quantizer's rounding; sorting is stable
    so that, of FP4's +0 and -0, the code listed first (+0) is the one found."""
    order = torch.sort(values, stable=True).indices
    s = values[order]
    bounds = (s[:-1] + s[1:]) / 2
    pos = torch.searchsorted(bounds, scaled.contiguous(), right=False)  # bounds[pos-1] < x <= bounds[pos]
    return order[pos]


def _blocks_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat padded with zeros to whole blocks, viewed [nb, blocksize]; max |x| of each block, float32)."""
    pad = -flat.numel() % blocksize
    if pad:
        # zeros never raise a block's max |x|, and the codes of the padding are dropped
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _state_json(state: dict) -> torch.Tensor:
    # json.dumps' default separators: the bytes bitsandbytes' pack_dict_to_tensor writes
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_bnb4(name: str, weight: torch.Tensor, quant_type: str, blocksize: int = 64,
                compress_statistics: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `weight` quantized to bnb 4-bit and stored under key `name` (e.g. `X.weight`):
    `name` (packed codes), `name.absmax`, `name.quant_map`, [`name.nested_absmax`, `name.nested_quant_map`],
    `name.quant_state.bitsandbytes__<quant_type>`, exactly as transformers saves a `Linear4bit` whose weight
    was `weight` (the JSON records `weight.dtype` and shape: pass the dtype the model computes in)."""
    code = quant_map(quant_type)
    if blocksize not in BLOCKSIZES:
        raise ReamLiteError(f"bnb 4-bit blocksize {blocksize}: expected one of {BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ReamLiteError(f"{name}: bnb 4-bit quantizes float32/float16/bfloat16 weights, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks, absmax = _blocks_absmax(flat, blocksize)
    # multiply by the reciprocal (as the reference does); the clamp only keeps all-zero blocks at 0 instead of NaN
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0).reshape(-1)
    # blocks are whole (blocksize is even), so an odd count keeps one padding zero: it packs as the code of 0
    scaled = scaled[: n + (n % 2)]
    codes = _nearest_codes(scaled, code).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)

    state: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": _dtype_name(weight.dtype),
                   "shape": list(weight.shape)}
    out = {name: packed}
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, nested_absmax = _quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
        out[name + ".absmax"] = qabsmax
        out[name + ".quant_map"] = code
        out[name + ".nested_absmax"] = nested_absmax
        out[name + ".nested_quant_map"] = dynamic_map()
        # offset.item(): the float32 mean as a Python float, which reads back as the same float32
        state |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset.item()}
    else:
        out[name + ".absmax"] = absmax
        out[name + ".quant_map"] = code
    out[name + STATE_PREFIX + quant_type] = _state_json(state)
    return out


def _quantize_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic code: (uint8 codes [n], float32 absmax [ceil(n / bs)])."""
    n = x.numel()
    blocks, absmax = _blocks_absmax(x.float(), blocksize)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:n]
    return _nearest_codes(scaled, dynamic_map()).to(torch.uint8), absmax


def _dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = codes.numel()
    v = code.float()[codes.reshape(-1).long()]
    blocks, _ = _blocks_absmax(v, blocksize)
    return (blocks * absmax.float()[:, None]).reshape(-1)[:n]


def read_quant_state(t: torch.Tensor) -> dict:
    """The JSON of a packed `quant_state.bitsandbytes__*` tensor."""
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReamLiteError("bnb 4-bit quant_state is not JSON") from None


def state_dtype(state: dict) -> torch.dtype | None:
    """The dtype a quant_state records ("bfloat16", or "torch.bfloat16" as some writers put it), if it is one."""
    dtype = getattr(torch, str(state.get("dtype", "")).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def decode_bnb4(parts: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values of a bnb 4-bit weight from its parts (suffix -> tensor: "" the packed codes, ".absmax",
    ".quant_map", ".quant_state.bitsandbytes__nf4|fp4", and for double quant ".nested_absmax",
    ".nested_quant_map"), shaped as the quant_state says, in `dtype` (None: the dtype recorded there)."""
    state_key = [s for s in parts if s.startswith(STATE_PREFIX)]
    if len(state_key) != 1:
        raise ReamLiteError(f"bnb 4-bit weight needs exactly one quant_state part, got {sorted(parts)}")
    state = read_quant_state(parts[state_key[0]])
    try:
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        stored_dtype = state_dtype(state) or torch.float32
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ReamLiteError(f"bnb 4-bit quant_state lacks shape / blocksize / dtype: {state}") from None
    n = shape_numel(shape)
    code = parts[".quant_map"].float() if ".quant_map" in parts else quant_map(state_key[0].rsplit("__", 1)[1])
    absmax = parts[".absmax"]
    if ".nested_absmax" in parts:
        absmax = _dequantize_8bit(absmax, parts[".nested_absmax"], parts[".nested_quant_map"],
                                  int(state.get("nested_blocksize", NESTED_BLOCKSIZE)))
        # the offset went through a float32 mean and a JSON double; float32 again gives it back exactly
        absmax = absmax + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    absmax = absmax.float()
    # other quant_storage dtypes (bf16, fp32 ... for FSDP) hold the same bytes
    packed = parts[""].contiguous().reshape(-1).view(torch.uint8)
    if packed.numel() * 2 < n or absmax.numel() * blocksize < n:
        raise ReamLiteError(f"bnb 4-bit weight of shape {shape}: {packed.numel()} packed bytes and "
                            f"{absmax.numel()} blocks of {blocksize} do not cover it")
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    blocks, _ = _blocks_absmax(code[codes], blocksize)
    w = (blocks * absmax[: blocks.shape[0], None]).reshape(-1)[:n].reshape(shape)
    dtype = dtype or stored_dtype
    return w if dtype == torch.float32 else w.to(dtype)


def group_bnb4_keys(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """The bnb 4-bit weights among checkpoint `keys`: weight key -> {suffix: checkpoint key} ("" the packed
    codes), for every key that has a `quant_state.bitsandbytes__*` companion. Keys not in the result are plain."""
    keyset = set(keys)
    out: dict[str, dict[str, str]] = {}
    for k in keyset:
        for fmt in QUANT_TYPES:
            if k.endswith(STATE_PREFIX + fmt):
                base = k[: -len(STATE_PREFIX + fmt)]
                if base in keyset:
                    out[base] = {"": base} | {s: base + s for s in BNB4_SUFFIXES if base + s in keyset}
    return out


def bnb4_part_suffixes(key: str, keys: Iterable[str]) -> list[str]:
    """The suffixes ("" first) of the parts of weight `key` present among `keys` ([] if `key` is not bnb 4-bit)."""
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    if not any(key + STATE_PREFIX + fmt in keyset for fmt in QUANT_TYPES):
        return []
    return [""] + [s for s in BNB4_SUFFIXES if key + s in keyset]


def is_bnb4_packed(config: dict) -> bool:
    """Whether a config.json (dict) describes a bitsandbytes 4-bit checkpoint."""
    q = config.get("quantization_config") or {}
    return (q.get("quant_method") == "bitsandbytes"
            and bool(q.get("load_in_4bit", q.get("_load_in_4bit", False))))


def bnb4_quantization_config(quant_type: str, compute_dtype: torch.dtype | str = torch.bfloat16,
                             blocksize: int = 64, double_quant: bool = False,
                             skip_modules: Iterable[str] | None = None) -> dict:
    """The `quantization_config` of config.json for a bnb 4-bit checkpoint, as transformers'
    `BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()` writes it, so `from_pretrained` loads the model in
    4-bit. `blocksize` is only checked: transformers has no field for it (each weight's quant_state carries its
    own). `skip_modules` (llm_int8_skip_modules): None lets transformers skip its defaults (output embeddings,
    tied and last modules); a list replaces them, so it must name every module written unquantized that would
    otherwise become Linear4bit (see `bnb4_skip_modules`)."""
    quant_map(quant_type)  # validates
    if blocksize not in BLOCKSIZES:
        raise ReamLiteError(f"bnb 4-bit blocksize {blocksize}: expected one of {BLOCKSIZES}")
    compute = compute_dtype if isinstance(compute_dtype, str) else _dtype_name(compute_dtype)
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None if skip_modules is None else sorted(set(skip_modules)),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


# -- which weights transformers turns into Linear4bit ---------------------------------------------------------------

def _skipped(module_name: str, patterns: Iterable[str]) -> bool:
    """transformers' rule for llm_int8_skip_modules entries: a pattern skips a module when it matches, as a regex,
    from the start of the name up to a dot boundary ("layers.1" skips "layers.1.mlp", not "layers.11"), or when
    the name ends with it ("o_proj" skips every o_proj)."""
    for p in patterns:
        if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module_name) or module_name.endswith(p):
            return True
    return False


def _meta_model(hf_config):
    """The model of `hf_config` on the meta device, with the module swaps transformers makes before loading a
    pre-quantized bitsandbytes checkpoint (e.g. Llama-4's fused experts become per-expert Linear modules)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        try:  # the table lives in transformers; absent in versions that patch nothing
            from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as patches
        except ImportError:
            patches = {}
        for name, module in list(model.named_modules()):
            spec = patches.get(type(module).__name__)
            if spec and "bitsandbytes" in [str(getattr(m, "value", m)) for m in spec["quantization_methods"]]:
                parent, _, child = name.rpartition(".")
                model.get_submodule(parent)._modules[child] = spec["module_name"](hf_config.get_text_config())
    return model


def _default_skips(model) -> set[str]:
    """The modules transformers leaves unquantized when llm_int8_skip_modules is None: tied weights, the module of
    the last parameter, and the output embeddings (lm_head)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied) | set(tied.values())
    names.add(list(model.named_parameters())[-1][0])
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        names |= {n for n, m in model.named_modules() if m is out_emb}
    return {n.removesuffix(".weight") for n in names}


def bnb4_skip_modules(hf_config) -> list[str]:
    """transformers' default llm_int8_skip_modules for this config (what it skips when the config names none)."""
    return sorted(_default_skips(_meta_model(hf_config)))


def bnb4_target_keys(hf_config, skip_modules: Iterable[str] | None = None) -> set[str]:
    """Checkpoint keys (`<module>.weight`) of the weights that transformers' bitsandbytes loader turns into
    `Linear4bit` for a model of `hf_config` with llm_int8_skip_modules = `skip_modules` (None: transformers'
    defaults). Found in the real module tree built on `meta`: modules whose type is exactly `nn.Linear` (so fused
    3-D expert parameters and routers held as plain parameters stay unquantized), minus skipped modules and the
    model's `_keep_in_fp32_modules`. GPT-2 style `Conv1D` (transposed, which transformers also converts) is not
    included: no MoE family uses it."""
    model = _meta_model(hf_config)
    return _target_keys(model, _default_skips(model) if skip_modules is None else skip_modules)


def bnb4_targets_and_skips(hf_config) -> tuple[set[str], list[str]]:
    """(`bnb4_target_keys`, `bnb4_skip_modules`) of `hf_config` with transformers' default skips, from one build of
    the model on `meta` (a large model's takes seconds)."""
    model = _meta_model(hf_config)
    skips = _default_skips(model)
    return _target_keys(model, skips), sorted(skips)


def _target_keys(model, skip_modules: Iterable[str]) -> set[str]:
    skips = set(skip_modules) | set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return {f"{name}.weight" for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and not _skipped(name, skips)}
