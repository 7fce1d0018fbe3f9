"""Streaming evaluation: perplexity per domain, and KL / top-1 agreement against a reference model.

Both models are streamed layer by layer through the same engine; neither is ever held whole. With a reference,
the reference's final hidden states are kept in a store (hidden-sized, not vocabulary-sized), then the model is
streamed, and the two heads are applied batch by batch to compare the next-token distributions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.calib.text import check_vocab, domain_windows, load_tokenizer, read_documents
from ream_lite.engine.store import HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, StreamOptions
from ream_lite.errors import ReamLiteError

HEAD_BYTES = 512 * 1024**2  # float32 logits (and their log-softmax) of one head batch


@dataclass
class Tally:
    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, other: Tally) -> None:
        for k in ("tokens", "nll", "ref_nll", "kl", "agree"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self, with_reference: bool) -> dict:
        out = {"tokens": self.tokens, "perplexity": math.exp(self.nll / self.tokens), "nll": self.nll / self.tokens}
        if with_reference:
            out["reference_perplexity"] = math.exp(self.ref_nll / self.tokens)
            out["kl"] = self.kl / self.tokens
            out["top1_agreement"] = self.agree / self.tokens
        return out


@dataclass
class EvalResult:
    model: str
    reference: str | None
    seq_len: int
    domains: dict[str, dict] = field(default_factory=dict)
    overall: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _final_states(streamer: LayerStreamer, seqs: list[torch.Tensor], desc: str) -> HiddenStateStore:
    return streamer.forward_layers(streamer.embed(seqs), desc=desc)


class Evaluator:
    """Evaluation text tokenized once, and (with a reference) the reference's final hidden states streamed once,
    so that several models can be compared against the same reference without re-running it."""

    def __init__(
        self,
        data: str,
        tokenizer_source: str,
        reference: str | None = None,
        seq_len: int = 256,
        max_tokens_per_domain: int | None = None,
        options: StreamOptions | None = None,
        tokenizer: str | None = None,
    ):
        self.opts = options or StreamOptions()
        self.seq_len = seq_len
        self.reference = reference
        tok = load_tokenizer(tokenizer_source, tokenizer)
        windows = domain_windows(read_documents(data), tok, seq_len, max_tokens_per_domain)
        self.domains = list(windows)
        self.seqs = [w for d in self.domains for w in windows[d]]
        self.seq_domain = [i for i, d in enumerate(self.domains) for _ in windows[d]]
        self.tokens = sum(len(s) for s in self.seqs)
        self.n_stores = 3 if reference else 2  # a kept reference store plus the working pair
        self.ref_streamer = self.ref_states = None
        if reference:
            ref_layout = ModelLayout(reference, trust_remote_code=self.opts.trust_remote_code)
            self.vocab = int(ref_layout.config["vocab_size"])
            self.ref_streamer = LayerStreamer(ref_layout, self.opts)
            self.ref_streamer.make_plan(self.tokens, stores=self.n_stores, seq_len=seq_len)
            self.ref_states = _final_states(self.ref_streamer, self.seqs, "reference")

    def run(self, model: str | ModelLayout) -> EvalResult:
        layout = model if isinstance(model, ModelLayout) else ModelLayout(model, self.opts.trust_remote_code)
        vocab = int(layout.config["vocab_size"])
        check_vocab(self.seqs, vocab)
        if self.reference and vocab != self.vocab:
            raise ReamLiteError("the reference model has a different vocabulary size; cannot compare")
        head_tokens = max(self.seq_len, min(self.opts.tokens_per_batch, HEAD_BYTES // (vocab * 4 * 3)))
        streamer = LayerStreamer(layout, self.opts)
        streamer.make_plan(self.tokens, stores=self.n_stores, seq_len=self.seq_len)
        states = _final_states(streamer, self.seqs, "model")
        seqs = self.seqs
        tallies = [Tally() for _ in self.domains]
        ref_logits = self.ref_streamer.logits(self.ref_states, head_tokens) if self.ref_streamer else None
        with torch.inference_mode():
            for b, logits in streamer.logits(states, head_tokens):
                ids = torch.cat([seqs[i] for i in b.seqs]).view(len(b.seqs), b.length).to(logits.device)
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                target = ids[:, 1:]
                nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
                if ref_logits is not None:
                    rb, rlog = next(ref_logits)
                    assert rb == b
                    ref_logp = torch.log_softmax(rlog[:, :-1].to(logp.device), dim=-1)
                    ref_nll = -ref_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(reference || model) per position
                    agree = ref_logp.argmax(-1) == logp.argmax(-1)
                for row, i in enumerate(b.seqs):
                    t = tallies[self.seq_domain[i]]
                    t.tokens += b.length - 1
                    t.nll += float(nll[row].double().sum())
                    if ref_logits is not None:
                        t.ref_nll += float(ref_nll[row].double().sum())
                        t.kl += float(kl[row].double().sum())
                        t.agree += int(agree[row].sum())
        states.close()
        layout.close()
        result = EvalResult(model=str(layout.path), reference=self.reference, seq_len=self.seq_len)
        total = Tally()
        for d, t in zip(self.domains, tallies):
            result.domains[d] = t.summary(self.reference is not None)
            total.add(t)
        result.overall = total.summary(self.reference is not None)
        return result

    def close(self) -> None:
        if self.ref_states is not None:
            self.ref_states.close()


def evaluate(
    model: str,
    data: str,
    reference: str | None = None,
    seq_len: int = 256,
    max_tokens_per_domain: int | None = None,
    options: StreamOptions | None = None,
    tokenizer: str | None = None,
) -> EvalResult:
    layout = ModelLayout(model, (options or StreamOptions()).trust_remote_code)  # fails early on a bad model
    ev = Evaluator(data, str(layout.path), reference, seq_len, max_tokens_per_domain, options, tokenizer)
    try:
        return ev.run(layout)
    finally:
        ev.close()


def format_result(r: EvalResult) -> str:
    ref = r.reference is not None
    head = f"{'domain':<12}{'tokens':>10}{'ppl':>11}"
    if ref:
        head += f"{'ref ppl':>11}{'KL':>10}{'top-1':>8}"
    lines = [head]
    for name, s in [*r.domains.items(), ("overall", r.overall)]:
        line = f"{name:<12}{s['tokens']:>10,}{s['perplexity']:>11.3f}"
        if ref:
            kl = f"{s['kl']:.4f}" if s["kl"] >= 1e-3 or s["kl"] == 0 else f"{s['kl']:.1e}"  # small KL: significant
            line += f"{s['reference_perplexity']:>11.3f}{kl:>10}{s['top1_agreement']:>8.3f}"
        lines.append(line)
    return "\n".join(lines)
