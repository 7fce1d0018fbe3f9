"""Writing a compressed GGUF: the input's metadata and tensors, with fewer experts, each tensor in its input type.

A GGUF header lists every tensor with its type, shape and offset before any data, and for a compression all of
these are known before the first layer is processed (each MoE layer keeps `n_keep` experts; the types are the
input's). So the writer lays the file out once, writes the header, and then writes each tensor (or each expert's
slot of a fused `ffn_*_exps` tensor) at its offset as the pipeline hands it over under its transformers name: kept
experts as their stored blocks, merged experts quantized to the tensor's type (checkpoint/ggml_blocks.py), the
router's kept rows. Memory: one tensor. The file sits in `<out>.partial/` until every slot is written.

Resume: the positions never move, so the record is the set of tensors written with a checksum of each, kept in the
shape of a safetensors writer's record of one open shard (resume.py stores either alike); a resumed writer lays the
file out again from the input, checks the recorded bytes, then rewrites whatever came after the record.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ream_lite import timing
from ream_lite.checkpoint import files
from ream_lite.checkpoint.gguf import SPLIT_RE, GGUFCheckpoint, GGUFTensor
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.checkpoint.writer import chunks, partial_dir, publish, start_partial
from ream_lite.errors import ReamLiteError

# metadata ream-lite adds to a GGUF it writes (llama.cpp ignores keys it does not know)
RECORD_PREFIX = "ream_lite."


@dataclass
class Slot:
    """Where one transformers-named tensor goes: a byte range of the output file."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class OutTensor:
    name: str  # llama.cpp's
    qtype: int  # GGMLQuantizationType value
    ne: tuple[int, ...]  # llama.cpp's dimensions (innermost first)
    hf: tuple[str, ...]  # the transformers tensors it holds, in order (one per expert of a fused expert tensor)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.qtype, self.ne)


@dataclass
class GGUFLayout:
    """Everything the header of the output says: the file, its metadata (written by `metadata` into llama.cpp's
    gguf writer) and its tensors in order."""

    arch: str
    file_name: str
    alignment: int
    tensors: list[OutTensor]
    metadata: Callable[[object], None]


def layout_from_gguf(reader: GGUFCheckpoint, n_keep: int | None, moe_layers: set[int],
                     record: dict[str, str | int]) -> GGUFLayout:
    """A GGUF input compressed in kind: its tensors in its order and types, the fused experts and the router of every
    MoE layer cut to `n_keep` experts; its metadata with the new expert count and a record of the compression."""
    from ream_lite.checkpoint.gguf import hf_names

    g = reader.gguf
    tensors = []
    for t in g.tensors:
        ne = t.ne
        parts = t.name.split(".", 2)
        if n_keep is not None and parts[0] == "blk" and int(parts[1]) in moe_layers:
            if parts[2] in reader.arch.cut_tensors:  # (gpt-oss's ffn_*_exps parts of its fused experts too)
                ne = (*ne[:-1], n_keep)
            elif parts[2] == reader.arch.router:
                ne = (ne[0], n_keep)
        tensors.append(OutTensor(t.name, t.qtype, ne, tuple(hf_names(reader.arch, GGUFTensor(t.name, t.qtype, ne,
                                                                                             t.path, 0, 0)))))

    def metadata(w) -> None:
        from gguf import GGUFValueType

        for key, f in g.fields.items():
            if key == "general.architecture":
                continue  # (llama.cpp's writer writes it first)
            value = n_keep if key == f"{g.arch}.expert_count" and n_keep is not None else f.value
            vtype = GGUFValueType(f.types[0])
            w.add_key_value(key, value, vtype, GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None)
        _add_record(w, record)

    return GGUFLayout(g.arch, output_name(reader), g.alignment, tensors, metadata)


