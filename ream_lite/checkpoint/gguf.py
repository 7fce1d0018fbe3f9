"""A GGUF file (llama.cpp's format) read as the Hugging Face checkpoint it was converted from.

`read_gguf` parses the header(s) of a GGUF (or of every split `-0000k-of-0000n.gguf`) with the `gguf` package's
reader, checks that every tensor lies inside its file without overlapping another, and keeps the metadata with its
value types (so the writer can write it back). `GGUFCheckpoint` is a `CheckpointReader` over it: each GGUF tensor
under its transformers name (arch/gguf_names.py), the fused expert tensors `ffn_*_exps` as one logical tensor per
expert (a byte range: an expert is contiguous, so a range of experts is one positioned read), every one with the
"ggml" encoding (its llama.cpp type in `block`, decoded on the compute device by checkpoint/ggml_blocks.py). Kept
tensors are copied as stored, so the blocks of a Q4_K expert are written back unchanged. `gguf_config` builds the
config.json transformers needs from the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ream_lite.arch.gguf_names import ARCHES, GLOBAL_TENSORS, REFUSED, GGUFArch, rope_unpermute
from ream_lite.checkpoint.format import TensorEntry
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")
# metadata a GGUF holds per split, never carried into an output
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# ggml types whose values are plain floats (the rest are blocks)
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == SUFFIX and p.is_file()


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int  # GGMLQuantizationType value
    ne: tuple[int, ...]  # llama.cpp's dimensions, innermost first (the reverse of torch's shape)
    path: str
    start: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch's shape (outermost first)."""
        return tuple(reversed(self.ne))


@dataclass
class Field:
    """One metadata key: its value and the GGUF value type(s) it was stored with ([ARRAY, item type] for arrays)."""

    value: object
    types: tuple[int, ...]


@dataclass
class GGUFFile:
    paths: list[Path]
    arch: str
    fields: dict[str, Field]  # of the first split, less the split.* keys
    tensors: list[GGUFTensor]  # in file order (split by split)
    alignment: int

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    def arch_value(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    @property
    def header_digests(self) -> dict[str, str]:
        """Per file: sha256 of its header (metadata and tensor index): what identifies it without its data."""
        import hashlib

        out = {}
        for p in self.paths:
            start = min((t.start for t in self.tensors if t.path == str(p)), default=os.path.getsize(p))
            with open(p, "rb") as f:
                out[p.name] = hashlib.sha256(f.read(start)).hexdigest()
        return out


def split_paths(path: Path) -> list[Path]:
    """Every file of a (possibly split) GGUF, given any one of them."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise ReamLiteError(f"{path}: split GGUF is missing {', '.join(missing[:3])}")
    return paths


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and check the header(s) of the GGUF at `path` (every split when it is one)."""
    paths = split_paths(Path(path))
    fields: dict[str, Field] = {}
    tensors: list[GGUFTensor] = []
    alignment = 32
    for i, p in enumerate(paths):
        f_fields, f_tensors, align = _read_one(p)
        if i == 0:
            fields = {k: v for k, v in f_fields.items() if k not in SPLIT_KEYS}
            alignment = align
        tensors += f_tensors
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ReamLiteError(f"{path}: a tensor name appears twice")
    arch = fields.get("general.architecture")
    if arch is None or not isinstance(arch.value, str):
        raise ReamLiteError(f"{path}: no general.architecture in the GGUF metadata")
    return GGUFFile(paths, arch.value, fields, tensors, alignment)


def _read_one(p: Path) -> tuple[dict[str, Field], list[GGUFTensor], int]:
    from gguf import GGML_QUANT_SIZES, GGUFReader

    size = p.stat().st_size
    try:
        r = GGUFReader(p, "r")
        fields = {}
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            fields[name] = Field(f.contents(), tuple(int(t) for t in f.types))
        out = []
        for t in r.tensors:
            ne = tuple(int(x) for x in t.shape)
            qtype = int(t.tensor_type)
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if not ne or ne[0] % block or any(x < 0 for x in ne):
                raise ValueError(f"tensor {t.name}: {ne[0] if ne else 0} values per row is not whole "
                                 f"{t.tensor_type.name} blocks")
            out.append(GGUFTensor(t.name, qtype, ne, str(p), int(t.data_offset), int(t.n_bytes)))
        alignment = int(r.alignment)
        data_offset = int(r.data_offset)
        del r  # (its memory map)
    except ReamLiteError:
        raise
    except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors, ... on a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReamLiteError(f"{p}: not a readable GGUF file ({msg})") from None
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in out)
    end = data_offset
    for a, b, name in spans:
        if a < end or b > size:
            raise ReamLiteError(f"{p}: tensor {name} lies {'outside the file' if b > size else 'over another'} "
                                "(a truncated or corrupt GGUF)")
        end = b
    return fields, out, alignment


