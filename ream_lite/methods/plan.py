"""LayerPlan: what a method decided for one MoE layer."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
import torch


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
    # (centroid, member) -> the permutation of the member's neurons aligned onto the centroid, set when merged
    perms: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    frequency_after: list[int] | None = None  # tokens routed to each kept expert by the compressed layer
    tokens: int | None = None  # calibration tokens the statistics saw
    refit: dict | None = None  # the least-squares refit (ream_lite.refit): settings, errors, whether it was used

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
            **({"refit": self.refit} if self.refit is not None else {}),
            **({"frequency_after": self.frequency_after} if self.frequency_after is not None else {}),
            **({"permutations": self.perms_json()} if self.align != "none" and self.merged_groups() else {}),
        }

    def perms_json(self) -> dict[str, str]:
        """'centroid-member' -> the member's neuron permutation as base64 of little-endian int32: what `apply`
        needs to merge exactly as this plan did, without calibration data."""
        out = {}
        for c, members in sorted(self.merged_groups().items()):
            for m in members[1:]:
                perm = np.asarray(self.perms[(c, m)].cpu(), dtype="<i4")
                out[f"{c}-{m}"] = base64.b64encode(perm.tobytes()).decode("ascii")
        return out

    @classmethod
    def from_json(cls, d: dict) -> LayerPlan:
        """A plan read back from ream_plan.json (every kept expert's group; permutations decoded)."""
        groups = {e: [e] for e in d["kept"]}
        weights = {e: [1.0] for e in d["kept"]}
        for c, g in d.get("groups", {}).items():
            groups[int(c)], weights[int(c)] = [int(m) for m in g["members"]], [float(w) for w in g["weights"]]
        perms = {}
        for pair, b64 in d.get("permutations", {}).items():
            c, m = (int(x) for x in pair.split("-"))
            perms[(c, m)] = torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<i4").astype(np.int64))
        plan = cls(int(d["layer"]), int(d["num_experts"]), d["method"], groups, weights, d.get("align", "none"),
                   d.get("scores", {}), d.get("guard"), perms, refit=d.get("refit"))
        plan.validate()
        return plan


def pruning_plan(layer: int, num_experts: int, method: str, kept: list[int], scores: dict) -> LayerPlan:
    return LayerPlan(layer, num_experts, method, {e: [e] for e in sorted(kept)}, {e: [1.0] for e in kept}, "none", scores)
