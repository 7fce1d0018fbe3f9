"""A spec resolved against one real checkpoint: which layers are MoE, how their experts are stored, key names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from ream_lite.arch.config_check import check_config
from ream_lite.arch.families import FAMILIES
from ream_lite.arch.spec import ArchSpec, RouterConfig
from ream_lite.checkpoint.reader import CheckpointReader, load_config_dict, resolve_model_path
from ream_lite.checkpoint.stored import UNSCALED_FP8_MESSAGE
from ream_lite.errors import ReamLiteError

# model types that are known dense (no routed experts), for a clearer message than "unsupported"
_DENSE_HINT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo", "olmo2", "gpt2")


# multimodal model types whose text model is a supported family (wrapper -> text model_type): the text model is
# compressed as that family (its config is the wrapper's text_config, its keys under the language-model prefix found
# in the checkpoint); the vision tower and projector are non-layer tensors, copied unchanged
MULTIMODAL_WRAPPERS = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text", "qwen3_vl_moe": "qwen3_vl_moe_text",
                       "kimi_k25": "deepseek_v3",  # (Kimi-K2.5 / K2.6: a text_config of model_type kimi_k2)
                       "qwen3_omni_moe": "qwen3_omni_moe_text", "step3p7": "step3p5"}
# where a wrapper's config.json holds its text model's config, a dotted path (default: text_config): Qwen3-Omni's
# thinker holds it, beside its talker (an MoE of its own, copied unchanged)
TEXT_CONFIG_PATH = {"qwen3_omni_moe": "thinker_config.text_config"}
# wrapper config keys a text_config inherits when it lacks them (the wrappers write dtype and quantization at the top)
_INHERITED_KEYS = ("dtype", "torch_dtype", "quantization_config")
_ABSENT = object()


log = logging.getLogger(__name__)

# quantization_config.quant_method values whose weights the reader decodes (checkpoint/stored.py)
DECODABLE_QUANT_METHODS = ("fp8", "mxfp4", "bitsandbytes", "compressed-tensors", "modelopt")
# compressed-tensors formats whose weights the reader decodes: FP8 ("float-quantized"), NVFP4, symmetric INT4
# ("pack-quantized" with 4-bit int weights: the Kimi-K2-Thinking / K2.5 releases, W4A16)
COMPRESSED_TENSORS_FORMATS = ("float-quantized", "nvfp4-pack-quantized", "pack-quantized")


def fp8_block_size(config: dict) -> tuple[int, int] | None:
    """The FP8 block size the config declares, if any: quantization_config.weight_block_size ("fp8"), or the
    weights' block_structure of a compressed-tensors config group."""
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    for group in (quant.get("config_groups") or {}).values():
        block = block or ((group or {}).get("weights") or {}).get("block_structure")
    if not block:
        return None
    try:
        rows, cols = (int(b) for b in block)
        if rows > 0 and cols > 0:
            return rows, cols
    except (TypeError, ValueError):
        pass
    raise ReamLiteError(f"quantization_config: FP8 block size {block!r} is not two positive integers ([128, 128])")


def split_multimodal_config(config: dict, where: str = "model") -> tuple[dict, dict | None, dict]:
    """(the config the text model is compressed by, the multimodal wrapper's config or None, the keys the first took
    from the wrapper). For a wrapper (MULTIMODAL_WRAPPERS): its text_config, with the wrapper's dtype and
    quantization_config where the text_config lacks them; any other config is returned as it is."""
    text_type = MULTIMODAL_WRAPPERS.get(config.get("model_type"))
    if text_type is None:
        return config, None, {}
    path = TEXT_CONFIG_PATH.get(config["model_type"], "text_config")
    text = _dotted(config, path)
    if not isinstance(text, dict) or not text.get("num_hidden_layers"):
        raise ReamLiteError(f"{where}: the multimodal '{config['model_type']}' config.json has no "
                            f"{path} describing its language model")
    if FAMILIES.get(text.get("model_type", text_type)) is not FAMILIES[text_type]:  # (an alias is the family)
        raise ReamLiteError(f"{where}: the multimodal '{config['model_type']}' config.json has a text_config of "
                            f"model_type '{text['model_type']}'; expected '{text_type}'")
    text = dict(text)
    # key -> what the text config held (absent, or null as transformers writes a nested config's unset dtype)
    inherited = {k: text.get(k, _ABSENT) for k in ("model_type", *_INHERITED_KEYS) if text.get(k) is None and
                 (k == "model_type" or config.get(k) is not None)}
    for k in inherited:
        text[k] = text_type if k == "model_type" else config[k]
    return text, config, inherited


