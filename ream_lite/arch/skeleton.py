"""The transformers model a config describes, as a causal LM: its decoder (layers, norm, rotary) and head.

Most families register a `...ForCausalLM`. The text models of some multimodal releases do not (Qwen3-VL-MoE's
`Qwen3VLMoeTextModel` only exists inside `...ForConditionalGeneration`): for them the text model stands as `model`
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    model = AutoModel.from_config(config, **kwargs)
    if not hasattr(model, "layers"):
        raise ValueError(f"transformers has no causal LM and no plain text decoder for '{config.model_type}'")
    lm = TextCausalLM(config, model)
    return lm.to(dtype) if dtype is not None else lm