def layout_from_checkpoint(layout, n_keep: int, expert_type: int, other_type: int,
                           record: dict[str, str | int]
                           ) -> tuple[GGUFLayout, dict[str, int], dict[str, list[int]], dict[str, tuple]]:
    """A safetensors checkpoint compressed into a GGUF (--out-format gguf): llama.cpp's names, tensor order and
    metadata as its converter writes them (checkpoint/gguf_export.py), the routed experts in `expert_type`, the other
    matrices in `other_type` (F16 where rows are not whole blocks), norms and routers F32. Also returns each output
    tensor's type, the row order of those llama.cpp stores permuted, and the tensors it stores as several (MLA's
    kv_b_proj: (arch.split_tensors entry, the parts' names, the config)), by transformers name."""
    from gguf import GGUFValueType

    from ream_lite.arch.gguf_names import part_name, rope_unpermute
    from ream_lite.checkpoint.gguf_export import _write_metadata, arch_for, choose_type, gguf_tensor_plan

    arch = arch_for(layout.spec.model_type)
    if any(split.experts for split in arch.split_tensors.values()):
        raise ReamLiteError(f"--out-format gguf: not supported for {layout.spec.model_type} yet (its fused experts are "
                            f"several GGUF tensors, which the output format cannot read merged experts back from); "
                            "compress to safetensors, then convert the output with llama.cpp's convert_hf_to_gguf.py")
    moe = {x.index for x in layout.moe_layers}
    tensors, types, rows, splits = [], {}, {}, {}
    cfg = layout.config
    full_cfg = {**layout.hf_config().to_dict(), **cfg} if arch.split_tensors else {}
    whole_experts = {n for n, hf in arch.expert_tensors.items() if "{e}" not in hf}  # (the selection bias)
    heads = {"self_attn.q_proj.weight": cfg.get("num_attention_heads"),
             "self_attn.k_proj.weight": cfg.get("num_key_value_heads")}
    for gname, names, shape in gguf_tensor_plan(layout, arch):
        layer = int(gname.split(".")[1]) if gname.startswith("blk.") else None
        if layer in moe and len(names) > 1:
            names, shape = names[:n_keep], (n_keep, *shape[1:])
        elif layer in moe and (gname.endswith("." + arch.router) or gname.split(".", 2)[-1] in whole_experts):
            shape = (n_keep, *shape[1:])
        qtype = choose_type(gname, shape, expert_type, other_type)
        tensors.append(OutTensor(gname, qtype, tuple(reversed(shape)), tuple(names)))
        for n in names:
            types[n] = qtype
        rel = names[0].split(".", 3)[-1]
        if arch.rope_permuted and rel in heads and heads[rel]:
            rows[names[0]] = rope_unpermute(shape[0], int(heads[rel]))
        split = arch.split_tensors.get(rel) if layer is not None else None
        if split is not None and names[0] not in splits:
            whole = names[0]
            splits[whole] = (split, [part_name(whole, g, i) for i, g in enumerate(split.parts)], full_cfg)

    def metadata(w) -> None:
        from gguf.gguf_writer import GGUFValue

        _write_metadata(w, layout, arch, GGUFValueType)
        w.kv_data[0][f"{arch.arch}.expert_count"] = GGUFValue(n_keep, GGUFValueType.UINT32)
        _add_record(w, record)

    name = Path(str(layout.path)).name + ".gguf"
    return GGUFLayout(arch.arch, name, 32, tensors, metadata), types, rows, splits


def _add_record(w, record: dict[str, str | int]) -> None:
    from gguf import GGUFValueType

    for key, value in record.items():
        w.add_key_value(RECORD_PREFIX + key, value, GGUFValueType.UINT32 if isinstance(value, int)
                        else GGUFValueType.STRING)


