"""A GGUF file (llama.cpp's format) read as the Hugging Face checkpoint it was converted from.

`read_gguf` parses the header(s) of a GGUF (or of every split `-0000k-of-0000n.gguf`) with the `gguf` package's
reader, checks that every tensor lies inside its file without overlapping another, and keeps the metadata with its
value types (so the writer can write it back). `GGUFCheckpoint` is a `CheckpointReader` over it: each GGUF tensor
under its transformers name (arch/gguf_names.py), the fused expert tensors `ffn_*_exps` of families whose
transformers checkpoints hold experts one by one as one logical tensor per expert (a byte range: an expert is
contiguous, so a range of experts is one positioned read), every one with the
"ggml" encoding (its llama.cpp type in `block`, decoded on the compute device by checkpoint/ggml_blocks.py). Kept
tensors are copied as stored, so the blocks of a Q4_K expert are written back unchanged. A transformers tensor
llama.cpp stores as several GGUF tensors (deepseek2's kv_b_proj: attn_k_b + attn_v_b; gpt-oss's fused experts:
gate_up_proj = ffn_gate_exps and ffn_up_exps interleaved, transposed) is one logical tensor whose stored parts are
those tensors (`GGUFArch.split_tensors`), a `JoinedTensor`: decoding it (`get`, a range of experts for gpt-oss's)
decodes each part in its own type and joins them; encoding it (a merged expert) cuts the values into the parts and
encodes each in its own type (`decode_joined` / `encode_joined`, which checkpoint/stored.py's "ggml" encoding
calls).
`gguf_config` builds the config.json transformers needs from the metadata, with llama.cpp's defaults where a key
is absent, and per architecture what its graph derives or hard-codes (`_DERIVED_CONFIG`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ream_lite.arch.gguf_names import (
    ARCHES,
    GATING_SIGMOID,
    GATING_SOFTMAX,
    GLOBAL_TENSORS,
    PART_SEP,
    REFUSED,
    GGUFArch,
    HeadSplit,
    Interleave,
    part_name,
    rope_unpermute,
)
from ream_lite.checkpoint import stored
from ream_lite.checkpoint.format import TensorEntry
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.errors import ReamLiteError


SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")
# metadata a GGUF holds per split, never carried into an output
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# ggml types whose values are plain floats (the rest are blocks)
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}


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
            block, _ = GGML_QUANT_SIZES[t.tensor_type]
            if not ne or ne[0] % block or any(x < 0 for x in ne):
                raise ValueError(f"tensor {t.name}: {ne[0] if ne else 0} values per row is not whole "
                                 f"{t.tensor_type.name} blocks")
            out.append(GGUFTensor(t.name, qtype, ne, str(p), int(t.data_offset), int(t.n_bytes)))
        alignment = int(r.alignment)
        data_offset = int(r.data_offset)
        del r  # (its memory map)
    except ReamLiteError:
        raise
    except Exception as e:  # noqa: BLE001 (the gguf package raises ValueError, IndexError, struct errors, ... on a bad file
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


@dataclass(frozen=True)
class JoinedTensor(StoredTensor):
    """A transformers tensor llama.cpp stores as several GGUF tensors (or as one, transposed): its stored parts are
    those tensors in `joined.parts` order ("" the first, `PART_SEP` + GGUF name the others), `block` the llama.cpp
    type of each, `joined` how they make the tensor (kept by `dataclasses.replace`)."""

    joined: HeadSplit | Interleave | None = field(default=None, hash=False, compare=False)


def decode_joined(t: JoinedTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The values of `t` from its parts as read (each whole, or the same run of experts of each): every part decoded
    in its own type, then joined."""
    from ream_lite.checkpoint.ggml_blocks import decode as decode_ggml

    values = []
    for sfx, qtype in zip(t.parts, t.block):
        x = parts[sfx]
        values.append(x.to(dtype) if x.dtype != torch.uint8 else decode_ggml(qtype, x, _cols(qtype, x.shape[-1]), dtype))
    return t.joined.join(values)


