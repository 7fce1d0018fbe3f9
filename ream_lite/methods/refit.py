"""Least-squares refit of a kept expert's down projection: the pure tensor parts (the engine feeds the tokens).

A compressed MoE block's routed output is linear in every kept expert's down projection (and down bias):

    y_hat(x) = sum over kept j chosen by x of  W_j f_j(x),   f_j(x) = [g_j(x) a_j(x) ; g_j(x)]

with a_j(x) = act(W_gate x) * (W_up x) the expert's intermediate activation and g_j(x) the weight the restricted
router gives it (Llama-4 scales the expert's input instead: f_j(x) = [a_j(g x) ; 1]). The bias column exists only
for families whose experts have biases. Fitting every W_j so that y_hat matches the original block's output y on
the calibration tokens is a ridge least-squares problem; block coordinate descent solves it one expert at a time
against the running residual r = y - y_hat:

    W_j <- argmin  sum over tokens of j ||r + W_j f_j - W f_j||^2 + lam_j ||W - W0_j||^2
         = (C_j + lam_j W0_j) (G_j + lam_j I)^-1,    G_j = sum f_j f_j^T,  C_j = sum (r + W_j f_j) f_j^T

W0_j is the plan's (unfitted) expert: the ridge pulls towards it, so a large ridge changes nothing and a layer whose
output the plan already reproduces is left as it is. lam_j = ridge * mean(diag G_j) makes the ridge independent of
the token count and of the activations' scale. Sweeping the experts repeatedly converges to the joint solution of
all kept experts at once (Gauss-Seidel on a positive definite system).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ream_lite.engine.experts import ExpertWeights, expert_intermediate


def refit_features(w: ExpertWeights, j: int, x: torch.Tensor, weight: torch.Tensor, act: Callable,
                   scale_input: bool = False) -> torch.Tensor:
    """f_j(x) for tokens x [T, H] routed to the j-th expert of the chunk with router weights `weight` [T]: float32
    [T, I] (or [T, I + 1] with the bias column where the experts have a down bias)."""
    if scale_input:  # Llama-4: E(w * x), the scaled input rounded to x's dtype as the model does
        a = expert_intermediate(w, j, x * weight[:, None].to(x.dtype), act).float()
        c = torch.ones_like(weight, dtype=torch.float32)
    else:
        c = weight.float()
        a = expert_intermediate(w, j, x, act).float() * c[:, None]
    return torch.cat([a, c[:, None]], dim=1) if w.down_bias is not None else a


def down_matrix(w: ExpertWeights, j: int) -> torch.Tensor:
    """The j-th expert's [H, I] down projection (with its bias as a last column where it has one), float32."""
    d = w.down[j].float()
    return torch.cat([d, w.down_bias[j].float()[:, None]], dim=1) if w.down_bias is not None else d


def ridge_lambda(gram: torch.Tensor, ridge: float) -> float:
    """lam = ridge * mean(diag G): the ridge in units of the features' mean energy."""
    return ridge * float(gram.diagonal().mean()) if gram.numel() else 0.0


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin over W [H, D] of  tr(W G W^T) - 2 tr(C W^T) + lam ||W - W0||^2, returned in float64 (solved as
    below): the down projection that best maps the features onto the expert's target, pulled towards `w0` (the
    plan's expert). `gram` [D, D] = sum f f^T, `cross` [H, D] = sum t f^T, both float64. Without tokens (G = 0) it
    returns w0."""
    lam = ridge_lambda(gram, ridge)
    if not lam > 0:
        return w0.double().clone()
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    b = cross + lam * w0.to(gram.device, torch.float64)
    # G + lam I is symmetric positive definite: W^T = (G + lam I)^-1 B^T by a Cholesky solve. The factor (D^3 / 3)
    # in float64; the triangular solves (2 D^2 H, the bulk of it: 2.4 GFLOP per expert of Qwen3-30B) in float32,
    # half the time on a CPU and 64x less on consumer GPUs, whose float64 is slow (relative error ~3e-7)
    chol = torch.linalg.cholesky(a)
    return torch.cholesky_solve(b.T.float().contiguous(), chol.float()).T.double()
