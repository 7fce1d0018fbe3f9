"""The transformers model a config describes, as a causal LM: its decoder (layers, norm, rotary) and head.

Most families register a `...ForCausalLM`. The text models of some multimodal releases do not (Qwen3-VL-MoE's
`Qwen3VLMoeTextModel` only exists inside `...ForConditionalGeneration`; Qwen3-Omni's thinker text model has no auto
class at all and is found in its modeling module): for them the text model stands as `model`
beside a plain `lm_head`, named as a text checkpoint names them (`model.layers.N...`, `lm_head.weight`), which is
all the streamer and the checkpoint writers take from a skeleton.
"""

from __future__ import annotations

import torch
from torch import nn


class TextCausalLM(nn.Module):
    """A causal-LM stand-in around a text model that has no causal-LM class of its own."""

    def __init__(self, config, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_decoder(self) -> nn.Module:
        return self.model


def causal_lm_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """`config`'s causal LM built without weights (call under `torch.device("meta")` for a skeleton)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    if config.model_type in MODEL_MAPPING_NAMES:
        model = AutoModel.from_config(config, **kwargs)
    else:  # a text model no auto class names (Qwen3-Omni's thinker text model): its modeling module's decoder
        model = _text_model_class(config)(config)
        model = model.to(dtype) if dtype is not None else model
    if not hasattr(model, "layers"):
        raise ValueError(f"transformers has no causal LM and no plain text decoder for '{config.model_type}'")
    lm = TextCausalLM(config, model)
    return lm.to(dtype) if dtype is not None else lm


def _text_model_class(config) -> type:
    """The decoder class of `config`'s modeling module built from exactly this config class (`...TextModel`)."""
    import importlib

    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)
             and getattr(c, "config_class", None) is type(config) and c.__name__.endswith("TextModel")]
    if len(found) != 1:
        raise ValueError(f"transformers has no causal LM and no single text decoder for '{config.model_type}' "
                         f"(found {[c.__name__ for c in found]})")
    return found[0]