def encode_joined(t: JoinedTensor, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """`value` (values shaped like `t`, any run of experts) as `t`'s parts written under logical name `name`: cut as
    llama.cpp's converter cuts it, each part in its own type (llama.cpp's reference quantizer)."""
    from ream_lite.checkpoint.ggml_blocks import encode as encode_ggml

    if not isinstance(t.joined, Interleave):
        raise ReamLiteError(f"{t.path}: {t.name}: writing new values into {' + '.join(t.joined.parts)} is not "
                            "supported (only copied as stored)")
    out = {}
    for (sfx, e), qtype, v in zip(t.parts.items(), t.block, t.joined.cut(value)):
        out[stored.part_name(sfx, name)] = v.to(e.torch_dtype) if e.dtype != "U8" else encode_ggml(qtype, v)
    return out


def _cols(qtype: int, nbytes: int) -> int:
    """Values in a row of `nbytes` bytes of llama.cpp type `qtype`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return nbytes // size * block


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
        # transformers name -> (GGUF tensor, expert index or None): where the writer puts it back (a tensor
        # llama.cpp stores as several: its first part; the others are its parts `part_name(...)`)
        self.source: dict[str, tuple[GGUFTensor, int | None]] = {}
        self._unpermute: dict[str, list[int]] = {}
        split_parts: dict[str, dict[int, tuple[GGUFTensor, StoredTensor]]] = {}
        heads = {"self_attn.q_proj.weight": g.arch_value("attention.head_count"),
                 "self_attn.k_proj.weight": g.arch_value("attention.head_count_kv")}
        for t in g.tensors:
            names = hf_names(self.arch, t)
            if names is None:
                raise ReamLiteError(f"{self.path}: tensor {t.name} has no transformers name for GGUF architecture "
                                    f"'{g.arch}' (a newer llama.cpp layout?)")
            fused = t.name.startswith("blk.") and t.name.split(".", 2)[-1] in self.arch.fused_experts
            shape = t.shape[1:] if fused else t.shape
            *lead, cols = shape
            plain = FLOAT_TYPES.get(t.qtype)
            per = t.nbytes // len(names)
            part = split_part(self.arch, t.name)
            for e, name in enumerate(names):
                expert = e if fused else None
                stored_shape = tuple(shape) if plain else (*lead, row_bytes(t.qtype, cols))
                entry = TensorEntry(t.path, plain or "U8", stored_shape, t.start + e * per, t.start + (e + 1) * per)
                tensor = StoredTensor(name, "ggml", tuple(shape), {"": entry}, (t.qtype,))
                self.entries[name] = entry
                if part is not None:  # one part of a transformers tensor held by several GGUF tensors
                    split_parts.setdefault(name.split(PART_SEP)[0], {})[part[1]] = (t, tensor)
                    continue
                self.tensors[name] = tensor
                self.source[name] = (t, expert)
                rel = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
                if self.arch.rope_permuted and rel in heads and heads[rel]:
                    self._unpermute[name] = rope_unpermute(shape[0], int(heads[rel]))
        for name, found in split_parts.items():
            split = self.arch.split_tensors[name.split(".", 3)[-1]]
            if name in self.tensors:  # (llama.cpp loads one form or the other, never both)
                raise ReamLiteError(f"{self.path}: {name} is stored both whole and as {' + '.join(split.parts)} "
                                    "(a layout llama.cpp does not load)")
            missing = [p for i, p in enumerate(split.parts) if i not in found]
            if missing:
                raise ReamLiteError(f"{self.path}: {name} is stored as {' + '.join(split.parts)}, but "
                                    f"{missing[0]} is missing")
            parts = [found[i][1] for i in range(len(split.parts))]
            try:
                shape = split.shape([p.shape for p in parts])
            except (IndexError, ValueError):
                what = "[heads, rows, cols] tensors of one head count and width" if isinstance(split, HeadSplit) else \
                    "[experts, rows, cols] tensors (or [experts, rows] biases) of one shape"
                raise ReamLiteError(f"{self.path}: {' + '.join(split.parts)} of {name}: not {what} "
                                    f"({[p.shape for p in parts]})") from None
            self.tensors[name] = JoinedTensor(name, "ggml", shape, {p.name[len(name):]: p.main for p in parts},
                                              tuple(p.block[0] for p in parts), joined=split)
            self.source[name] = (found[0][0], None)
        self.bytes_read = 0
        self._files = {}
        self._ahead = None

    def _get(self, key, rows, dtype, device) -> torch.Tensor:
        t = self.tensors.get(key)
        # (a joined tensor is decoded part by part, each in its own llama.cpp type, then joined: `decode_joined`;
        # gpt-oss's by expert rows, every part indexed by expert on its first axis)
        if isinstance(t, JoinedTensor) and rows is not None and not t.joined.experts:
            raise ReamLiteError(f"{key}: row ranges of a tensor llama.cpp stores split by head are not supported")
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
        if t.name.endswith("_exps.weight"):  # (not gpt-oss's expert biases)
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
    """The transformers name(s) of GGUF tensor `t`: one per expert for a fused expert tensor; for a part of a
    transformers tensor llama.cpp stores as several (`GGUFArch.split_tensors`), the name of that part
    (`gguf_names.part_name`: the tensor's own name for its first part); None if unmapped."""
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
        template = arch.expert_tensors[rel]
        if "{e}" not in template:  # (one tensor, experts along its outermost axis: the selection bias [E], gpt-oss's
            # router bias [E] and down biases [E, H])
            return [prefix + template] if len(t.ne) <= 2 else None
        n = t.ne[-1] if len(t.ne) == 3 else 0
        return [prefix + template.format(e=e) for e in range(n)] or None
    part = split_part(arch, t.name)
    if part is not None:
        hf, i = part
        return [part_name(prefix + hf, rel, i)]
    return None


def split_part(arch: GGUFArch, gguf_name: str) -> tuple[str, int] | None:
    """(the transformers name relative to the layer, the part's index) when GGUF tensor `gguf_name` is one part of
    a transformers tensor llama.cpp stores as several; else None."""
    rel = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else None
    for hf, split in arch.split_tensors.items():
        if rel in split.parts:
            return hf, split.parts.index(rel)
    return None


def gguf_config(g: GGUFFile, arch: GGUFArch, tensors: dict[str, StoredTensor]) -> dict:
    """config.json of the transformers model a GGUF holds, from its metadata (and tensor shapes where the metadata
    is silent), such that transformers builds the model llama.cpp runs and the family spec routes as it does."""
    cfg: dict = {"model_type": arch.model_type}
    for key, hf in arch.config_keys.items():
        v = g.arch_value(key)
        if v is not None:
            cfg[hf] = v
    for hf, v in arch.config_defaults.items():
        cfg.setdefault(hf, v)
    cfg.update(arch.fixed_config)
    if arch.num_experts_key != "num_experts" and "num_experts" in cfg:
        cfg[arch.num_experts_key] = cfg.pop("num_experts")
    nextn = int(g.arch_value("nextn_predict_layers", 0) or 0)
    if nextn and isinstance(cfg.get("num_hidden_layers"), int):  # (block_count counts the NextN layers too)
        cfg["num_hidden_layers"] -= nextn
    cfg["rope_parameters"] = _rope_parameters(g)
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
    q = next((tensors[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "q_a_proj")
              if f"model.layers.0.self_attn.{n}.weight" in tensors), None)
    cfg["dtype"] = {"F32": "float32", "F16": "float16"}.get(FLOAT_TYPES.get(q.block[0], ""), "bfloat16") if q else \
        "bfloat16"
    derive = _DERIVED_CONFIG.get(arch.arch)
    if derive is not None:
        derive(g, cfg, tensors)
    cfg["architectures"] = [_CAUSAL_LM.get(cfg["model_type"], "")]
    return cfg


def _rope_parameters(g: GGUFFile) -> dict:
    """transformers' rope_parameters of llama.cpp's rope metadata (its converter writes linear and YaRN scaling)."""
    rope = {"rope_type": "default", "rope_theta": float(g.arch_value("rope.freq_base", 10000.0))}
    kind, factor = g.arch_value("rope.scaling.type"), g.arch_value("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return rope
    if kind == "linear":
        return {**rope, "rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        rope.update(rope_type="yarn", factor=float(factor))
        orig = g.arch_value("rope.scaling.original_context_length")
        if orig:
            rope["original_max_position_embeddings"] = int(orig)
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = g.arch_value(f"rope.scaling.{key}")
            if v is not None:
                rope[hf] = float(v)
        return rope
    raise ReamLiteError(f"{g.paths[0]}: rope scaling '{kind}' is not one ream-lite maps (linear, yarn)")


def _glm4moe_config(g: GGUFFile, cfg: dict, tensors: dict[str, StoredTensor]) -> None:
    """GLM-4.5: sigmoid gating only; partial rotary from rope.dimension_count; the attention's biases and q/k norms
    as its tensors say (GLM-4.5 has q/k norms, GLM-4.5-Air not)."""
    gating = g.arch_value("expert_gating_func", GATING_SIGMOID)
    if gating != GATING_SIGMOID:
        raise ReamLiteError(f"{g.paths[0]}: glm4moe with expert_gating_func {gating}: GLM-4.5's router is a sigmoid "
                            "one (2); no transformers model runs this GGUF as llama.cpp does")
    head_dim = cfg["head_dim"]
    rot = g.arch_value("rope.dimension_count") or head_dim  # (llama.cpp: all of the head when absent)
    cfg["rope_parameters"]["partial_rotary_factor"] = rot / head_dim
    cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    cfg["use_qk_norm"] = "model.layers.0.self_attn.q_norm.weight" in tensors


def _deepseek2_config(g: GGUFFile, cfg: dict, tensors: dict[str, StoredTensor]) -> None:
    """DeepSeek-V2/V3: the transformers model type by llama.cpp's gating function (softmax: deepseek_v2, sigmoid:
    deepseek_v3); latent attention's sizes from the tensors (llama.cpp's key/value lengths are those of its absorbed
    multi-query form); YaRN's mscale as llama.cpp applies it. Refuses what transformers' classes cannot run as
    llama.cpp runs it."""
    where = g.paths[0]
    gating = g.arch_value("expert_gating_func")
    if gating is None:  # llama.cpp: GGUFs from before the key (DeepSeek-V2 / V2.5), GLM-4.7-Flash by its shape
        blocks = cfg["num_hidden_layers"] + int(g.arch_value("nextn_predict_layers", 0) or 0)
        lite_glm = blocks in (47, 48) and cfg["vocab_size"] == 154880
        gating = GATING_SIGMOID if lite_glm else GATING_SOFTMAX
    if g.arch_value("attention.temperature_scale"):
        raise ReamLiteError(f"{where}: deepseek2 with attention temperature tuning (Mistral-Large-3): no transformers "
                            "DeepSeek class runs it")
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = heads  # (the metadata says 1: llama.cpp runs latent attention as multi-query)
    rope = int(cfg["qk_rope_head_dim"])
    prefix = "model.layers.0.self_attn."
    q = tensors.get(prefix + "q_b_proj.weight") or tensors.get(prefix + "q_proj.weight")
    o = tensors.get(prefix + "o_proj.weight")
    if q is None or o is None:
        raise ReamLiteError(f"{where}: deepseek2 without blk.0.attn_q_b / attn_q or attn_output")
    cfg["qk_nope_head_dim"] = q.shape[0] // heads - rope
    cfg["v_head_dim"] = o.shape[1] // heads
    cfg["head_dim"] = rope  # (as transformers' DeepSeek configs set it)
    if cfg.get("q_lora_rank") is None and prefix + "q_a_proj.weight" in tensors:
        cfg["q_lora_rank"] = tensors[prefix + "q_a_proj.weight"].shape[0]
    params = cfg["rope_parameters"]
    log_mul = g.arch_value("rope.scaling.yarn_log_multiplier")
    if params["rope_type"] == "yarn" and log_mul:
        # llama.cpp stores 0.1 * mscale_all_dim and takes mscale = mscale_all_dim (DeepSeek-V2-Lite: both 0.707)
        params["mscale"] = params["mscale_all_dim"] = float(log_mul) / 0.1
    if gating == GATING_SIGMOID:
        cfg.update(model_type="deepseek_v3", rope_interleave=True)
        return
    if gating != GATING_SOFTMAX:
        raise ReamLiteError(f"{where}: deepseek2 with expert_gating_func {gating} (neither softmax nor sigmoid): no "
                            "transformers DeepSeek class routes as it")
    # softmax: DeepSeek-V2 as transformers' deepseek_v2 runs it: never renormalised, no selection bias, and llama.cpp
    # applies groups as DeepSeek-V3 does (the sum of each group's best two), not as V2's group_limited_greedy
    if cfg.get("norm_topk_prob"):
        raise ReamLiteError(f"{where}: deepseek2 with softmax gating and expert_weights_norm: transformers' "
                            "deepseek_v2 never renormalises the top-k weights, so it cannot run this GGUF as llama.cpp "
                            "does")
    if any(k.endswith(".mlp.gate.e_score_correction_bias") for k in tensors):
        raise ReamLiteError(f"{where}: deepseek2 with softmax gating and a selection bias (exp_probs_b): transformers' "
                            "deepseek_v2 has none")
    if cfg.get("n_group", 1) > 1 and cfg.get("topk_group", 1) < cfg["n_group"]:
        raise ReamLiteError(f"{where}: deepseek2 with softmax gating and expert groups ({cfg['topk_group']} of "
                            f"{cfg['n_group']}): llama.cpp scores each group by the sum of its best two experts "
                            "(DeepSeek-V3's rule), transformers' deepseek_v2 (group_limited_greedy) by its best one; "
                            "ream-lite has no router that routes as this GGUF runs: compress the safetensors release")
    cfg.update(model_type="deepseek_v2", topk_method="greedy")


def _gpt_oss_config(g: GGUFFile, cfg: dict, tensors: dict[str, StoredTensor]) -> None:
    """gpt-oss: which layers slide (llama.cpp: attention.sliding_window_pattern, an array of flags or a period,
    by default 2: even layers sliding, odd ones full, as the releases alternate them); YaRN with its correction range
    truncated, as ggml's rope computes it; one rotary base for every layer."""
    where = g.paths[0]
    if not cfg.get("sliding_window"):
        raise ReamLiteError(f"{where}: gpt-oss without {g.arch}.attention.sliding_window (llama.cpp requires it)")
    n = cfg["num_hidden_layers"]
    pattern = g.arch_value("attention.sliding_window_pattern", 2)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) < n:
            raise ReamLiteError(f"{where}: attention.sliding_window_pattern lists {len(pattern)} layers of {n}")
        sliding = [bool(x) for x in pattern[:n]]
    else:  # (llama_hparams::set_swa_pattern, not dense-first)
        p = int(pattern)
        sliding = [p == 0 or i % p < p - 1 for i in range(n)]
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    swa_base = g.arch_value("rope.freq_base_swa")
    if swa_base is not None and float(swa_base) != cfg["rope_parameters"]["rope_theta"]:
        raise ReamLiteError(f"{where}: gpt-oss with a sliding layers' rotary base ({swa_base}) of its own: "
                            "transformers' gpt_oss has one rotary embedding for every layer")
    if cfg["rope_parameters"]["rope_type"] == "yarn":
        cfg["rope_parameters"]["truncate"] = True  # (ggml_rope_yarn_corr_dims floors / ceils the range)


_DERIVED_CONFIG = {"glm4moe": _glm4moe_config, "deepseek2": _deepseek2_config, "gpt-oss": _gpt_oss_config}
_CAUSAL_LM = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
              "mixtral": "MixtralForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
              "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

