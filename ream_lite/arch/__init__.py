"""Architecture specs: what the tensors of each supported MoE family mean."""

from ream_lite.arch.families import FAMILIES
from ream_lite.arch.layout import LayerLayout, ModelLayout, detect_spec, supported_families
from ream_lite.arch.spec import ArchSpec, RouterConfig

__all__ = ["FAMILIES", "ArchSpec", "LayerLayout", "ModelLayout", "RouterConfig", "detect_spec", "supported_families"]