def multimodal_spec(spec: ArchSpec, keys: list[str], where: str) -> ArchSpec:
    """The text family's spec with its key names moved to where a multimodal checkpoint stores the language model:
    the text decoder (`model.` in a text checkpoint) is the prefix holding `embed_tokens.weight` beside `layers.N`
    (`model.language_model.` in Qwen3.5, `language_model.model.` in Llama-4), the lm_head the nearest one above it
    (`lm_head.weight`, `language_model.lm_head.weight`). Everything else (vision tower, projector) is not a layer."""
    base = spec.layers_prefix.rsplit(".", 1)[0] + "."  # the text decoder's prefix in a text checkpoint: "model."
    embed_rel, layers_rel = spec.embed_key[len(base):], spec.layers_prefix[len(base):] + "."
    mtp = spec.detached_mtp_prefix
    found = sorted({k[: len(k) - len(embed_rel)] for k in keys if k.endswith(embed_rel)
                    and (len(k) == len(embed_rel) or k[-len(embed_rel) - 1] == ".")})
    found = [p for p in found if not (mtp and p.startswith(mtp)) and any(k.startswith(p + layers_rel) for k in keys)]
    if len(found) != 1:
        raise ReamLiteError(f"{where}: cannot tell where the multimodal checkpoint stores its language model (a prefix "
                            f"holding {embed_rel} and {layers_rel}N.*; found {found or 'none'})")
    prefix = found[0]
    key_set = set(keys)
    parts = prefix.split(".")[:-1]
    heads = [".".join(parts[:i] + [spec.lm_head_key]) for i in range(len(parts), -1, -1)]
    lm_head = next((k for k in heads if k in key_set), heads[-1])  # none: tied to the embeddings
    moved = lambda k: prefix + k[len(base):] if k.startswith(base) else k  # noqa: E731
    return replace(spec, layers_prefix=moved(spec.layers_prefix), embed_key=moved(spec.embed_key),
                   final_norm_key=moved(spec.final_norm_key), lm_head_key=lm_head)


def _dotted(config: dict, path: str):
    """config["a"]["b"] for "a.b" (None where any level is missing)."""
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _set_dotted(config: dict, path: str, value) -> dict:
    """A copy of `config` with "a.b" set to `value` (each level a copy: `config`'s own dicts are never edited)."""
    head, _, rest = path.partition(".")
    if not rest:
        return {**config, head: value}
    return {**config, head: _set_dotted(dict(config.get(head) or {}), rest, value)}


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))


def detect_spec(config: dict, where: str = "model") -> ArchSpec:
    model_type = config.get("model_type")
    if model_type is None:
        raise ReamLiteError(f"{where}: config.json has no model_type")
    # a multimodal wrapper: its text model's family (ModelLayout moves the key names under the wrapper's prefix)
    spec = FAMILIES.get(MULTIMODAL_WRAPPERS.get(model_type, model_type))
    if spec is None:
        kind = "a dense model (no routed experts)" if model_type in _DENSE_HINT else "not a supported MoE family"
        raise ReamLiteError(f"{where}: model_type '{model_type}' is {kind}; supported: {supported_families()}")
    return spec


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _decode_special_floats(obj):
    """transformers writes floats JSON cannot hold as {"__float__": "Infinity"} (Granite-4.0's time_step_limit);
    its config classes expect the floats back, as its own from_pretrained gives them."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def transformers_knows(model_type: str) -> bool:
    """Whether this transformers ships a config class for `model_type` (no remote code needed)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def require_trusted_code(config: dict, where: str, trust_remote_code: bool) -> None:
    """Refuse, unless the user trusts it, a checkpoint whose config needs its own code: a model_type this
    transformers does not know (and no spec maps onto a built-in class, as kimi_k2 -> deepseek_v3). ream-lite never
    executes a checkpoint's code by default. A config that merely declares code (auto_map) for a model_type
    transformers has built in (the DeepSeek-V3, Kimi-K2, MiniMax-M2 releases) runs transformers' class: said in the
    log, not refused, since the check needs nothing from that code."""
    model_type = config.get("model_type")
    spec = FAMILIES.get(model_type) if model_type else None
    # an alias a spec declares (kimi_k2 -> deepseek_v3) is ream-lite's own mapping onto a built-in class
    built_in = bool(model_type) and (transformers_knows(model_type) or bool(spec and model_type in spec.aliases))
    if built_in:
        if config.get("auto_map"):
            log.info("%s: config.json declares custom modeling code (auto_map); transformers' built-in '%s' classes "
                     "are used, the checkpoint's code is never run", where, model_type)
        return
    if not trust_remote_code:
        raise ReamLiteError(
            f"{where}: model_type '{model_type}' is not known to this transformers (it needs the checkpoint's own "
            "code); pass --trust-remote-code to accept running it"
        )


