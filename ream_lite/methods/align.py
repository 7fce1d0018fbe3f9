"""Neuron alignment of a member expert onto its centroid (Hungarian algorithm) and weighted merging."""

from __future__ import annotations

import torch

from ream_lite.lsap import solve


def activation_cost(cross: torch.Tensor, sq_c: torch.Tensor, sq_j: torch.Tensor) -> torch.Tensor:
    """C_act[p, q] = || a_c^p / |a_c^p| - a_j^q / |a_j^q| || over the same tokens, from the cross Gram A_c^T A_j and
    the per-neuron squared norms: sqrt(2 - 2 cos)."""
    cos = cross / (sq_c.clamp(min=1e-30).sqrt()[:, None] * sq_j.clamp(min=1e-30).sqrt()[None, :])
    return (2.0 - 2.0 * cos.clamp(-1.0, 1.0)).clamp(min=0.0).sqrt()


def weight_features(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Row p = [W_gate[p, :], W_up[p, :], W_down[:, p]], L2-normalised: [I, 3H]."""
    f = torch.cat([gate.float(), up.float(), down.float().T], dim=1).double()
    return f / f.norm(dim=1, keepdim=True).clamp(min=1e-30)


def weight_cost(fc: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
    """C_wt[p, q] = || f_c^p - f_j^q || (`weight_features` rows)."""
    return WeightCost(fc)(fj)


class WeightCost:
    """`weight_cost` against one centroid, for each of its members: torch.cdist's numbers, bit for bit, with the
    centroid's side of the product built once. cdist computes (beyond 25 rows) one matmul of [-2 f_c, |f_c|^2, 1]
    against [f_j, 1, |f_j|^2] and pads both operands anew on every call; at Qwen3-30B-A3B's shape (768 x 6144,
    float64) the centroid's padding was 30% of each pair's 145 ms on a 2-core CPU. Below 26 rows cdist computes the
    distances directly, and so does this."""

    MM_ROWS = 25  # (ATen's cdist: the matmul form when either side has more rows)

    def __init__(self, fc: torch.Tensor):
        self.fc = fc
        self._lhs: torch.Tensor | None = None

    def __call__(self, fj: torch.Tensor) -> torch.Tensor:
        if fj.device != self.fc.device or max(len(self.fc), len(fj)) <= self.MM_ROWS:
            return torch.cdist(self.fc, fj)
        sq = fj.pow(2).sum(-1, keepdim=True)
        return self._product(torch.cat([fj, torch.ones_like(sq), sq], -1))

    def _product(self, rhs: torch.Tensor) -> torch.Tensor:
        if self._lhs is None:
            sq = self.fc.pow(2).sum(-1, keepdim=True)
            self._lhs = torch.cat([self.fc.mul(-2), sq, torch.ones_like(sq)], -1)
        return self._lhs.matmul(rhs.mT).clamp_min_(0).sqrt_()

    def of_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """`self(weight_features(gate, up, down))`, the member's padded operand built in place in one float64
        buffer (its features, normalised there, then 1 and |f|^2): the same numbers without the float32 and float64
        copies and the padding copy (a sixth of each pair's time at Qwen3-30B-A3B's shape on a CPU)."""
        inter = up.shape[0]
        if gate.device != self.fc.device or max(len(self.fc), inter) <= self.MM_ROWS:
            return self(weight_features(gate, up, down))
        a, b = gate.shape[1], gate.shape[1] + up.shape[1]  # (a non-gated expert's gate is [I, 0])
        width = b + down.shape[0]
        rhs = torch.empty(inter, width + 2, dtype=torch.float64, device=gate.device)
        f = rhs[:, :width]
        f[:, :a].copy_(gate)  # (bf16 or float32 to float64: exact, as through float32)
        f[:, a:b].copy_(up)
        f[:, b:].copy_(down.T)
        f.div_(f.norm(dim=1, keepdim=True).clamp(min=1e-30))
        rhs[:, width] = 1.0
        rhs[:, width + 1 :] = f.pow(2).sum(-1, keepdim=True)
        return self._product(rhs)


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """perm such that member neuron perm[p] is matched to centroid neuron p (minimum total cost)."""
    return torch.from_numpy(solve(cost.double().cpu().numpy()))  # the solver the parallel pool runs too


def permute(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor):
    """Reorder an expert's intermediate neurons: gate/up rows and down columns. The function is unchanged."""
    perm = perm.to(gate.device)
    return gate[perm], up[perm], down[:, perm]


def permute_expert(expert: tuple[torch.Tensor, ...], perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`permute` for an expert's (gate, up, down[, gate_bias, up_bias, down_bias]): the gate and up biases belong to
    the neurons and move with them; the down bias is per output, so it stays."""
    out = permute(*expert[:3], perm)
    if len(expert) > 3:
        gb, ub, db = expert[3:]
        p = perm.to(gb.device)
        out = (*out, gb[p], ub[p], db)
    return out


def merge(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], coefs: list[float]):
    """sum_j coef_j * W_j for gate, up and down (and the biases, where the experts have them), in float32."""
    out = [torch.zeros_like(t, dtype=torch.float32) for t in experts[0]]
    for w, c in zip(experts, coefs):
        add_scaled(out, w, c)
    return tuple(out)


def add_scaled(out: list[torch.Tensor], w: tuple[torch.Tensor, ...], coef: float) -> None:
    """out += coef * w, part by part, in float32 (one term of `merge`, in its order)."""
    for acc, t in zip(out, w):
        acc.add_(t.float(), alpha=float(coef))
