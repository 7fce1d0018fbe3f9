"""Choosing centroids and grouping experts around them. Ties always break towards the lower expert index."""

from __future__ import annotations

import torch


def rank_desc(score: torch.Tensor, candidates: list[int]) -> list[int]:
    """Candidates by decreasing score; equal scores in increasing index order (deterministic)."""
    return sorted(candidates, key=lambda e: (-float(score[e]), e))


def routing_groups(num_experts: int, n_group: int) -> list[list[int]]:
    """Contiguous expert groups of group-limited routing (one group when routing is not group-limited)."""
    size = num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def select_top(score: torch.Tensor, n_keep: int, n_group: int = 1) -> list[int]:
    """The n_keep best experts by score, in decreasing score order; with group-limited routing, the same number
    from every routing group (so the compressed router still has n_group equal groups)."""
    groups = routing_groups(score.numel(), n_group)
    per = n_keep // n_group
    chosen = [e for g in groups for e in rank_desc(score, g)[:per]]
    return rank_desc(score, chosen)


def pseudo_prune_groups(
    distance: torch.Tensor, centroids: list[int], group_size: int, candidates: list[int]
) -> dict[int, list[int]]:
    """REAM's pseudo-pruning grouping. Centroids in the order given (decreasing saliency) each take the nearest
    not-yet-assigned non-centroid experts among `candidates` until their group has `group_size` members (the
    centroid counts); stops when every candidate is assigned. Most centroids stay singletons."""
    groups = {c: [c] for c in centroids}
    free = [e for e in candidates if e not in groups]
    for c in centroids:
        if not free:
            break
        nearest = sorted(free, key=lambda e: (float(distance[c, e]), e))[: group_size - 1]
        groups[c].extend(nearest)
        free = [e for e in free if e not in nearest]
    if free:
        raise ValueError(f"group size {group_size} too small: {len(free)} experts left unassigned")
    return groups


def nearest_centroid_groups(distance: torch.Tensor, centroids: list[int], candidates: list[int]) -> dict[int, list[int]]:
    """Every non-centroid joins its nearest centroid (MC-SMoE style)."""
    groups = {c: [c] for c in centroids}
    for e in candidates:
        if e in groups:
            continue
        best = min(centroids, key=lambda c: (float(distance[c, e]), c))
        groups[best].append(e)
    return groups


def auto_group_size(num_experts: int, n_keep: int) -> int:
    """The paper's settings as a rule: C = 16 when removing at most 25% of 128 experts, 32 for 128 -> 64 and for
    512 -> 384, i.e. 16, doubled when more than 25% are removed, doubled again per 256 experts beyond 256;
    then at least ceil(N / N') (so every expert can be assigned) and at most N - N' + 1 (one group takes all)."""
    base = 16 * (2 if (num_experts - n_keep) > 0.25 * num_experts else 1) * max(1, num_experts // 256)
    lower = -(-num_experts // n_keep)
    return max(lower, min(base, num_experts - n_keep + 1))
