"""`build_calibration`: the one entry point from calibration sources to the token sequences a compression uses."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from ream_lite.calib.chat import chat_wrapper
from ream_lite.calib.mix import allocate, holdout_counts, parse_mix
from ream_lite.calib.sequences import PACKING_MODES, cut_sequences
from ream_lite.calib.sources import Source, domain_texts, parse_source
from ream_lite.calib.text import check_vocab
from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)

# A domain's sequences are drawn by the seed from up to this many times as many candidates as it needs: enough that
# a few long documents do not fill a domain, while the text tokenized stays proportional to the request.
OVERSAMPLE = 4


@dataclass
class CalibrationSet:
    sequences: list[torch.Tensor]  # 1-D long tensors: statistics sequences first, then the n_holdout held-out ones
    tokens_per_domain: dict[str, int]  # tokens in the sequences per domain, held-out ones included; every domain
    sequences_per_domain: dict[str, int]  # of the sources listed, 0 where the mix gives it nothing
    n_holdout: int
    sources: list[str]
    mix: dict[str, float]  # normalised ratios used, over every domain of the sources
    holdout_per_domain: dict[str, int]  # of sequences_per_domain, how many are held out


def build_calibration(
    sources: list[str], tokenizer, *, num_sequences: int, seq_len: int, seed: int, mix: str | None = None,
    holdout: float = 0.0, packing: str = "pack", chat_template: bool = False, vocab_size: int | None = None,
) -> CalibrationSet:
    """`num_sequences` token sequences of at most `seq_len` tokens from `sources` (see `calib.sources`), split
    between their domains by `mix` (see `calib.mix.parse_mix`; equal shares when None).

    Per domain, the documents of every source with that domain are taken in turn, each source's in an order drawn
    by the seed, tokenized (wrapped in the chat template first with `chat_template`) and cut by `packing`; the
    domain's sequences are drawn by the seed from up to OVERSAMPLE times as many candidates. A domain with fewer
    candidates than its share gives what it has (a logged warning; the counts show it). `holdout` is the share
    of every domain's sequences, drawn by the seed, put last for the guard to judge plans on. With "truncate",
    the statistics sequences and the held-out ones are each sorted longest first, so that equal lengths are
    consecutive (the engine batches consecutive equal-length sequences). The same arguments give the same
    sequences in the same order on every machine."""
    if num_sequences < 1 or seq_len < 2:
        raise ReamLiteError("--num-sequences must be at least 1 and --seq-len at least 2")
    if packing not in PACKING_MODES:
        raise ReamLiteError(f"--packing {packing}: choose from {', '.join(PACKING_MODES)}")
    if not 0 <= holdout < 1:
        raise ReamLiteError(f"--holdout {holdout}: the held-out share must be at least 0 and below 1")
    sources = [sources] if isinstance(sources, str) else list(sources)
    srcs, ratios = _sources_and_mix(sources, mix)
    domains = list(ratios)
    wanted = allocate(num_sequences, ratios)
    wrap = chat_wrapper(tokenizer) if chat_template else None

    picked: dict[str, list[list[int]]] = {}
    for domain in domains:
        if not wanted[domain]:
            continue
        candidates, read = cut_sequences(domain_texts(srcs, domain, seed), tokenizer, seq_len=seq_len,
                                         packing=packing, limit=OVERSAMPLE * wanted[domain], wrap=wrap)
        if not candidates:
            what = f"{read} tokens, fewer than one window of {seq_len}" if packing == "pack" else \
                "no document of 2 tokens or more"
            raise ReamLiteError(f"calibration domain '{domain}' has {what}; add text, lower --seq-len, or give it 0 "
                                f"in --mix")
        n = min(wanted[domain], len(candidates))
        if n < wanted[domain]:
            log.warning("calibration domain '%s' gives only %d sequences (--seq-len %d, --packing %s), fewer than "
                        "the %d asked; using those (add text or lower --seq-len for more)",
                        domain, n, seq_len, packing, wanted[domain])
        rng = random.Random(f"ream-lite pick {seed} {domain}")
        picked[domain] = [candidates[i] for i in sorted(rng.sample(range(len(candidates)), n))]

    held_n = holdout_counts({d: len(picked.get(d, [])) for d in domains}, holdout)
    stats, held = [], []
    for domain, seqs in picked.items():
        rng = random.Random(f"ream-lite holdout {seed} {domain}")
        held_idx = set(rng.sample(range(len(seqs)), held_n[domain]))
        stats += [s for i, s in enumerate(seqs) if i not in held_idx]
        held += [s for i, s in enumerate(seqs) if i in held_idx]
    if packing == "truncate":
        stats.sort(key=len, reverse=True)  # stable: ties keep domain and document order
        held.sort(key=len, reverse=True)
    tensors = [torch.tensor(s, dtype=torch.long) for s in stats + held]
    if vocab_size is not None:
        check_vocab(tensors, vocab_size)
    return CalibrationSet(
        sequences=tensors,
        tokens_per_domain={d: sum(map(len, picked.get(d, []))) for d in domains},
        sequences_per_domain={d: len(picked.get(d, [])) for d in domains},
        n_holdout=len(held),
        sources=sources,
        mix=ratios,
        holdout_per_domain=held_n,
    )


def planned_counts(sources: list[str], *, num_sequences: int, mix: str | None = None,
                   holdout: float = 0.0) -> tuple[dict[str, int], dict[str, int]]:
    """(sequences, held-out sequences) per domain that `build_calibration` gives when every domain has text
    enough: for estimates made before anything is tokenized. Reads file sources (their domains are inside)."""
    _, ratios = _sources_and_mix(list(sources), mix)
    wanted = allocate(num_sequences, ratios)
    return wanted, holdout_counts(wanted, holdout)


def _sources_and_mix(sources: list[str], mix: str | None) -> tuple[list[Source], dict[str, float]]:
    """The parsed sources and the normalised ratio of each of their domains, in order of appearance."""
    if not sources:
        raise ReamLiteError("no calibration source; pass --calib builtin, a file, a directory or hf:DATASET")
    srcs = [parse_source(s) for s in sources]
    return srcs, parse_mix(mix, list(dict.fromkeys(d for s in srcs for d in s.domains())))
