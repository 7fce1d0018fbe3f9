"""Hash-routed MoE layers (DeepSeek-V4's first layers): a token's experts are a fixed table row of its token id.

The router's scores still weight the chosen experts, but which experts a token takes is `table[token_id]`, a
[vocab, k] array of expert ids. When experts are pruned or merged, every row naming a removed expert must name a
kept one instead, and no row may name an expert twice (the model would run it twice). The rule, the same in
`compress` and in `apply` (which has no calibration data), from the kept set and the checkpoint alone: a removed
expert's slot goes to the kept expert whose router row is most similar (cosine, float64) to the removed one's and
is not in the row yet. That is the analogue of a learned router after compression, which sends the tokens of a
removed expert to the kept expert scoring highest on them; whether the removed expert was pruned or merged does not
enter (so the rule holds for every candidate the merge guard judges, greedy undos included, where a merge's members
become pruned ones).
"""

from __future__ import annotations

import torch


def similarity_order(router_weight: torch.Tensor) -> torch.Tensor:
    """[N, N] long: row e lists every expert by the cosine similarity of its router row to e's, most similar first
    (ties by index). Computed in float64 on the CPU so that every run orders the same weights alike."""
    w = router_weight.detach().to("cpu", torch.float64)
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return torch.argsort(-(w @ w.T), dim=1, stable=True)


def remap_table(table: torch.Tensor, order: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The table of the compressed layer: `table` [V, k] of original expert ids -> positions in `kept` (the
    compressed layer's experts, ascending), removed experts replaced as the module docstring says. `order`:
    `similarity_order` of the original router."""
    n = order.shape[0]
    rows = table.to("cpu", torch.long)
    k = rows.shape[1]
    position = torch.full((n,), -1, dtype=torch.long)
    position[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    # candidates of every expert: the kept experts by similarity; the first k + 1 suffice (a row holds k - 1 others)
    width = min(k + 1, len(kept))
    is_kept = position >= 0
    cand = torch.stack([order[e][is_kept[order[e]]][:width] for e in range(n)])
    removed = ~is_kept[rows]
    taken = torch.where(removed, torch.full_like(rows, -1), rows)  # the row's kept experts, filled slot by slot
    for s in range(k):
        hit = removed[:, s].nonzero().squeeze(1)
        if hit.numel() == 0:
            continue
        options = cand[rows[hit, s]]  # [R, width]
        clash = (options[:, :, None] == taken[hit][:, None, :]).any(dim=-1)
        taken[hit, s] = options[torch.arange(len(hit)), (~clash).to(torch.int8).argmax(dim=1)]
    return position[taken].to(table.dtype)
