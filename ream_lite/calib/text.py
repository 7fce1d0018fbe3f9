"""Reading text files (JSONL with `text` and optional `domain`, or plain .txt) and cutting token windows."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ream_lite.errors import ReamLiteError


@dataclass
class Document:
    text: str
    domain: str


TEXT_SUFFIXES = (".jsonl", ".json", ".txt")


def text_suffix(path: str | Path) -> str | None:
    """The suffix that says how a file is read (".jsonl", ".json", ".txt", or one of them + ".gz"), or None."""
    name = Path(path).name
    plain = name.removesuffix(".gz")
    return next((s + name[len(plain):] for s in TEXT_SUFFIXES if plain.endswith(s) and len(plain) > len(s)), None)


def read_documents(path: str | Path, default_domain: str = "all") -> list[Document]:
    """JSONL lines {"text": ..., "domain": ...} or a plain text file (one document), either optionally gzipped
    (`.jsonl.gz`, `.txt.gz`); a directory of them. Documents without a domain get `default_domain`."""
    p = Path(path)
    if not p.exists():
        raise ReamLiteError(f"{path}: no such file or directory")
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if text_suffix(q) and q.is_file())
        if not files:
            raise ReamLiteError(f"{path}: directory holds no .jsonl or .txt files")
        return [d for f in files for d in read_documents(f, default_domain)]
    suffix = text_suffix(p) or p.suffix
    try:
        raw = gzip.decompress(p.read_bytes()).decode("utf-8") if suffix.endswith(".gz") else p.read_text("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ReamLiteError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if suffix.startswith((".jsonl", ".json")):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ReamLiteError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
            docs.append(Document(str(text), str(obj.get("domain") or default_domain)))
        if not docs:
            raise ReamLiteError(f"{path}: no documents")
        return docs
    return [Document(raw, default_domain)]


def one_line(e: BaseException) -> str:
    """An exception as "Type: first line of its message", for one-line errors from other libraries."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def load_tokenizer(model_dir: str | Path, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    src = tokenizer or str(model_dir)
    try:
        if tokenizer is None and Path(src).is_file():  # a GGUF: transformers builds its tokenizer from the metadata
            return AutoTokenizer.from_pretrained(str(Path(src).parent), gguf_file=Path(src).name)
        return AutoTokenizer.from_pretrained(src)
    except BaseException as e:  # (the tokenizers library panics, a BaseException, on some vocabularies)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ReamLiteError(f"{src}: cannot load a tokenizer ({one_line(e)}); pass --tokenizer") from None


def separator_id(tok) -> int | None:
    """The token placed between joined documents: EOS (Qwen's <|endoftext|>) when the tokenizer has one."""
    return tok.eos_token_id if tok.eos_token_id is not None else None


def check_vocab(sequences: list[torch.Tensor], vocab_size: int) -> None:
    if max(int(s.max()) for s in sequences) >= vocab_size:
        raise ReamLiteError(f"the tokenizer produces ids beyond the model's vocabulary ({vocab_size})")


def domain_windows(
    docs: list[Document], tok, seq_len: int, max_tokens_per_domain: int | None = None
) -> dict[str, list[torch.Tensor]]:
    """Per domain: documents tokenized, joined with the separator, cut into non-overlapping windows of seq_len
    (the last window may be shorter; windows under 2 tokens predict nothing and are dropped)."""
    if seq_len < 2:
        raise ReamLiteError("--seq-len must be at least 2")
    sep = separator_id(tok)
    streams: dict[str, list[int]] = defaultdict(list)
    for d in docs:
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        s = streams[d.domain]
        if s and sep is not None:
            s.append(sep)
        s.extend(ids)
    out: dict[str, list[torch.Tensor]] = {}
    for domain in sorted(streams):
        s = streams[domain][:max_tokens_per_domain] if max_tokens_per_domain else streams[domain]
        wins = [torch.tensor(s[i : i + seq_len], dtype=torch.long) for i in range(0, len(s), seq_len)]
        wins = [w for w in wins if len(w) >= 2]
        if wins:
            out[domain] = wins
    if not out:
        raise ReamLiteError("no text to evaluate (every document was empty)")
    return out
