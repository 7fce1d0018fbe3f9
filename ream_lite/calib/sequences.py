"""Documents -> token sequences without padding: packed full windows, or each document's head (`--packing`).

No sequence is ever padded: a pad token would be routed like any other token and bias every statistic (the REAP
reference counts them; ream-lite does not). Packing joins documents with the tokenizer's EOS, a real document
boundary the model was trained on; "truncate" keeps documents apart and lets sequences differ in length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from ream_lite.calib.text import separator_id

PACKING_MODES = ("pack", "truncate")
MAX_TOKENIZE_BATCH = 64  # documents per tokenizer call at most: fast tokenizers parallelise a batch


def token_documents(texts: Iterable[str], tokenizer, wrap: Callable[[str], str] | None = None) -> Iterator[list[int]]:
    """Token ids of each document (wrapped first when `wrap` is given), lazily, in batches that double from 1 to
    MAX_TOKENIZE_BATCH: a small request tokenizes little more than it uses, a large one gets batched speed."""
    it, size = iter(texts), 1
    while batch := list(itertools.islice(it, size)):
        if wrap is not None:
            batch = [wrap(t) for t in batch]
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        size = min(2 * size, MAX_TOKENIZE_BATCH)


def pack_windows(
    docs: Iterable[list[int]], seq_len: int, separator: int | None, limit: int
) -> tuple[list[list[int]], int]:
    """Up to `limit` full windows of `seq_len` tokens cut from the documents joined by `separator`; the tail
    shorter than a window is dropped, never padded. Returns (windows, tokens read)."""
    windows: list[list[int]] = []
    buf: list[int] = []
    read = 0
    for ids in docs:
        if not ids:
            continue
        if read and separator is not None:
            buf.append(separator)
        buf.extend(ids)
        read += len(ids)
        start = 0
        while len(buf) - start >= seq_len and len(windows) < limit:
            windows.append(buf[start : start + seq_len])
            start += seq_len
        del buf[:start]
        if len(windows) >= limit:
            break
    return windows, read


def truncate_documents(docs: Iterable[list[int]], seq_len: int, limit: int) -> tuple[list[list[int]], int]:
    """Up to `limit` sequences, each one document's first `seq_len` tokens (shorter documents at their own length;
    under 2 tokens predicts nothing and is skipped). Returns (sequences, tokens read)."""
    out: list[list[int]] = []
    read = 0
    for ids in docs:
        read += len(ids)
        if len(ids) >= 2:
            out.append(ids[:seq_len])
            if len(out) >= limit:
                break
    return out, read


def cut_sequences(texts: Iterable[str], tokenizer, *, seq_len: int, packing: str, limit: int,
                  wrap: Callable[[str], str] | None = None) -> tuple[list[list[int]], int]:
    """Up to `limit` sequences of one domain by `packing` ("pack" or "truncate"). Returns (sequences, tokens read)."""
    docs = token_documents(texts, tokenizer, wrap)
    if packing == "pack":
        return pack_windows(docs, seq_len, separator_id(tokenizer), limit)
    return truncate_documents(docs, seq_len, limit)
