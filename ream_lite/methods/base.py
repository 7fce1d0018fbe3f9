"""What every method receives and the registry of methods. A method is a pure function of statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.stats import LayerStats


@dataclass(frozen=True)
class MethodOptions:
    saliency: str = "reap"  # reap | frequency
    saliency_gate: str = "model"  # model | softmax (reference codes) | twice (reference REAM's double gating)
    grouping: str = "pseudo-prune"  # pseudo-prune | nearest-centroid
    group_size: int | None = None  # None = auto
    gate_logit_sim: bool = True
    gated_sim: bool = True
    align: str = "act+weight"  # act+weight | act | weight | none


@dataclass
class MethodInput:
    stats: LayerStats
    n_keep: int
    n_group: int  # group-limited routing: keep n_keep / n_group experts in every routing group
    options: MethodOptions
    seed: int


@dataclass(frozen=True)
class Method:
    name: str
    plan: Callable[[MethodInput], LayerPlan]
    needs_dense: Callable[[MethodOptions], bool]  # every expert on every token (costly)
    needs_gram: Callable[[MethodOptions], bool]
    summary: str


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method