class GGUFCheckpoint(CheckpointReader):
    """A GGUF read through the CheckpointReader interface under transformers' tensor names (see the module)."""

    def __init__(self, path: str | os.PathLike):
        from ream_lite.checkpoint.ggml_blocks import row_bytes

        self.path = Path(path)
        self.dir = self.path.parent
        self.gguf = g = read_gguf(self.path)
        self.arch = arch_of(g, str(self.path))
        self._index = None
        self.shard_metadata = {}
        self.entries: dict[str, TensorEntry] = {}
        self.tensors: dict[str, StoredTensor] = {}
        # transformers name -> (GGUF tensor, expert index or None): where the writer puts it back
        self.source: dict[str, tuple[GGUFTensor, int | None]] = {}
        self._unpermute: dict[str, list[int]] = {}
        heads = {"self_attn.q_proj.weight": g.arch_value("attention.head_count"),
                 "self_attn.k_proj.weight": g.arch_value("attention.head_count_kv")}
        for t in g.tensors:
            names = hf_names(self.arch, t)
            if names is None:
                raise ReamLiteError(f"{self.path}: tensor {t.name} has no transformers name for GGUF architecture "
                                    f"'{g.arch}' (a newer llama.cpp layout?)")
            shape = t.shape[1:] if len(names) > 1 else t.shape
            *lead, cols = shape
            plain = FLOAT_TYPES.get(t.qtype)
            per = t.nbytes // len(names)
            for e, name in enumerate(names):
                expert = e if len(names) > 1 else None
                stored_shape = tuple(shape) if plain else (*lead, row_bytes(t.qtype, cols))
                entry = TensorEntry(t.path, plain or "U8", stored_shape, t.start + e * per, t.start + (e + 1) * per)
                self.entries[name] = entry
                self.tensors[name] = StoredTensor(name, "ggml", tuple(shape), {"": entry}, (t.qtype,))
                self.source[name] = (t, expert)
                rel = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
                if self.arch.rope_permuted and rel in heads and heads[rel]:
                    self._unpermute[name] = rope_unpermute(shape[0], int(heads[rel]))
        self.bytes_read = 0
        self._files = {}

    def _get(self, key, rows, dtype, device) -> torch.Tensor:
        x = super()._get(key, rows, dtype, device)
        perm = self._unpermute.get(key)
        if perm is not None:
            if rows is not None:
                raise ReamLiteError(f"{key}: row ranges of a rotary-permuted GGUF tensor are not supported")
            x = x[torch.tensor(perm, device=x.device)]
        return x

    def config(self) -> dict:
        return gguf_config(self.gguf, self.arch, self.tensors)


def expert_types(reader: GGUFCheckpoint) -> dict[str, int]:
    """llama.cpp type name -> how many fused expert tensors have it."""
    from gguf import GGMLQuantizationType

    out: dict[str, int] = {}
    for t in reader.gguf.tensors:
        if t.name.split(".")[-2] in {n.split(".")[0] for n in reader.arch.expert_tensors}:
            name = GGMLQuantizationType(t.qtype).name
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def describe_types(reader: GGUFCheckpoint) -> str:
    """One line for `plan`: the output's format and what becomes of merged experts' types."""
    from ream_lite.checkpoint.ggml_blocks import ENCODABLE

    counts = expert_types(reader)
    listed = ", ".join(f"{n} x{c}" for n, c in counts.items())
    from gguf import GGMLQuantizationType

    unwritable = [n for n in counts if GGMLQuantizationType[n] not in ENCODABLE]
    tail = (f"; {', '.join(unwritable)} cannot be quantized by ream-lite: only pruning without refit (--method reap "
            "--refit off) runs on it") if unwritable else "; merged experts quantized to their tensor's type as " \
        "llama.cpp's reference quantizer does"
    return f"GGUF, every tensor in its input type (expert tensors: {listed}){tail}"