def nbytes_of(qtype: int, ne: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    n = 1
    for x in ne:
        n *= x
    return n // block * size


class GGUFOutputWriter:
    """The GGUF counterpart of CheckpointWriter (the same calls): writes the file `plan` lays out."""

    def __init__(self, out_dir: str | os.PathLike, plan: GGUFLayout, overwrite: bool = False,
                 resume: dict | None = None, output: OutputFormat | None = None):
        self.out_dir = Path(out_dir)
        self.output = output or OutputFormat()
        if self.output.decode_to is not None or self.output.quantize is not None:
            raise ReamLiteError("a GGUF is written as the input stores it: --out-dtype / --quantize do not apply")
        self.tmp_dir = partial_dir(self.out_dir)
        self.file = self.tmp_dir / plan.file_name
        if self.out_dir.exists() and not overwrite:
            raise ReamLiteError(f"{self.out_dir} already exists; pass --overwrite to replace it")
        self.overwrite = overwrite
        self.plan = plan
        self.bytes_written = 0
        self.written: dict[str, str] = {}  # tensor name -> checksum of its bytes
        if resume is None:
            start_partial(self.tmp_dir, overwrite)
            data_start = self._write_header()
        else:
            data_start = self._header_end()
        self.slots = self._slots(data_start)
        self.size = data_start + sum(_pad(t.nbytes, self.alignment) for t in plan.tensors)
        if resume is not None:
            rec = resume["shards"][0] if len(resume.get("shards", [])) == 1 else {}
            if rec.get("file") != self.file.name or not self.file.exists() or self.file.stat().st_size != self.size \
                    or any(self.slots.get(n) != Slot(*e["slot"]) for n, e in rec["entries"].items()):
                raise ReamLiteError(f"{self.file}: the partial output does not match its resume record; start over "
                                    "with --overwrite")
            self.written = dict(rec["sums"])
            self.bytes_written = resume["bytes_written"]
        self.f = open(self.file, "r+b")  # noqa: SIM115 (closed by finish / close_files)
        if resume is None:
            with files.reporting_full(self.file, "the output GGUF"):
                files.boundary("write", self.file)
                self.f.truncate(self.size)
        else:
            self._verify()

    @property
    def alignment(self) -> int:
        return self.plan.alignment

    # -- layout ---------------------------------------------------------------------------------------------------
    def _write_header(self) -> int:
        """Header, metadata and tensor index, as llama.cpp's gguf writer lays them out; returns where data begins."""
        from gguf import GGUFWriter

        w = GGUFWriter(self.file, self.plan.arch)
        w.data_alignment = self.alignment
        self.plan.metadata(w)
        for t in self.plan.tensors:
            w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, t.qtype)
        with files.reporting_full(self.file, "the output GGUF"):
            files.boundary("write", self.file)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            end = fout.tell()
            fout.write(b"\0" * (_pad(end, self.alignment) - end))
            w.close()
        return _pad(end, self.alignment)

    def _header_end(self) -> int:
        """Where the data of the partial output's GGUF begins (its header was written by the interrupted run)."""
        from gguf import GGUFReader

        try:
            r = GGUFReader(self.file, "r")
            start = int(r.data_offset)
            del r
            return start
        except Exception:  # noqa: BLE001 (the gguf package raises ValueError, IndexError, ... on a damaged file)
            raise ReamLiteError(f"{self.file}: the partial output's header is unreadable; start over with --overwrite"
                                ) from None

    def _slots(self, data_start: int) -> dict[str, Slot]:
        """Output tensor name (transformers') -> its byte range."""
        slots = {}
        off = data_start
        for t in self.plan.tensors:
            per = t.nbytes // len(t.hf)
            for i, name in enumerate(t.hf):
                slots[name] = Slot(off + i * per, per)
            off += _pad(t.nbytes, self.alignment)
        return slots

    # -- writing --------------------------------------------------------------------------------------------------
    def _slot(self, name: str, nbytes: int) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise ReamLiteError(f"{name}: no such tensor in the output GGUF")
        if nbytes != slot.nbytes:
            raise ReamLiteError(f"{name}: {nbytes} bytes for a {slot.nbytes}-byte slot of the output GGUF")
        return slot

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (its bytes as held) into its slot."""
        with timing.phase("write"):
            t = tensor.detach().contiguous().cpu()
            data = t.reshape(-1).view(torch.uint8).numpy().data
            slot = self._slot(name, len(data))
            crc = files.Checksum()
            self._pwrite(slot.offset, data, crc)
            self.written[name] = crc.value
            self.bytes_written += len(data)

    def add_like(self, name: str, value: torch.Tensor, like: StoredTensor) -> None:
        for k, v in self.output.encode(name, value, like).items():
            self.add(k, v)

    def copy_from(self, reader, key: str, name: str | None = None) -> None:
        """A tensor of the input as stored (its blocks), in bounded chunks; converted to its llama.cpp type when the
        output format says so (a safetensors input)."""
        name = name or key
        t = reader.entry(key)
        if not self.output.keeps_stored(name, t):
            self.add_like(name, reader.get(key), t)
            return
        for sfx, e in t.parts.items():  # (MLA's kv_b_proj: attn_k_b, then attn_v_b under its part name)
            part = t.part_name(sfx, name)
            slot = self._slot(part, e.nbytes)
            crc = files.Checksum()
            for off, n in chunks(e.nbytes):
                data = reader._read(e.path, e.start + off, n)
                with timing.phase("write"):
                    self._pwrite(slot.offset + off, data, crc)
            self.written[part] = crc.value
            self.bytes_written += e.nbytes

    def _pwrite(self, offset: int, data, crc: files.Checksum) -> None:
        self.f.seek(offset)
        files.write(self.f, data, self.file, "the output GGUF")
        crc.update(data)

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for n, s in self.slots.items() if n in self.written)

    # -- resume ---------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        files.sync(self.f, self.file, "the output GGUF")
        entries = {n: {"slot": [self.slots[n].offset, self.slots[n].nbytes]} for n in self.written}
        shard = {"file": self.file.name, "entries": entries, "sums": dict(self.written),
                 "data_bytes": self.tensor_bytes, "closed": False}
        return {"shards": [shard], "bytes_written": self.bytes_written}

    def _verify(self) -> None:
        """The recorded tensors' bytes, checked before anything is appended (damage is refused, never carried)."""
        for name, want in self.written.items():
            slot = self.slots[name]
            crc = files.Checksum()
            for off, n in chunks(slot.nbytes):
                crc.update(os.pread(self.f.fileno(), n, slot.offset + off))
            if crc.value != want:
                raise ReamLiteError(f"{self.file}: the partial output was damaged since it was written ({name}); "
                                    "start over with --overwrite")

    # -- finish ---------------------------------------------------------------------------------------------------
    def finish(self, config: dict, source_dir=None, before_publish: Callable[[], None] | None = None) -> Path:
        """Every slot written: sync, then move the directory into place (the config lives in the GGUF's metadata;
        `config` and `source_dir` are the safetensors writer's and unused here)."""
        missing = [n for n in self.slots if n not in self.written]
        if missing:
            raise ReamLiteError(f"{self.file}: {len(missing)} tensors were never written (first: {missing[0]})")
        with timing.phase("write"):
            files.sync(self.f, self.file, "the output GGUF")
            self.f.close()
            return publish(self.tmp_dir, self.out_dir, self.overwrite, before_publish)

    def close_files(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass

    def abort(self) -> None:
        self.close_files()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def output_name(reader: GGUFCheckpoint) -> str:
    """The output GGUF's file name: the input's (a split input is written as one file, named without the split)."""
    m = SPLIT_RE.match(reader.path.name)
    return m["stem"] + ".gguf" if m else reader.path.name


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align
