"""Compression methods: pure functions from layer statistics (and expert weights) to a LayerPlan."""

from ream_lite.methods import hc_smoe, m_smoe, prune, ream  # noqa: F401  (register the methods)
from ream_lite.methods.base import METHODS, Method, MethodInput, MethodOptions
from ream_lite.methods.plan import LayerPlan

__all__ = ["METHODS", "LayerPlan", "Method", "MethodInput", "MethodOptions"]
