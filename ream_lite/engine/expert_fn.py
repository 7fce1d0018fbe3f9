"""The gated activation of a family's routed experts: what `expert_intermediate` makes of the two projections.

Most families compute act(gate) * up with config.hidden_act (a plain transformers activation is returned for them,
so their numbers do not change). gpt_oss clamps both projections and adds one to up (`ClampedSwiGLU`); Ling 2.5
clamps act(gate) and up with a limit per layer (`ClampedAfterAct`); DeepSeek-V4 clamps gate and up
before the activation (`ClampedBeforeAct`); an object with a `glu(gate, up)` method tells
`expert_intermediate` to hand it both projections.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ream_lite.arch.spec import ArchSpec
from ream_lite.errors import ReamLiteError


class ClampedSwiGLU:
    """gpt_oss: g = min(gate, limit), u = clamp(up, -limit, limit), a = (u + 1) * g * sigmoid(alpha * g).

    The +1 on up means an expert whose up projection is zero still passes its gate through, so a neuron-wise merge
    must carry the up bias as well as the weights (it does: biases merge like weights)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = float(alpha), float(limit)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:  # only `glu` is meaningful for this activation
        raise TypeError("ClampedSwiGLU combines gate and up: call glu(gate, up)")

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"


class ClampedAfterAct:
    """Ling 2.5 / Step-3.7: a = min(act(gate), limit) * clamp(up, -limit, limit), with a limit per layer (the clamp
    follows the activation, unlike gpt_oss's)."""

    def __init__(self, act: Callable, limit: float):
        self.act, self.limit = act, float(limit)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate).clamp(max=self.limit) * up.clamp(min=-self.limit, max=self.limit)

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        raise TypeError("ClampedAfterAct combines gate and up: call glu(gate, up)")

    def __repr__(self) -> str:
        return f"ClampedAfterAct({self.act.__class__.__name__}, limit={self.limit})"


class ClampedBeforeAct:
    """DeepSeek-V4: a = act(min(gate, limit)) * clamp(up, -limit, limit) (the gate clamped before the activation,
    without gpt_oss's alpha and +1)."""

    def __init__(self, act: Callable, limit: float):
        self.act, self.limit = act, float(limit)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        raise TypeError("ClampedBeforeAct combines gate and up: call glu(gate, up)")

    def __repr__(self) -> str:
        return f"ClampedBeforeAct({self.act.__class__.__name__}, limit={self.limit})"


def layer_limit(hf_config, key: str, layer: int) -> float:
    """The clamp of `layer` from a per-layer list config attribute (0, a missing entry or no list: no clamp)."""
    limits = getattr(hf_config, key, None) or []
    return float(limits[layer]) if layer < len(limits) and limits[layer] else 0.0


def _act_name(hf_config, key: str) -> str:
    """The activation name at attribute path `key` ("hidden_act"; DBRX's "ffn_config.ffn_act_fn.name", a dict)."""
    value = hf_config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


def expert_activation(spec: ArchSpec, hf_config, layer: int = 0) -> Callable:
    """The activation `expert_intermediate` needs for `spec`'s experts in `layer`, with the constants of
    `hf_config`."""
    from transformers.activations import ACT2FN

    if spec.expert_act == "clamped_swiglu":
        return ClampedSwiGLU(hf_config.swiglu_alpha, hf_config.swiglu_limit)
    if spec.expert_act == "swiglu" or spec.expert_act == "ungated":  # (ungated: act(up), expert_intermediate)
        return ACT2FN[_act_name(hf_config, spec.hidden_act_key)]
    if spec.expert_act == "swiglu_layer_clamp":  # (spec.expert_limits_key names the per-layer list)
        act = ACT2FN[_act_name(hf_config, spec.hidden_act_key)]
        limit = layer_limit(hf_config, spec.expert_limits_key, layer)
        return ClampedAfterAct(act, limit) if limit else act
    if spec.expert_act == "swiglu_clamp":  # (spec.expert_limits_key names one limit for every layer)
        act = ACT2FN[_act_name(hf_config, spec.hidden_act_key)]
        limit = float(getattr(hf_config, spec.expert_limits_key, 0) or 0)
        return ClampedBeforeAct(act, limit) if limit else act
    raise ReamLiteError(f"{spec.model_type}: unknown expert activation '{spec.expert_act}'")
