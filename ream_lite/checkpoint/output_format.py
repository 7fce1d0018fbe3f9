"""How the output stores its tensors: as the input stored them, decoded, or quantized to bitsandbytes 4-bit.

By default every tensor is written in the encoding it was read in: kept tensors are copied byte for byte with all
their parts, and new ones (merged experts, sliced routers) are encoded like the tensor they replace, with fresh
scales, so an FP8 or MXFP4 model comes out as small as it went in and loads wherever the input loads.
`--out-dtype bf16` writes every encoded tensor decoded instead (and drops the quantization_config);
`--quantize nf4|fp4` writes the Linear weights that transformers' bitsandbytes loader quantizes in bnb's serialized
4-bit format (everything else plain), so `from_pretrained(OUT)` loads the model in 4-bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ream_lite.checkpoint import stored
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.errors import ReamLiteError

QUANTIZE_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class OutputFormat:
    decode_to: torch.dtype | None = None  # encoded input tensors are written decoded in this dtype
    quantize: str | None = None  # "nf4" | "fp4": bnb 4-bit for `quantize_keys`
    quantize_keys: frozenset[str] = field(default_factory=frozenset)  # output names of the weights to quantize
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.bfloat16  # what a bnb model computes in (its quantization_config)
    skip_modules: tuple[str, ...] = ()  # modules transformers must leave unquantized (llm_int8_skip_modules)
    # GGUF blocks (INT4 codes and scales) of values read back (`readback`), by a digest of those values: writing
    # them again writes these bytes, as the merge was quantized (re-quantizing decoded Q5_K / Q6_K or INT4 values
    # is not always idempotent: stored.REENCODE_DIFFERS)
    _written_blocks: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # --out-format gguf: every output tensor (transformers name) -> its llama.cpp type, and the row order llama.cpp
    # stores some in (Mixtral's q/k: gguf_names.rope_unpermute); written by checkpoint/gguf_writer.py
    gguf_types: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    gguf_rows: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # tensors llama.cpp stores as several (MLA's kv_b_proj): name -> (gguf_names.HeadSplit, part names, config)
    gguf_splits: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    gguf_describe: str = ""
    gguf_expert_type: int = 8  # (Q8_0) the routed experts' llama.cpp type, and the other matrices'
    gguf_other_type: int = 8

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_TYPES:
            raise ReamLiteError(f"--quantize {self.quantize}: expected one of {', '.join(QUANTIZE_TYPES)}")

    def _target(self, name: str, like: StoredTensor) -> str:
        """"bnb4" (quantize), "decoded" (write the values plain), "gguf" (a llama.cpp type) or "stored" (the
        input's encoding)."""
        if self.gguf_types:
            return "gguf"
        if self.quantize is not None and name in self.quantize_keys:
            return "bnb4"
        if like.is_encoded and (self.decode_to is not None or self.quantize is not None):
            # one quantization_config per model: quantizing to bnb decodes every other encoded tensor
            return "decoded"
        return "stored"

    def remember_blocks(self, name: str, values: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Write `parts` (the blocks of a GGUF, the parts of an INT4 weight) when `values` (their decoded values) are
        written as `name`: what `readback` does for values it encodes itself, for bytes read from a file (apply's
        refit experts)."""
        self._written_blocks[_digest(name, values)] = parts

    def layer_written(self) -> None:
        """Forget the blocks of read-back values once their layer is written (those of plans the guard did not
        choose would otherwise be held for the rest of the run)."""
        self._written_blocks.clear()

    def keeps_stored(self, name: str, like: StoredTensor) -> bool:
        """Whether tensor `like`, written as `name`, is written with exactly its stored bytes (a copy)."""
        return self._target(name, like) == "stored"

    def encode(self, name: str, value: torch.Tensor, like: StoredTensor) -> dict[str, torch.Tensor]:
        """The on-disk tensors of `value` (the values of a tensor shaped like `like`) written as `name`."""
        target = self._target(name, like)
        if target == "bnb4":
            from ream_lite.checkpoint.bnb4 import encode_bnb4

            return encode_bnb4(name, value.to(self.compute_dtype), self.quantize, blocksize=self.blocksize,
                               compress_statistics=self.double_quant)
        if target == "decoded":
            return {name: value.to(self.decode_to or self.compute_dtype)}
        if (target == "gguf" or (target == "stored" and like.encoding in stored.REENCODE_DIFFERS)) \
                and self._written_blocks:
            blocks = self._written_blocks.pop(_digest(name, value), None)
            if blocks is not None:
                return blocks
        if target == "gguf":
            if name in self.gguf_splits:
                split, names, config = self.gguf_splits[name]
                return {n: self._gguf_encode(n, p) for n, p in zip(names, split.cut(value, config))}
            return {name: self._gguf_encode(name, value)}
        return stored.encode(like, name, value)

    def _gguf_encode(self, name: str, value: torch.Tensor) -> torch.Tensor:
        from ream_lite.checkpoint.ggml_blocks import encode as encode_ggml

        qtype = self.gguf_types.get(name)
        if qtype is None:
            raise ReamLiteError(f"{name}: no llama.cpp type for this tensor of the GGUF output")
        perm = self.gguf_rows.get(name)
        if perm is not None:  # stored row perm[i] holds transformers' row i
            value = torch.empty_like(value).index_copy_(0, torch.tensor(perm, device=value.device), value)
        return encode_ggml(qtype, value.float())

    def readback(self, value: torch.Tensor, like: StoredTensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The values a reader of the output gets for `value` written as `name` (in `dtype` for encoded outputs; in
        the stored dtype for plain ones): what the engine should run so that it runs what is written."""
        target = self._target(name, like)
        if target == "stored" and not like.is_encoded:
            return value.to(like.torch_dtype)
        if target == "decoded":
            return value.to(self.decode_to or self.compute_dtype)
        parts = self.encode(name, value, like)
        out_like = like if target == "stored" else _bnb_like(name, like)
        by_suffix = {stored.part_suffix(k, name): v for k, v in parts.items()}
        if target == "gguf":  # (the values of merged experts, which are never row-permuted)
            from ream_lite.checkpoint.ggml_blocks import decode as decode_ggml

            values = decode_ggml(self.gguf_types[name], parts[name], like.shape[-1], torch.float32)
            self._written_blocks[_digest(name, values)] = parts
            return values
        if target == "stored" and like.encoding in stored.REENCODE_DIFFERS:
            # (GGUF in float32: a block's values, scale times code, are exact there, not in bf16; INT4's are bf16
            # products, exact in any compute dtype but fp16)
            values = stored.decode(out_like, by_suffix, torch.float32 if like.encoding == "ggml" else dtype)
            self._written_blocks[_digest(name, values)] = parts
            return values
        return stored.decode(out_like, by_suffix, dtype)

    def config(self, config: dict, bnb_skip: tuple[str, ...] | list[str] | None = None) -> dict:
        """config.json of the output: the quantization_config it needs (or none)."""
        out = dict(config)
        if self.quantize is not None:
            from ream_lite.checkpoint.bnb4 import bnb4_quantization_config

            out["quantization_config"] = bnb4_quantization_config(
                self.quantize, self.compute_dtype, self.blocksize, self.double_quant, list(bnb_skip or []))
        elif self.decode_to is not None:
            out.pop("quantization_config", None)
            out["torch_dtype"] = out["dtype"] = str(self.decode_to).replace("torch.", "")
            if "dtype" not in config:
                out.pop("dtype")
        return out

    @property
    def describe(self) -> str:
        if self.gguf_types:
            return self.gguf_describe or "GGUF"
        if self.quantize:
            return f"bitsandbytes {self.quantize}" + (" (double quant)" if self.double_quant else "")
        if self.decode_to is not None:
            return f"decoded to {str(self.decode_to).replace('torch.', '')}"
        return "as stored"


def _digest(name: str, value: torch.Tensor) -> tuple:
    import hashlib

    t = value.detach().contiguous().cpu()
    return name, t.dtype, tuple(t.shape), hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy().data,
                                                          digest_size=16).digest()


def _bnb_like(name: str, like: StoredTensor) -> StoredTensor:
    """A StoredTensor for `like` freshly bnb-encoded as `name` (decoding reads the rest from the parts' quant_state)."""
    return StoredTensor(name, "bnb4", like.shape, {}, None)
