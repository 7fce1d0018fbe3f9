"""Expert similarities from streamed statistics (see stats.py). All in [0, 1], 1 on the diagonal."""

from __future__ import annotations

import torch


def logit_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine between the experts' router-logit columns over all tokens, from the Gram matrix L^T L."""
    d = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / d[:, None] / d[None, :]).clamp(-1.0, 1.0)


def gate_logit_similarity(gram: torch.Tensor) -> torch.Tensor:
    """REAM's gate-logit similarity: L2-normalised columns, Euclidean distance D = sqrt(2 - 2 cos), 1 - D / max D.
    (||u - v||^2 = 2 - 2 cos(u, v) for unit vectors, so the Gram gives the reference's distances exactly.)"""
    dist = (2.0 - 2.0 * logit_cosine(gram)).clamp(min=0.0).sqrt()
    return 1.0 - dist / dist.max().clamp(min=1e-30)


def output_similarity(gated_out_sum: torch.Tensor) -> torch.Tensor:
    """(cos(mu_i, mu_j) + 1) / 2 for the mean gated outputs mu (sums have the same cosines as means)."""
    u = gated_out_sum / gated_out_sum.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return ((u @ u.T).clamp(-1.0, 1.0) + 1.0) / 2.0


def euclidean(features: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.double(), features.double())
