"""Calibration sources (`--calib SPEC`, repeatable): where documents come from and which domain each is in.

    builtin                          the built-in offline corpus: domains general, math, code
    FILE | DIR                       JSONL with `text` and optional `domain`, plain .txt (either may be .gz), or a
                                     directory of them; documents without a domain are in a domain named after
                                     the file (its stem) or the directory
    hf:PATH[:CONFIG[:SPLIT[:FIELD]]] a `datasets` dataset: a hub id (streamed, so only the documents used are
                                     downloaded), a local data file or directory, or a `save_to_disk` directory;
                                     SPLIT defaults to train, FIELD to text (`question,answer` joins several
                                     fields with a blank line); its domain is named after the dataset
    DOMAIN=SPEC                      any of the above with every document put in DOMAIN (e.g. math=hf:openai/gsm8k:
                                     main:train:question,answer), so a mix can name it

A source lists its domains up front (so `--mix` can be checked before any text is tokenized) and yields each
domain's documents lazily in an order drawn by the seed, so a run reads only what it uses.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from ream_lite.calib.builtin import BUILTIN_DOMAINS, builtin_texts
from ream_lite.calib.text import one_line, read_documents, text_suffix
from ream_lite.errors import ReamLiteError

SPEC_HELP = "'builtin', a file, a directory, or hf:PATH[:CONFIG[:SPLIT[:FIELD]]], optionally as DOMAIN=SPEC"
HF_SHUFFLE_BUFFER = 1000  # documents a streamed dataset is shuffled within (seeded): a varied start, small download
_DOMAIN_PREFIX = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


class Source:
    """One `--calib` spec: its domains in order, and each domain's documents."""

    spec: str

    def domains(self) -> list[str]:
        raise NotImplementedError

    def texts(self, domain: str, seed: int) -> Iterator[str]:
        """The domain's non-empty documents in seeded order; read lazily where the source allows."""
        raise NotImplementedError


class BuiltinSource(Source):
    """The built-in corpus (`builtin.py`); with DOMAIN=builtin, all of it taken in turn as one domain."""

    def __init__(self, spec: str = "builtin", domain: str | None = None):
        self.spec, self.domain = spec, domain

    def domains(self) -> list[str]:
        return [self.domain] if self.domain else list(BUILTIN_DOMAINS)

    def texts(self, domain: str, seed: int) -> Iterator[str]:
        if self.domain:
            return _round_robin([builtin_texts(d, seed) for d in BUILTIN_DOMAINS])
        return builtin_texts(domain, seed)


class FileSource(Source):
    """A file or directory, read whole when the source is parsed (its domains are in the documents)."""

    def __init__(self, spec: str, path: str, domain: str | None = None):
        self.spec = spec
        p = Path(path)
        suffix = text_suffix(p) if p.is_file() else None
        default = p.name[: -len(suffix)] if suffix else (p.stem if p.is_file() else p.name)
        docs = [d for d in read_documents(p, default) if d.text.strip()]
        if not docs:
            raise ReamLiteError(f"{spec}: no text (every document is empty)")
        self.by_domain: dict[str, list[str]] = {}
        for d in docs:
            self.by_domain.setdefault(domain or d.domain, []).append(d.text)

    def domains(self) -> list[str]:
        return list(self.by_domain)

    def texts(self, domain: str, seed: int) -> Iterator[str]:
        texts = list(self.by_domain[domain])
        random.Random(f"ream-lite file {seed} {domain}").shuffle(texts)
        return iter(texts)


class HFSource(Source):
    """A `datasets` dataset, opened only when its documents are first asked for."""

    def __init__(self, spec: str, body: str, domain: str | None = None):
        self.spec = spec
        parts = body.split(":")
        if len(parts) > 4 or not parts[0]:
            raise ReamLiteError(f"{spec}: expected hf:PATH[:CONFIG[:SPLIT[:FIELD]]], e.g. hf:allenai/c4:en:validation")
        path, config, split, field = (parts + [""] * 4)[:4]
        self.path, self.config, self.split = path, config or None, split or "train"
        self.fields = [f.strip() for f in (field or "text").split(",") if f.strip()]
        self.domain = domain or re.sub(r"\.(jsonl?|parquet|csv|txt)(\.gz)?$", "", path.rstrip("/").split("/")[-1])
        _import_datasets()

    def domains(self) -> list[str]:
        return [self.domain]

    def texts(self, domain: str, seed: int) -> Iterator[str]:
        ds = self._open().shuffle(seed=seed, buffer_size=HF_SHUFFLE_BUFFER)
        n = 0
        try:
            for row in ds:
                missing = [f for f in self.fields if f not in row]
                if missing:
                    raise ReamLiteError(f"{self.spec}: the dataset has no field '{missing[0]}' (fields: "
                                        f"{', '.join(row)}); name one as hf:PATH:CONFIG:SPLIT:FIELD")
                text = "\n\n".join(str(row[f]) for f in self.fields if row[f] is not None)
                if text.strip():
                    n += 1
                    yield text
        except ReamLiteError:
            raise
        except Exception as e:  # network, corrupt files, ... raised by datasets while streaming
            raise ReamLiteError(f"{self.spec}: cannot read the dataset ({one_line(e)})") from None
        if not n:
            raise ReamLiteError(f"{self.spec}: no documents with text in field(s) {', '.join(self.fields)}")

    def _open(self):
        """An IterableDataset over the split: a local file, a save_to_disk directory, a local dataset directory,
        or a hub id (streamed)."""
        datasets = _import_datasets()
        p = Path(self.path)
        try:
            if p.is_file():
                builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
                kind = builder.get(p.suffix if p.suffix != ".gz" else Path(p.stem).suffix)
                if kind is None:
                    raise ReamLiteError(f"{self.spec}: {p.name} is not .json, .jsonl, .parquet, .csv or .txt")
                return datasets.load_dataset(kind, data_files={self.split: str(p)}, split=self.split, streaming=True)
            if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise ReamLiteError(f"{self.spec}: no split '{self.split}' (splits: {', '.join(ds)})")
                    ds = ds[self.split]
                return ds.to_iterable_dataset()
            return datasets.load_dataset(self.path, self.config, split=self.split, streaming=True)
        except ReamLiteError:
            raise
        except Exception as e:
            raise ReamLiteError(f"{self.spec}: cannot load the dataset ({one_line(e)})") from None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ReamLiteError("hf: calibration sources need the 'datasets' package: pip install datasets "
                            "(or pip install 'ream-lite[hf]')") from None
    return datasets


def _round_robin(iterators: list[Iterator[str]]) -> Iterator[str]:
    """One document from each iterator in turn until all are exhausted: sources sharing a domain mix evenly."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def parse_source(spec: str) -> Source:
    """The Source a `--calib` spec names (see the module docstring); a ReamLiteError when it names nothing."""
    spec = spec.strip()
    domain, body = None, spec
    m = _DOMAIN_PREFIX.match(spec)
    if m and not Path(spec).exists():
        domain, body = m.group(1), m.group(2)
    if body == "builtin":
        return BuiltinSource(spec, domain)
    if body.startswith("hf:"):
        return HFSource(spec, body[3:], domain)
    if not Path(body).exists():
        raise ReamLiteError(f"--calib {spec}: no such file or directory (a source is {SPEC_HELP})")
    return FileSource(spec, body, domain)


def domain_texts(sources: list[Source], domain: str, seed: int) -> Iterator[str]:
    """The documents of `domain` over every source that has it, taken in turn (round robin)."""
    return _round_robin([s.texts(domain, seed) for s in sources if domain in s.domains()])