def require_writable(reader: GGUFCheckpoint, new_values: bool) -> None:
    """Refuse a run that writes new expert values (merges, refit) into an expert tensor of a type ream-lite cannot
    quantize (the IQ and TQ types: their quantizers need llama.cpp's importance-matrix search)."""
    if not new_values:
        return
    from gguf import GGMLQuantizationType

    from ream_lite.checkpoint.ggml_blocks import ENCODABLE

    for t in reader.gguf.tensors:
        if "_exps." in t.name and t.qtype not in {int(q) for q in ENCODABLE}:
            raise ReamLiteError(f"{reader.path}: {t.name} is {GGMLQuantizationType(t.qtype).name}, which ream-lite "
                                "cannot quantize, and this run writes new expert values (merges or refit); pruning "
                                "copies blocks of any type: use --method reap --refit off, or a GGUF of a type "
                                "listed by `ream-lite plan`")


def arch_of(g: GGUFFile, where: str) -> GGUFArch:
    arch = ARCHES.get(g.arch)
    if arch is None:
        why = REFUSED.get(g.arch, "not an MoE architecture ream-lite maps")
        raise ReamLiteError(f"{where}: GGUF architecture '{g.arch}': {why}; readable: {', '.join(sorted(ARCHES))}")
    if arch.arch == "llama" and not g.arch_value("expert_count"):
        raise ReamLiteError(f"{where}: a dense llama GGUF (no {g.arch}.expert_count): nothing to compress")
    return arch


def hf_names(arch: GGUFArch, t: GGUFTensor) -> list[str] | None:
    """The transformers name(s) of GGUF tensor `t`: one per expert for a fused expert tensor; None if unmapped."""
    if t.name in GLOBAL_TENSORS:
        return [GLOBAL_TENSORS[t.name]]
    m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
    if not m:
        return None
    layer, rel = int(m[1]), m[2]
    prefix = f"model.layers.{layer}."
    if rel in arch.layer_tensors:
        return [prefix + arch.layer_tensors[rel]]
    if rel in arch.expert_tensors:
        n = t.ne[-1] if len(t.ne) == 3 else 0
        return [prefix + arch.expert_tensors[rel].format(e=e) for e in range(n)] or None
    return None


def gguf_config(g: GGUFFile, arch: GGUFArch, tensors: dict[str, StoredTensor]) -> dict:
    """config.json of the transformers model a GGUF holds, from its metadata (and tensor shapes where the metadata
    is silent)."""
    cfg: dict = {"model_type": arch.model_type}
    for key, hf in arch.config_keys.items():
        v = g.arch_value(key)
        if v is not None:
            cfg[hf] = v
    cfg.update(arch.fixed_config)
    if arch.num_experts_key != "num_experts" and "num_experts" in cfg:
        cfg[arch.num_experts_key] = cfg.pop("num_experts")
    theta = g.arch_value("rope.freq_base", 10000.0)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    embed = tensors.get(GLOBAL_TENSORS["token_embd.weight"])
    if embed is None:
        raise ReamLiteError(f"{g.paths[0]}: no token_embd.weight")
    cfg["vocab_size"] = embed.shape[0]
    cfg["tie_word_embeddings"] = GLOBAL_TENSORS["output.weight"] not in tensors
    if "head_dim" not in cfg and cfg.get("num_attention_heads"):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    for tok, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        v = g.get(f"tokenizer.ggml.{tok}")
        if v is not None:
            cfg[hf] = int(v)
    q = tensors.get("model.layers.0.self_attn.q_proj.weight")
    cfg["dtype"] = {"F32": "float32", "F16": "float16"}.get(FLOAT_TYPES.get(q.block[0], ""), "bfloat16") if q else \
        "bfloat16"
    cfg["architectures"] = [_CAUSAL_LM.get(arch.model_type, "")]
    return cfg


_CAUSAL_LM = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "mixtral": "MixtralForCausalLM"}


def config_bytes(g: GGUFFile, arch: GGUFArch, tensors) -> bytes:
    return json.dumps(gguf_config(g, arch, tensors), sort_keys=True).encode()