@dataclass(frozen=True)
class LayerLayout:
    index: int
    prefix: str  # "model.layers.7"
    is_moe: bool
    expert_storage: Literal["per_expert", "fused", "none"]
    num_experts: int
    is_mtp: bool = False


class ModelLayout:
    """A checkpoint directory + its family spec + what is really stored for each layer."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False):
        self.path: Path = resolve_model_path(name_or_path)
        # a multimodal checkpoint (MULTIMODAL_WRAPPERS): `config` is its text model's (what everything reads),
        # `wrapper_config` the whole config.json, which the output keeps with the edited text_config inside
        self.gguf = self.path.is_file()  # a GGUF file (resolve_model_path accepts no other file)
        if self.gguf:  # read as the transformers checkpoint it was converted from, config built from its metadata
            from ream_lite.checkpoint.gguf import GGUFCheckpoint

            self.reader = GGUFCheckpoint(self.path)
            raw_config = self.reader.config()
        else:
            raw_config = load_config_dict(self.path)
        self.config, self.wrapper_config, self._inherited = split_multimodal_config(raw_config, str(self.path))
        self.spec: ArchSpec = detect_spec(self.config, str(self.path))
        self.trust_remote_code = trust_remote_code
        require_trusted_code(self.config, str(self.path), trust_remote_code)
        self._lifted: dict[str, str] = {}  # flat name -> its dotted path in config.json (ArchSpec.lifted_keys)
        for flat, path in self.spec.lifted_keys:
            value = _dotted(self.config, path)
            if flat not in self.config and value is not None:
                self.config = {**self.config, flat: value}
                self._lifted[flat] = path
        self._derived: set[str] = set()
        for key in self.spec.derived_keys:
            if self.config.get(key) is None:
                try:
                    value = getattr(self.hf_config(), key, None)
                except ReamLiteError:
                    value = None  # (check_config then names what is missing)
                if value is not None:
                    self.config = {**self.config, key: value}
                    self._derived.add(key)
        if not self.gguf:
            self.reader = CheckpointReader(self.path, fp8_block=fp8_block_size(self.config))
        if self.spec.release_names:  # (the release's names where the checkpoint stores its embedding under them)
            release = dict(self.spec.release_names)
            if self.spec.embed_key not in self.reader and release.get("embed_key") in self.reader:
                self.spec = replace(self.spec, **release)
        if self.wrapper_config is not None:
            self.spec = multimodal_spec(self.spec, list(self.reader.keys()), str(self.path))
        if self.spec.fused_orientation_from_shapes:
            self.spec = self._fused_orientation(self.spec)
        check_config(self.config, self.spec, {k: t.shape for k, t in self.reader.tensors.items()}, str(self.path))
        for key, why in self.spec.unsupported_keys:
            if self.config.get(key):
                raise ReamLiteError(f"{self.path}: config.json {key} = {self.config[key]!r}: {why}")
        self.num_layers = int(self.config[self.spec.num_layers_key])
        extra = int(self.config.get(self.spec.mtp_layers_key, 0) or 0) if self.spec.mtp_layers_key else 0
        # MTP layers are listed only when the checkpoint really has them (transformers' save_pretrained drops them)
        present_mtp = [i for i in range(self.num_layers, self.num_layers + extra) if self.layer_keys(i)]
        if self.spec.mtp_layers_prefix and len(present_mtp) > 1:
            raise ReamLiteError(f"{self.path}: an MTP block of {len(present_mtp)} layers under "
                                f"{self.spec.mtp_layers_prefix}.*; ream-lite runs a one-layer block only: pass "
                                "--drop-mtp to leave it out")
        self.layers = [self._resolve_layer(i, is_mtp=False) for i in range(self.num_layers)]
        self.layers += [self._resolve_layer(i, is_mtp=True) for i in present_mtp]
        if not any(layer.is_moe for layer in self.layers):
            raise ReamLiteError(f"{self.path}: no MoE layer found in the checkpoint (router {self.spec.router_weight})")
        for key in (self.spec.embed_key,):
            self.reader.entry(key)
        if self.residual_streams > 1 and (self.residual_streams - 1) * int(self.config["hidden_size"]) < \
                self.residual_streams:  # (the stream weights are kept in the spare columns of a hidden-state row)
            raise ReamLiteError(f"{self.path}: {self.spec.residual_streams_key} = {self.residual_streams} streams of "
                                f"hidden_size {self.config['hidden_size']} are not supported")

    def mtp_keys_unsupported(self) -> list[str]:
        """Stored MTP tensors of a family whose MTP block ream-lite cannot run (ArchSpec.mtp_unsupported)."""
        prefix = self.spec.detached_mtp_prefix
        if not self.spec.mtp_unsupported or not prefix:
            return []
        return [k for k in self.reader.keys() if k.startswith(prefix)]

    def _fused_orientation(self, spec: ArchSpec) -> ArchSpec:
        """`spec` with fused_input_major as this checkpoint stores its fused experts (the first fused layer's shapes;
        every layer must agree, as the writer keeps one orientation). Per-expert checkpoints keep the default."""
        from ream_lite.arch import fused

        probe = replace(spec, fused_orientation_from_shapes=False)
        found = set()
        for key in self.reader.keys():
            if not key.endswith(f".{spec.experts_prefix}.{spec.fused_gate_up}"):
                continue
            down = key[: -len(spec.fused_gate_up)] + spec.fused_down
            if down not in self.reader:
                continue
            major = fused.input_major_from_shapes(tuple(self.reader.shape(key)), tuple(self.reader.shape(down)),
                                                  int(self.config.get("hidden_size") or 0))
            if major is None:
                raise ReamLiteError(f"{self.path}: {key} {list(self.reader.shape(key))} and {down} "
                                    f"{list(self.reader.shape(down))} are neither [E, 2I, H] / [E, H, I] nor "
                                    "[E, H, 2I] / [E, I, H] for the config's hidden_size")
            found.add(major)
        if len(found) > 1:
            raise ReamLiteError(f"{self.path}: fused experts stored input-major in some layers and output-major in "
                                "others; not supported")
        return replace(probe, fused_input_major=found.pop()) if found else probe

    @property
    def multimodal(self) -> str | None:
        """The multimodal wrapper's model_type when the checkpoint is one (its text model is what is compressed)."""
        return self.wrapper_config["model_type"] if self.wrapper_config is not None else None

    def wrap_config(self, text: dict) -> dict:
        """config.json for an output: `text` (an edited copy of `config`) as it is, or, for a multimodal checkpoint,
        the wrapper's config with `text`, less what it took from the wrapper, as its text_config."""
        lifted = {flat: text[flat] for flat in self._lifted if flat in text}
        text = {k: v for k, v in text.items() if k not in self._derived and k not in self._lifted}
        for flat, value in lifted.items():  # written back where config.json keeps it (DBRX's ffn_config)
            text = _set_dotted(text, self._lifted[flat], value)
        if self.wrapper_config is None:
            return text
        inner = {k: v for k, v in text.items() if k not in self._inherited}
        inner.update({k: v for k, v in self._inherited.items() if v is not _ABSENT})
        return _set_dotted(self.wrapper_config, TEXT_CONFIG_PATH.get(self.wrapper_config["model_type"], "text_config"),
                           inner)

    # -- keys ---------------------------------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        """Where layer `layer` is stored: `{layers_prefix}.{i}`, or an MTP layer k of a family that keeps them apart
        at `{mtp_layers_prefix}.{k}` (Qwen3-Next's mtp.layers.0)."""
        if self.spec.mtp_layers_prefix and layer >= self.num_layers:
            return f"{self.spec.mtp_layers_prefix}.{layer - self.num_layers}"
        return f"{self.spec.layers_prefix}.{layer}"

    def moe_key(self, layer: int, rel: str) -> str:
        return f"{self.layer_prefix(layer)}.{self.spec.moe_disk}.{rel}"

    def per_expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """The stored weights of one expert: (gate, up, down), or (up, down) for ungated experts."""
        ep = self.spec.experts_prefix
        return tuple(self.moe_key(layer, f"{ep}.{expert}.{n}.weight") for n in self.spec.expert_proj_names
                     if n is not None)

    def stored_parts(self, parts: tuple) -> tuple:
        """An expert's canonical (gate, up, down) as its stored weights are listed (`per_expert_keys`): without the
        zero-input gate of ungated experts."""
        return tuple(parts) if self.spec.gated_experts else tuple(parts[1:])

    def canonical_parts(self, parts: tuple) -> tuple:
        """Inverse of `stored_parts`: an ungated expert's (up, down) with its zero-input gate [..., I, 0] in front."""
        if self.spec.gated_experts:
            return tuple(parts)
        up = parts[0]
        return (up.new_empty((*up.shape[:-1], 0)), *parts)

    def fused_keys(self, layer: int) -> tuple[str, ...]:
        """The fused expert tensors: (gate_up, down), or (gate, down, up) where up is its own (DBRX)."""
        names = (self.spec.fused_gate_up, self.spec.fused_down, *((self.spec.fused_up,) if self.spec.fused_up else ()))
        return tuple(self._fused_key(layer, n) for n in names)

    def fused_rows(self, layer: int, key: str) -> int:
        """Rows of fused tensor `key` per expert: 1 for [E, ...], dim 0 / E for one flattened along dim 0 (DBRX's
        [E * I, H]). One expert's slab is those rows, [rows, ...] -> [...] or [rows, ...] as stored."""
        return self.reader.shape(key)[0] // self.layers[layer].num_experts

    def fused_slab_shape(self, layer: int, key: str) -> tuple[int, ...]:
        """The shape of one expert's slab of fused tensor `key` ([2I, H], [I, H] ...)."""
        shape = tuple(self.reader.shape(key))
        rows = self.fused_rows(layer, key)
        return shape[1:] if rows == 1 else (rows, *shape[1:])

    def fused_bias_keys(self, layer: int) -> tuple[str, ...]:
        """The fused experts' bias tensors (gate_up bias, down bias), for families whose experts have them."""
        return tuple(self._fused_key(layer, n) for n in self.spec.fused_bias_names or ())

    def _fused_key(self, layer: int, name: str) -> str:
        # an empty experts_prefix: the fused tensors sit directly in the block (Granite's input_linear.weight)
        ep = f"{self.spec.experts_prefix}." if self.spec.experts_prefix else ""
        return self.moe_key(layer, f"{ep}{name}")

    def expert_keys(self, layer: int) -> list[str]:
        """Every checkpoint key that holds routed-expert weights (or biases) of `layer`."""
        info = self.layers[layer]
        if info.expert_storage == "fused":
            return [*self.fused_keys(layer), *self.fused_bias_keys(layer)]
        if info.expert_storage == "per_expert":
            return [k for e in range(info.num_experts) for k in self.per_expert_keys(layer, e)]
        return []

    def layer_keys(self, layer: int) -> list[str]:
        prefix = f"{self.layer_prefix(layer)}."
        return [k for k in self.reader.keys() if k.startswith(prefix)]

    @property
    def lm_head_key(self) -> str:
        if self.spec.lm_head_key in self.reader:
            return self.spec.lm_head_key
        return self.spec.embed_key  # tied embeddings

    # -- resolution ---------------------------------------------------------------------------------------------
    def _resolve_layer(self, i: int, is_mtp: bool) -> LayerLayout:
        prefix = self.layer_prefix(i)
        if self.moe_key(i, self.spec.router_weight) not in self.reader:
            return LayerLayout(i, prefix, False, "none", 0, is_mtp)
        # (zero-computation experts have router rows but no weights: LongCat-Flash's zero_expert_num)
        n = self.reader.shape(self.moe_key(i, self.spec.router_weight))[0] - self.zero_experts
        gu, down = self.fused_keys(i)[:2]
        if gu in self.reader and down in self.reader and not self.spec.gated_experts:
            raise ReamLiteError(f"{self.path}: layer {i}: ungated experts stored fused ({gu}); ream-lite reads them "
                                "per expert, as the releases and transformers' save_pretrained store them")
        if gu in self.reader and down in self.reader:
            storage = "fused"
            # [E, ...] or flattened [E * rows, ...] (DBRX): whole experts along dim 0 either way
            shapes = [self.reader.shape(k) if k in self.reader else (0,) for k in self.fused_keys(i)]
            if any(not s[0] or s[0] % n or (s[0] > n and len(s) != 2) for s in shapes):
                raise ReamLiteError(f"{self.path}: layer {i}: fused expert tensors disagree with the router "
                                    f"({n} experts)")
        else:
            missing = [k for e in range(n) for k in self.per_expert_keys(i, e) if k not in self.reader]
            if missing:
                raise ReamLiteError(
                    f"{self.path}: layer {i}: expert weights not found (e.g. {missing[0]}); "
                    f"neither per-expert nor fused {self.spec.model_type} layout"
                )
            storage = "per_expert"
        return LayerLayout(i, prefix, True, storage, n, is_mtp)

    @cached_property
    def latent(self) -> bool:
        """Whether the experts run in a latent space: the MoE blocks store the input projection
        ArchSpec.latent_projections names (Nemotron-3 Super; Nano's blocks have none)."""
        proj = self.spec.latent_projections
        return bool(proj) and any(self.moe_key(x.index, f"{proj[0]}.weight") in self.reader for x in self.moe_layers)

    @property
    def residual_streams(self) -> int:
        """Hidden vectors each token carries between layers (DeepSeek-V4's hyper-connections: hc_mult; else 1)."""
        key = self.spec.residual_streams_key
        return int(self.config.get(key) or 1) if key else 1

    @property
    def residual_width(self) -> int:
        """Values per token of the hidden states between layers: residual_streams x hidden_size."""
        return self.residual_streams * int(self.config["hidden_size"])

    def hash_routed(self, layer: int) -> bool:
        """Whether MoE layer `layer` chooses its experts by the token id (it stores ArchSpec.hash_table)."""
        return bool(self.spec.hash_table) and self.moe_key(layer, self.spec.hash_table) in self.reader

    @property
    def zero_experts(self) -> int:
        """Zero-computation (identity) experts per MoE layer, routed beside the real ones (LongCat-Flash)."""
        key = self.spec.zero_experts_key
        return int(self.config.get(key) or 0) if key else 0

    def router_rows(self, layer: int, kept: list[int]) -> list[int]:
        """The router rows (and selection-bias entries) of the compressed layer: the kept experts', then every
        zero-computation expert's (rows num_experts ..), which are never pruned."""
        n = self.layers[layer].num_experts
        return list(kept) + list(range(n, n + self.zero_experts))

    # -- config-derived -----------------------------------------------------------------------------------------
    @cached_property
    def router_config(self) -> RouterConfig:
        # transformers' config class supplies the defaults of keys a config.json leaves out (DeepSeek-V3's
        # n_group, routed_scaling_factor, norm_topk_prob ...), so routing matches what transformers runs
        merged = {**self.hf_config().to_dict(), **self.config}
        try:
            return self.spec.router_config(merged)
        except KeyError as e:
            raise ReamLiteError(f"{self.path}: config.json lacks {e}") from None
        except ValueError as e:
            raise ReamLiteError(f"{self.path}: {e}") from None

    @property
    def decoder_layers(self) -> list[LayerLayout]:
        return [layer for layer in self.layers if not layer.is_mtp]

    @property
    def moe_layers(self) -> list[LayerLayout]:
        return [layer for layer in self.layers if layer.is_moe]

    def hf_config(self, attn_implementation: str = "sdpa"):
        """The transformers config object for this checkpoint (built from config.json; remote code only for a
        model_type transformers lacks, and only when the user passed trust_remote_code)."""
        from transformers import AutoConfig

        cfg_dict = _decode_special_floats(dict(self.config))
        cfg_dict["model_type"] = self.spec.model_type  # aliases (kimi_k2) map onto a transformers class
        # the engine decodes stored weights itself and runs plain modules: no quantized module classes
        cfg_dict.pop("quantization_config", None)
        model_type = cfg_dict.pop("model_type")
        try:
            if transformers_knows(model_type):
                cfg = AutoConfig.for_model(model_type, **cfg_dict)
            else:  # reached only with trust_remote_code (require_trusted_code): the checkpoint's config class
                cfg = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            raise ReamLiteError(f"{self.path}: transformers cannot build a {model_type} config: {e}") from None
        cfg._attn_implementation = self.spec.attn_implementation or attn_implementation  # (gpt_oss: eager only)
        return cfg

    def _require_known_expert_tensors(self) -> None:
        """Every tensor in a layer's routed-experts namespace must be one the writer renames, merges or drops with
        its expert: an unknown one (the static activation `input_scale` of AutoFP8 / compressed-tensors static
        releases) would be copied under its old expert number, attached to another expert."""
        for info in self.moe_layers:
            ns = self.moe_key(info.index, self.spec.experts_prefix) + "."
            known = set(self.expert_keys(info.index))
            unknown = [k for k in self.layer_keys(info.index) if k.startswith(ns) and k not in known]
            if unknown:
                raise ReamLiteError(
                    f"{self.path}: {unknown[0]} (and {len(unknown) - 1} more) belongs to one routed expert but is "
                    "not a weight ream-lite can merge or renumber (static activation scales?); use a release with "
                    "dynamic activation scaling or the unquantized one")

    def require_decodable(self) -> None:
        """Refuse quantized checkpoints whose weights ream-lite cannot decode (GPTQ, AWQ, bnb 8-bit ...); FP8
        block-scaled, MXFP4, NVFP4, INT4 pack-quantized and bnb 4-bit weights are decoded on read
        (`checkpoint.stored`)."""
        self._require_known_expert_tensors()
        unscaled = [k for k, t in self.reader.tensors.items() if t.encoding == "fp8_unscaled"]
        if unscaled:
            raise ReamLiteError(f"{self.path}: quantized checkpoint ({self.reader.entry(unscaled[0]).dtype}): "
                                f"{unscaled[0]} is {UNSCALED_FP8_MESSAGE}")
        quant = self.config.get("quantization_config") or {}
        method = quant.get("quant_method")
        expert_dtype = quant.get("expert_dtype") or self.config.get("expert_dtype")
        if expert_dtype and "4" in str(expert_dtype):  # (DeepSeek-V4's releases: FP4 experts beside FP8 weights)
            raise ReamLiteError(f"{self.path}: experts stored as expert_dtype {expert_dtype!r}; ream-lite does not "
                                "decode that encoding yet: use a BF16 or FP8 conversion")
        if method == "compressed-tensors" and quant.get("format") not in COMPRESSED_TENSORS_FORMATS:
            raise ReamLiteError(f"{self.path}: compressed-tensors checkpoint in format {quant.get('format')!r}; "
                                "ream-lite decodes its FP8 'float-quantized', 'nvfp4-pack-quantized' and INT4 "
                                "'pack-quantized' formats only: use the unquantized release")
        if method == "compressed-tensors" and quant.get("format") == "pack-quantized":
            for name, group in (quant.get("config_groups") or {}).items():
                w = (group or {}).get("weights") or {}
                if (w.get("type"), w.get("num_bits"), w.get("symmetric", True)) != ("int", 4, True):
                    raise ReamLiteError(f"{self.path}: compressed-tensors pack-quantized group {name!r} holds "
                                        f"{w.get('num_bits')}-bit {w.get('type')} weights (symmetric: "
                                        f"{w.get('symmetric')}); ream-lite reads symmetric 4-bit int weights only: "
                                        "use the unquantized release")
        if method == "modelopt":
            algo = quant.get("quant_algo") or (quant.get("quantization") or {}).get("quant_algo")
            if algo != "NVFP4":
                raise ReamLiteError(f"{self.path}: ModelOpt checkpoint quantized as {algo!r}; ream-lite decodes its "
                                    "NVFP4 only: use the unquantized release")
        if method is None or method in DECODABLE_QUANT_METHODS:
            if method == "bitsandbytes" and quant.get("load_in_8bit"):
                raise ReamLiteError(f"{self.path}: bitsandbytes 8-bit checkpoints cannot be decoded; use the "
                                    "unquantized or a 4-bit release")
            return
        raise ReamLiteError(
            f"{self.path}: quantized checkpoint ({method}); ream-lite decodes FP8 block-scaled, MXFP4, NVFP4, "
            "compressed-tensors INT4 and bitsandbytes 4-bit weights only: use the model's unquantized release"
        )

    def close(self) -> None:
        self.reader.close()
