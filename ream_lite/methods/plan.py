"""LayerPlan: what a method decided for one MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerPlan:
    """Experts kept (original ids, ascending: their order in the compressed layer), and for each kept expert the
    original experts merged into it (itself first) with their merge weights. Pruning = every group a singleton."""

    layer: int
    num_experts: int
    method: str
    groups: dict[int, list[int]]
    weights: dict[int, list[float]]
    align: str = "none"
    scores: dict[str, list[float]] = field(default_factory=dict)
    guard: dict | None = None  # the merge guard's record: every candidate's held-out error and the choice

    @property
    def kept(self) -> list[int]:
        return sorted(self.groups)

    def merged_groups(self) -> dict[int, list[int]]:
        return {c: m for c, m in self.groups.items() if len(m) > 1}

    def validate(self) -> None:
        members = [e for m in self.groups.values() for e in m]
        if len(members) != len(set(members)):
            raise ValueError(f"layer {self.layer}: an expert is in two groups")
        for c, m in self.groups.items():
            if m[0] != c or len(self.weights[c]) != len(m):
                raise ValueError(f"layer {self.layer}: malformed group {c}: {m}")

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "method": self.method,
            "kept": self.kept,
            "groups": {str(c): {"members": m, "weights": self.weights[c]} for c, m in sorted(self.merged_groups().items())},
            "align": self.align,
            "scores": self.scores,
            **({"guard": self.guard} if self.guard is not None else {}),
        }


def pruning_plan(layer: int, num_experts: int, method: str, kept: list[int], scores: dict) -> LayerPlan:
    return LayerPlan(layer, num_experts, method, {e: [e] for e in sorted(kept)}, {e: [1.0] for e in kept}, "none", scores)
