"""LayerStreamer: run a model one decoder layer at a time over hidden states held in a HiddenStateStore.

For each decoder layer the streamer takes that layer's own transformers module from a skeleton of the model built
on the `meta` device (no memory), swaps the MoE block for a capture module, materialises the rest with the
layer's weights only, and runs every batch of sequences through it (with the model's own rotary embedding and
causal mask). The MoE block is then run by the engine itself: the family's router and the routed experts, read
from the checkpoint in chunks of experts so a layer whose experts do not fit still runs, with an optional
observer that sees every routing decision and every expert chunk — the hook the compression methods use.

Two hidden-state buffers are used per layer. Phase A reads the layer input from `h`, writes the residual after
attention to `out`, and overwrites `h` in place with the MoE block's input (attention is done with it), which then
stays cached for the MoE phase and for any later pass of a method. Phase B adds the MoE output into `out`.

Every load of routed experts goes through `experts`: from the checkpoint, or, inside `layer_experts(L)` when the
memory plan has room, from one read of all of layer L's experts kept on the device (see `expert_cache`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ream_lite.arch.layout import ModelLayout
from ream_lite.arch.skeleton import causal_lm_skeleton
from ream_lite.arch.spec import RouterConfig
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.engine.budget import MemoryPlan, available_ram, plan_memory, require_device, usable_cores
from ream_lite.engine.expert_cache import LayerExpertCache
from ream_lite.engine.expert_fn import expert_activation
from ream_lite.engine.experts import ExpertWeights, add_routed_output, load_experts
from ream_lite.engine.hash_routing import remap_table, similarity_order
from ream_lite.engine.router import Routing, route
from ream_lite.engine.store import Batch, HiddenStateStore
from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)


class MoEObserver(Protocol):
    """Receives what the MoE executor computes; methods accumulate their statistics here."""

    def on_routing(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing) -> None: ...

    def on_experts(
        self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing, experts: ExpertWeights
    ) -> None: ...


class Observers:
    """Several observers fed by one pass over the experts (each sees every call, in order)."""

    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def on_routing(self, *args) -> None:
        for o in self.observers:
            o.on_routing(*args)

    def on_experts(self, *args) -> None:
        for o in self.observers:
            o.on_experts(*args)


class _MoECapture(nn.Module):
    """Stands in for the MoE block inside the decoder layer: remembers its input, contributes nothing."""

    def __init__(self, returns_tuple: bool = False) -> None:
        super().__init__()
        self.captured: torch.Tensor | None = None
        self.returns_tuple = returns_tuple  # the layer unpacks (output, router_logits) (ArchSpec.moe_returns_tuple)

    def forward(self, hidden_states: torch.Tensor, **_) -> torch.Tensor | tuple[torch.Tensor, None]:
        # (DeepSeek-V4's layer also hands its block the token ids: the engine routes hash layers itself)
        self.captured = hidden_states
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


@dataclass
class MoEBlock:
    """The non-expert parts of one MoE layer, materialised: router and shared expert(s)."""

    layer: int
    router_weight: torch.Tensor
    router_bias: torch.Tensor | None
    router_cfg: RouterConfig
    shared: nn.Module | None
    shared_gate: nn.Module | None
    act: Callable[[torch.Tensor], torch.Tensor]
    # multiplies the block's output (ArchSpec.moe_output_scale_key: Granite residual_multiplier, MiniMax
    # mlp_beta_factor); the decoder layer's own module scales the rest of its residual update
    output_scale: float = 1.0
    # post-norm decoders (ArchSpec.moe_post_norm): the norm applied to the block's whole output (after the scale)
    post_norm: nn.Module | None = None
    # zero-computation experts' identity output (Routing.identity) counted in the block's output; like the shared
    # expert, the guard's and refit's routed-only views leave it out
    identity_output: bool = True
    # latent MoE (ArchSpec.latent_projections): the experts run on latent_in(x) and their weighted sum is mapped back
    # by latent_out (both linear); None: the experts run on the block's input
    latent_in: nn.Module | None = None
    latent_out: nn.Module | None = None
    # hash-routed layer (ArchSpec.hash_table): the [vocab, k] table of the experts each token id takes, and
    # hash_routing.similarity_order of the original router (how removed experts are replaced in it)
    hash_table: torch.Tensor | None = None
    hash_order: torch.Tensor | None = None

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> Routing:
        """The routing of tokens x [T, H] whose ids are `token_ids` [T] (needed by a hash-routed layer only)."""
        chosen = None
        if self.hash_table is not None:
            if token_ids is None:
                raise ReamLiteError(f"layer {self.layer} chooses its experts by token id, and the hidden states "
                                    "carry none")
            chosen = self.hash_table[token_ids.to(self.hash_table.device)]
        return route(x, self.router_weight, self.router_cfg, self.router_bias, chosen)

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the routed experts see of the block input x: x, or its latent projection."""
        return x if self.latent_in is None else self.latent_in(x)

    def to_hidden(self, y: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """A sum of expert outputs [T, *] in the block's output space (latent_out; its bias once, `with_bias`)."""
        if self.latent_out is None:
            return y
        out = F.linear(y.to(self.latent_out.weight.dtype), self.latent_out.weight).float()
        bias = getattr(self.latent_out, "bias", None)
        return out + bias.float() if with_bias and bias is not None else out

    def restricted(self, kept: list[int]) -> MoEBlock:
        """The same block with only experts `kept` (original ids, ascending) left in the router (and its
        zero-computation experts, which are never removed); a hash-routed layer's table remapped as the output
        writes it (engine/hash_routing.py)."""
        n, z = self.router_cfg.num_experts, self.router_cfg.zero_experts
        idx = torch.tensor(list(kept) + list(range(n, n + z)), device=self.router_weight.device)
        bias = self.router_bias[idx] if self.router_bias is not None else None
        cfg = replace(self.router_cfg, num_experts=len(kept))
        table = None
        if self.hash_table is not None:
            table = remap_table(self.hash_table, self.hash_order, list(kept))
            table = table.to(self.hash_table.device)
        return replace(self, router_weight=self.router_weight[idx], router_bias=bias, router_cfg=cfg,
                       hash_table=table, hash_order=None)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared is None:
            return None
        y = self.shared(x)
        if self.shared_gate is not None:
            y = torch.sigmoid(self.shared_gate(x)) * y
        return y


@dataclass
class StreamOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # compute dtype; None = the checkpoint's own
    max_gpu_memory: int | None = None
    max_cpu_memory: int | None = None
    work_dir: str | None = None
    store_tier: str = "auto"
    tokens_per_batch: int = 4096
    attn_implementation: str = "sdpa"
    progress: bool = True
    expert_cache: str = "auto"  # auto: keep an MoE layer's experts on the device while it is compressed, if they fit
    trust_remote_code: bool = False  # accept a model_type that needs the checkpoint's own code (arch.layout)
    # at most this many experts per chunk (the chunking decides float rounding: pinned, runs on other budgets or
    # world sizes compute the same numbers); None: as many as the memory plan allows
    experts_per_chunk: int | None = None


def reads_ahead(device: torch.device) -> bool:
    """Whether the next reads are fetched on a thread while the current work computes: where the compute leaves a
    core free for it (a GPU computes; or the CPU has more cores than torch's threads use). Reading is CPU work too:
    on this project's 2-core test VM a cold GiB costs 0.49 s of kernel time, and REAP at Qwen3-30B-A3B's shape
    moved ~5.5 s from reading into computing with the thread on, the wall time unchanged (docs/performance.md).
    `REAM_LITE_READ_AHEAD=1` / `0` forces it on / off."""
    forced = os.environ.get("REAM_LITE_READ_AHEAD")
    if forced in ("0", "1"):
        return forced == "1"
    if device.type != "cpu":
        return True
    return usable_cores() > torch.get_num_threads()


def token_ids(sequences: list[torch.Tensor]) -> torch.Tensor:
    """The token ids of `sequences`, flat on the host, in the rows' order of the stores built from them
    (HiddenStateStore.token_ids)."""
    return torch.cat([s.reshape(-1) for s in sequences]).cpu()


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


class LayerStreamer:
    def __init__(self, layout: ModelLayout, options: StreamOptions | None = None):
        self.layout = layout
        self.opts = options or StreamOptions()
        layout.require_decodable()
        self.device = torch.device(self.opts.device)
        require_device(self.device)
        self.dtype = self.opts.dtype or checkpoint_dtype(layout.config)
        self.hf_config = layout.hf_config(self.opts.attn_implementation)
        try:  # (a config.json transformers cannot build from: one line, not its traceback)
            with torch.device("meta"):
                self.skeleton = causal_lm_skeleton(self.hf_config, self.dtype)
            self.base = self.skeleton.get_decoder()
            if not hasattr(self.base, layout.spec.decoder_layers_attr):  # (Llama4ForCausalLM's get_decoder() misses
                self.base = self.skeleton.model                           # its `model`)
            self.hf_layers = getattr(self.base, layout.spec.decoder_layers_attr)  # (DBRX: blocks)
            # the rotary embedding holds computed (non-persistent) buffers: build it for real; it is tiny
            # (none in a NoPE model: Granite-4.0 hybrids with position_embedding_type "nope")
            rotary = getattr(self.base, "rotary_emb", None)
            self.rotary = type(rotary)(config=self.hf_config).to(self.device) if rotary is not None else None
            # (Step-3.7: one rotary embedding per layer type, asked for by the layer's type)
            self._rotary_by_type = self.rotary is not None and \
                "layer_type" in inspect.signature(self.rotary.forward).parameters
            # the module collapsing the residual streams before the final norm (DeepSeek-V4's hc_head), tiny
            self.stream_head = None
            if layout.spec.stream_head and layout.residual_streams > 1:
                attr, prefix = layout.spec.stream_head
                self.stream_head = self._fill(copy.deepcopy(getattr(self.base, attr)), prefix)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ReamLiteError(f"{layout.path}: transformers cannot build the model config.json describes "
                                f"({type(e).__name__}: {first})") from None
        self._check_shapes()
        self.router_cfg = layout.router_config
        self.hidden = int(self.hf_config.hidden_size)
        self.streams = layout.residual_streams  # (hidden vectors per token between layers: DeepSeek-V4's hc_mult)
        self.plan: MemoryPlan | None = None
        self._cache: LayerExpertCache | None = None  # the open layer's experts (`layer_experts`)
        # how the output stores what a method writes: merged experts are run as written (`merged_as_written`)
        self.output_format = OutputFormat()

    def _check_shapes(self) -> None:
        """Every tensor the model built from config.json has, that the checkpoint stores under the same name, has
        the checkpoint's shape: a config that disagrees with the weights is refused before any work, not at the
        first layer that loads them (routed experts are checked by ModelLayout, against the router)."""
        r, spec = self.layout.reader, self.layout.spec
        experts = f".{spec.moe_disk}.{spec.experts_prefix}"
        prefix = spec.layers_prefix + "."
        for name, t in self.skeleton.state_dict().items():
            disk = name.replace(f".{spec.moe_attr}.", f".{spec.moe_disk}.") if name.startswith(prefix) else name
            keys = spec.disk_keys(disk)
            if experts in disk or len(keys) > 1:  # (concatenations: checked when the layer is filled)
                continue
            disk = keys[0]
            if disk in r and tuple(t.shape) != tuple(r.shape(disk)):
                raise ReamLiteError(f"{self.layout.path}: {disk} is stored as {list(r.shape(disk))}, config.json "
                                    f"describes {list(t.shape)}; the config does not belong to these weights")
        # a layer the config makes dense where the checkpoint has a router, or the reverse (a wrong
        # first_k_dense_replace, mlp_only_layers or decoder_sparse_step): the layers the checkpoint routes must all
        # be built with one block class, which no layer it does not route is built with
        built = {info.index: type(getattr(self.hf_layers[info.index], spec.moe_attr, None))
                 for info in self.layout.decoder_layers if info.index < len(self.hf_layers)}
        moe = {built[i] for i in built if self.layout.layers[i].is_moe}
        for i, cls in built.items():
            routed = self.layout.layers[i].is_moe
            if (routed and len(moe) > 1) or (not routed and cls in moe):
                has, says = ("a router", f"a {cls.__name__}") if routed else ("no router", "an MoE block")
                raise ReamLiteError(f"{self.layout.path}: layer {i} has {has} in the checkpoint, config.json "
                                    f"describes {says} there; the config does not belong to these weights")

    # -- planning -----------------------------------------------------------------------------------------------
    def make_plan(
        self, tokens: int, extra_activation_bytes: int = 0, stores: float = 2, seq_len: int = 4096
    ) -> MemoryPlan:
        self.plan = plan_memory(
            self.layout,
            tokens,
            self.device,
            self.dtype,
            self.opts.max_gpu_memory,
            self.opts.max_cpu_memory,
            self.opts.tokens_per_batch,
            self.opts.store_tier,
            extra_activation_bytes,
            stores,
            seq_len,
            self.opts.expert_cache,
            max_chunk=self.opts.experts_per_chunk,
        )
        return self.plan

    def new_store(self, lengths: list[int], dtype: torch.dtype | None = None, tier: str | None = None,
                  width: int | None = None) -> HiddenStateStore:
        """A hidden-state buffer for sequences of `lengths`, in the planned tier (compute dtype by default; `tier`:
        another, e.g. the plan's `side_tier`), of `width` values per token (default: the residual's, every stream;
        an MoE block's output is `hidden` wide)."""
        assert self.plan is not None
        return HiddenStateStore(
            lengths, width or self.streams * self.hidden, dtype or self.dtype, tier or self.plan.store_tier,
            self.device, self.opts.work_dir,
        )

    def moe_input(self, h: HiddenStateStore) -> HiddenStateStore:
        """The MoE block's input in `h` after `attention_phase` (with several residual streams, the first `hidden`
        columns of each row; the stream weights follow them)."""
        return h if self.streams == 1 else h.columns(0, self.hidden)

    def stream_weights(self, h: HiddenStateStore) -> HiddenStateStore | None:
        """With several residual streams (DeepSeek-V4's hc_mult), the columns after the MoE block's input in `h`
        (or in its `moe_input` view: columns index whole rows): the weight the block's output enters each stream
        with, per token. None with one stream."""
        return h.columns(self.hidden, self.hidden + self.streams) if self.streams > 1 else None

    # -- weights ------------------------------------------------------------------------------------------------
    def _fill(self, module: nn.Module, key_prefix: str) -> nn.Module:
        """Materialise a meta module on the device with the checkpoint tensors named `{key_prefix}.{name}`."""
        names = set(module.state_dict().keys())
        non_persistent = [n for n, _ in module.named_buffers() if n not in names]
        computed = self._computed_modules(module, non_persistent, key_prefix)
        module.to_empty(device=self.device)
        r = self.layout.reader
        state = {}
        spec = self.layout.spec
        for name, t in module.state_dict().items():
            keys = spec.disk_keys(f"{key_prefix}.{name}")  # (renamed, or concatenated: ArchSpec.disk_renames)
            missing = [k for k in keys if k not in r]
            if missing:
                raise ReamLiteError(f"{self.layout.path}: missing tensor {missing[0]}")
            dtype = t.dtype if t.is_floating_point() else None
            parts = [r.get(k, dtype=dtype, device=self.device) for k in keys]
            state[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e).splitlines()[0])
            raise ReamLiteError(f"{self.layout.path}: {key_prefix}: the checkpoint's tensors do not fit the model "
                                f"config.json describes ({detail})") from None
        for path, fresh in computed.items():  # (after to_empty, which would have emptied their buffers)
            parent, _, name = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, name, fresh)
        return module.eval()

    def _computed_modules(self, module: nn.Module, non_persistent: list[str], key_prefix: str) -> dict[str, nn.Module]:
        """The submodules holding computed (non-persistent) buffers, built for real from the config: rotary
        embeddings inside a layer (DeepSeek-V4's compressors), which hold nothing the checkpoint stores."""
        out = {}
        for path in sorted({n.rpartition(".")[0] for n in non_persistent}):
            owner = module.get_submodule(path) if path else module
            try:
                if not path or owner.state_dict():
                    raise TypeError("it holds stored tensors too")
                with torch.device(self.device):
                    out[path] = type(owner)(self.hf_config).to(self.device)
            except (TypeError, ValueError, AttributeError, KeyError):
                raise ReamLiteError(f"{key_prefix}: module has computed buffers {non_persistent}; family not "
                                    "streamable") from None
        return out

    def _meta_layer(self, i: int) -> nn.Module:
        if i < len(self.hf_layers):
            return copy.deepcopy(self.hf_layers[i])
        # an MTP layer: the family's decoder layer class, built for that index (MoE, past the dense ones; a full
        # attention layer where the config types its layers: Qwen3-Next's MTP block)
        config = copy.deepcopy(self.hf_config)
        # per-layer lists indexed by the layer number, extended to it: an MTP layer attends fully (running its own
        # sparse-attention indexer) and routes (Qwen3-Next's layer_types; GLM-4.7-Flash's, DeepSeek-V3.2's and
        # GLM-5's mlp_layer_types; GLM-5's indexer_types)
        for key, kind in (("layer_types", "full_attention"), ("mlp_layer_types", "sparse"), ("indexer_types", "full")):
            types = getattr(config, key, None)
            if isinstance(types, (list, tuple)) and i >= len(types):
                setattr(config, key, list(types) + [kind] * (i + 1 - len(types)))
        with torch.device("meta"):
            return type(self.hf_layers[-1])(config, i).to(self.dtype)

    def moe_block(self, i: int) -> MoEBlock:
        """MoE layer i's block alone (router, shared expert ...), without materialising the rest of the layer."""
        return self.build_layer(i, with_layer=False)[1]

    def build_layer(self, i: int, with_layer: bool = True) -> tuple[nn.Module, MoEBlock | None, _MoECapture | None]:
        spec, info = self.layout.spec, self.layout.layers[i]
        layer = self._meta_layer(i)
        block = capture = None
        if info.is_moe:
            meta_block = getattr(layer, spec.moe_attr)
            capture = _MoECapture(spec.moe_returns_tuple)
            setattr(layer, spec.moe_attr, capture)
            moe_prefix = f"{info.prefix}.{spec.moe_disk}"
            shared = shared_gate = None
            if spec.shared_expert_attr:
                shared = self._fill(copy.deepcopy(getattr(meta_block, spec.shared_expert_attr)), f"{moe_prefix}.{spec.shared_expert_attr}")
            if spec.shared_gate_attr:
                shared_gate = self._fill(copy.deepcopy(getattr(meta_block, spec.shared_gate_attr)), f"{moe_prefix}.{spec.shared_gate_attr}")
            r = self.layout.reader
            bias = None
            bias_key = f"{moe_prefix}.{spec.router_bias}" if spec.router_bias else None
            # (a hash-routed layer has no selection bias: its table selects)
            if bias_key and (bias_key in r or not self.layout.hash_routed(i)):
                # one value per expert, whatever the stored shape (Ernie-4.5 stores [1, E])
                bias = r.get(bias_key, dtype=torch.float32, device=self.device).reshape(-1)
            # a float32 router (Ernie-4.5, HunYuan) keeps its stored precision whatever the compute dtype
            router_dtype = torch.float32 if self.router_cfg.fp32_logits else self.dtype
            block = MoEBlock(
                layer=i,
                router_weight=r.get(f"{moe_prefix}.{spec.router_weight}", dtype=router_dtype, device=self.device),
                router_bias=bias,
                router_cfg=self.router_cfg,
                shared=shared,
                shared_gate=shared_gate,
                act=self.layer_act(i),  # (gpt_oss, Ling 2.5: clamped, per layer)
                output_scale=spec.config_scalar(self.hf_config, spec.moe_output_scale_key),
            )
            if self.layout.latent:
                block.latent_in, block.latent_out = (self._fill(copy.deepcopy(getattr(meta_block, a)),
                                                                f"{moe_prefix}.{a}") for a in spec.latent_projections)
            if self.layout.hash_routed(i):
                block.hash_table = r.get(f"{moe_prefix}.{spec.hash_table}", device=self.device).long()
                block.hash_order = similarity_order(r.get(f"{moe_prefix}.{spec.router_weight}", dtype=torch.float64))
        if not with_layer and block is not None and not spec.moe_post_norm:
            return layer, block, None
        layer = self._fill(layer, info.prefix)
        if capture is not None and self.streams > 1:  # the weights the block's output enters each stream with
            def keep_post(_module, _inputs, output):
                capture.stream_weights = output[0]

            getattr(layer, spec.moe_stream_weights_attr).register_forward_hook(keep_post)
        if block is not None and spec.moe_post_norm:
            # (the layer applies it to the capture's zeros: nothing; run_moe applies it to the block's output)
            block.post_norm = getattr(layer, spec.moe_post_norm)
        return layer, block, capture

    # -- routed experts -----------------------------------------------------------------------------------------
    def layer_act(self, layer: int) -> Callable:
        """The activation of `layer`'s routed experts (`MoEBlock.act`)."""
        return expert_activation(self.layout.spec, self.hf_config, layer)

    @contextmanager
    def layer_experts(self, layer: int) -> Iterator[None]:
        """While open, `experts(layer, ...)` is served from one read of all of `layer`'s experts kept on the device,
        when the memory plan made room for them (else nothing changes: every load reads the checkpoint). They are
        freed on exit, before the next layer's weights come in."""
        if self.plan is None or not self.plan.cache_experts:
            yield
            return
        assert self._cache is None, "one layer's experts at a time"
        self._cache = LayerExpertCache(self.layout, layer, self.dtype, self.device)
        self.read_ahead(self.layer_after(layer))  # (this layer is read: the disk fetches the next meanwhile)
        try:
            yield
        finally:
            self._cache = None

    def layer_after(self, layer: int) -> list[str]:
        """The checkpoint keys of the layer compressed after `layer`, in the order it reads them (attention, norms,
        router and shared experts, then its routed experts); [] after the last."""
        n = len(self.layout.layers)
        if layer + 1 >= n:
            return []
        experts = self.layout.expert_keys(layer + 1)
        routed = set(experts)
        return [k for k in self.layout.layer_keys(layer + 1) if k not in routed] + experts

    def read_ahead(self, keys: list[str]) -> int:
        """`CheckpointReader.read_ahead` of `keys`, up to half the host memory available now (a window the page
        cache holds until the reads come; Kimi-K2's 17 GB layer would not fit a 24 GB machine beside the run), where
        it can overlap: `reads_ahead`."""
        if not keys or not reads_ahead(self.device):
            return 0
        return self.layout.reader.read_ahead(keys, available_ram() // 2)

    def stored_experts(self, layer: int) -> Callable[[int], list[dict[str, torch.Tensor]]] | None:
        """Expert e of `layer` -> its (gate, up, down) as stored, from the open cache; None where the cache does not
        hold the stored bytes (then the output copies them from the checkpoint)."""
        cache = self._cache
        return cache.stored if cache is not None and cache.layer == layer and cache.as_stored else None

    def holds_experts(self, layer: int, dtype: torch.dtype) -> bool:
        """Whether loads of `layer`'s experts in `dtype` are served by the open cache (read nothing)."""
        cache = self._cache
        return cache is not None and cache.layer == layer and cache.serves(dtype)

    def experts(self, layer: int, ids: list[int], dtype: torch.dtype | None = None, copy: bool = False
                ) -> ExpertWeights:
        """Experts `ids` of `layer` in `dtype` (default: the compute dtype) on the device, the values `load_experts`
        gives: from the open layer's cache when it holds them exactly, else from the checkpoint. A cached chunk may
        be a view of the cache: pass `copy` to write into it."""
        dtype = dtype or self.dtype
        if self.holds_experts(layer, dtype):
            return self._cache.take(ids, dtype, copy)
        return load_experts(self.layout, layer, ids, dtype, self.device)

    # -- the forward pass ---------------------------------------------------------------------------------------
    def embed(self, sequences: list[torch.Tensor]) -> HiddenStateStore:
        """Token ids (one 1-D tensor per sequence) -> layer-0 input hidden states."""
        if self.plan is None:
            self.make_plan(sum(len(s) for s in sequences), seq_len=max(len(s) for s in sequences))
        store = self.new_store([len(s) for s in sequences])
        w = self.layout.reader.get(self.layout.spec.embed_key, dtype=self.dtype, device=self.device)
        store.token_ids = token_ids(sequences)
        ids = store.token_ids.to(self.device)
        scale = self.layout.spec.config_scalar(self.hf_config, self.layout.spec.embedding_scale_key)
        for b in store.batches(self.opts.tokens_per_batch):
            e = F.embedding(ids[b.start : b.end], w)
            e = e * scale if scale != 1.0 else e
            if self.streams > 1:  # every residual stream starts as the embedding
                e = e.unsqueeze(1).expand(-1, self.streams, -1)
            store.write(b, e)
        del w
        return store

    def _mask_and_positions(self, x: torch.Tensor, layer: int | None = None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        bsz, t, _ = x.shape
        pos = torch.arange(t, device=x.device).unsqueeze(0).expand(bsz, -1)
        sliding = getattr(self.hf_config, "sliding_window", None) is not None and getattr(
            self.hf_config, "use_sliding_window", True
        ) is not False
        fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        if self.layout.spec.mask_by_layer_type and layer is not None:
            fn = self._layer_type_mask_fn(layer)
        # no KV cache: the keyword is `cache` in newer transformers, `past_key_values` (deprecated) before
        params = inspect.signature(fn).parameters
        extra = {"cache" if "cache" in params else "past_key_values": None}
        if self.layout.spec.materialised_mask and "allow_is_causal_skip" in params:
            extra["allow_is_causal_skip"] = False
        mask = fn(config=self.hf_config, inputs_embeds=x, attention_mask=None, position_ids=pos, **extra)
        if self.rotary is None:
            return mask, pos, None
        if self.layout.spec.rotary_types:  # (DeepSeek-V4: every rope type, each layer picks its own)
            return mask, pos, {t: self.rotary(x, pos, t) for t in self.layout.spec.rotary_types}
        if self._rotary_by_type:
            return mask, pos, self.rotary(x, pos, self._layer_type(layer))
        return mask, pos, self.rotary(x, pos)

    def _layer_type(self, layer: int | None) -> str:
        """config.layer_types' entry of `layer` (full attention past the list: an MTP layer)."""
        types = list(getattr(self.hf_config, "layer_types", None) or [])
        return types[layer] if layer is not None and layer < len(types) else "full_attention"

    def _layer_type_mask_fn(self, layer: int) -> Callable:
        """The mask builder transformers uses for `layer`'s config.layer_types entry. An MTP layer (past the decoder
        layers) attends as a full-attention layer. Sequences are never padded here, so a linear-attention layer
        gets what its builder makes of no padding mask (none)."""
        from transformers import masking_utils as mu

        builders = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask",
                    "chunked_attention": "create_chunked_causal_mask",
                    "linear_attention": "create_recurrent_attention_mask"}
        kind = self._layer_type(layer)
        if kind in ("moe", "mlp"):  # (Nemotron-H types its feed-forward-only layers: they take no mask)
            return lambda **_: None
        fn = getattr(mu, builders.get(kind, ""), None)
        if fn is None:
            raise ReamLiteError(f"layer {layer}: attention type '{kind}' has no mask builder in this transformers")
        return fn

    def attention_phase(self, i: int, h: HiddenStateStore, out: HiddenStateStore) -> MoEBlock | None:
        """Layer i without its routed experts: `out` = residual after attention (or the whole output of a dense
        layer); for an MoE layer `h` is overwritten with the MoE block's input and the block is returned."""
        layer, block, capture = self.build_layer(i)
        out.token_ids = h.token_ids  # (the same tokens, one layer on)
        moe_in, weights = self.moe_input(h), self.stream_weights(h)
        with torch.inference_mode():
            for b in h.batches(self.opts.tokens_per_batch):
                x = h.read(b, self.device)
                mask, pos, pe = self._mask_and_positions(x, i)
                if self.streams > 1:  # [B, T, streams, hidden], as the layer takes its residual
                    x = x.view(*x.shape[:2], self.streams, self.hidden)
                y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                y = y[0] if isinstance(y, tuple) else y
                out.write(b, y)
                if capture is not None:
                    moe_in.write(b, capture.captured)
                    capture.captured = None
                    if weights is not None:
                        weights.write(b, capture.stream_weights)
        return block

    def run_layer(
        self, i: int, h: HiddenStateStore, out: HiddenStateStore, observer: MoEObserver | None = None
    ) -> None:
        """Layer i: h (input) -> out (output). For an MoE layer, h holds the MoE block input afterwards."""
        block = self.attention_phase(i, h, out)
        if block is not None:
            self.run_moe(block, self.moe_input(h), out, observer)

    def run_moe(
        self,
        block: MoEBlock,
        moe_in: HiddenStateStore,
        out: HiddenStateStore | None,
        observer: MoEObserver | None = None,
        experts: Callable[[list[int]], ExpertWeights] | None = None,
        chunks: list[list[int]] | None = None,
        first_call: bool = True,
    ) -> None:
        """Run the MoE block over the cached inputs, expert chunk by expert chunk, adding into `out` (if given).

        `experts` loads a chunk by expert position in `block`'s router (default: the layer's own experts, through
        `experts`); a method passes its compressed experts here together with a restricted block. `first_call`
        False: `chunks` continue an earlier call over the same block (the shared expert was added then).
        """
        load = experts or (lambda ids: self.experts(block.layer, ids))
        n = block.router_cfg.num_experts
        if chunks is None:
            chunks = self.expert_chunks(n)
        batches = moe_in.batches(self.opts.tokens_per_batch)
        # into a residual of several streams (an `out` as wide as all of them, not an MoE-output store): the output
        # enters each stream scaled by its weight, kept in the columns after the input (`attention_phase`)
        weights = None
        if out is not None and out.hidden == self.streams * moe_in.hidden:
            weights = self.stream_weights(moe_in)
        # a post-norm block's output is normed whole: over several chunks it is summed here first (float32)
        pending = None
        if block.post_norm is not None and out is not None and len(chunks) > 1:
            pending = self.new_store(moe_in.lengths, torch.float32, self.plan.side_tier if self.plan else None,
                                     width=moe_in.hidden)
            pending.buf.zero_()
        ahead = experts is None and not self.holds_experts(block.layer, self.dtype) and \
            self.layout.layers[block.layer].expert_storage == "per_expert"
        with torch.inference_mode():
            for c, ids in enumerate(chunks):
                w = load(ids)
                if ahead and c + 1 < len(chunks):  # (read from the checkpoint: the next chunk's bytes come meanwhile)
                    self.read_ahead([k for e in chunks[c + 1] for k in self.layout.per_expert_keys(block.layer, e)])
                for b in batches:
                    x = moe_in.read(b, self.device).reshape(-1, moe_in.hidden)
                    routing = block.route(x, moe_in.batch_ids(b))
                    xe = block.expert_input(x)  # (a latent MoE's experts see the projected input)
                    if observer is not None and c == 0 and first_call:
                        observer.on_routing(block.layer, b, xe, routing)
                    if observer is not None:
                        observer.on_experts(block.layer, b, xe, routing, w)
                    if out is None:
                        continue
                    # float32 sums: more exact than bf16 and, on a CPU, far faster (bf16 index_add_ is slow there)
                    acc = torch.zeros(xe.shape, dtype=torch.float32, device=x.device)
                    add_routed_output(acc, xe, routing.indices, routing.weights, w, block.act, routing.by_expert,
                                      block.router_cfg.scales_input)
                    acc = block.to_hidden(acc, with_bias=c == 0 and first_call)
                    if c == 0 and first_call:
                        shared = block.shared_output(x)
                        if shared is not None:
                            acc += shared.float()
                        if routing.identity is not None and block.identity_output:
                            acc += routing.identity[:, None] * x.float()
                    if block.output_scale != 1.0:
                        acc *= block.output_scale
                    if pending is not None:
                        pending.add_(b, acc)
                        continue
                    if block.post_norm is not None:
                        acc = block.post_norm(acc.to(x.dtype)).float()
                    if weights is not None:  # [T, streams, hidden]
                        w_s = weights.read(b, self.device).reshape(-1, self.streams, 1).float()
                        acc = w_s * acc[:, None, :]
                    out.add_(b, acc)
                del w
            if pending is not None:
                for b in batches:
                    y = pending.read(b, self.device).to(self.dtype)
                    out.add_(b, block.post_norm(y).float())
                pending.close()

    def expert_chunks(self, n: int) -> list[list[int]]:
        """The expert chunks a pass over all n experts of a layer runs (the memory plan's chunk size)."""
        size = self.plan.experts_per_chunk if self.plan else n
        return [list(range(a, min(a + size, n))) for a in range(0, n, size)]

    def forward_layers(
        self, h: HiddenStateStore, observer: MoEObserver | None = None, desc: str = "layers"
    ) -> HiddenStateStore:
        """Run every decoder layer (not MTP layers); returns the store with the last layer's output."""
        out = self.new_store(h.lengths)
        layers = self.layout.decoder_layers
        for info in tqdm(layers, desc=desc, disable=not self.opts.progress, leave=False):
            self.run_layer(info.index, h, out, observer)
            h, out = out, h
        out.close()
        return h

    # -- head ---------------------------------------------------------------------------------------------------
    def norm_module(self, weight_key: str) -> nn.Module:
        """The model's final-norm class filled with the weight `weight_key` (final norm, MTP enorm/hnorm ...)."""
        # (the final norm's class, whatever the decoder calls it: `norm`, Jamba's `final_layernorm`)
        name = self.layout.spec.final_norm_key.rsplit(".", 2)[-2]
        return self._fill(copy.deepcopy(getattr(self.base, name, None) or self.base.norm), weight_key.rsplit(".", 1)[0])

    def head(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """(the final norm, as a function of the last layer's output [B, T, residual width], the lm_head weight)."""
        norm = self.norm_module(self.layout.spec.final_norm_key)
        lm_head = self.layout.reader.get(self.layout.lm_head_key, dtype=self.dtype, device=self.device)
        if self.streams > 1:  # the streams collapsed into one first (DeepSeek-V4's hc_head)
            head = self.stream_head
            return (lambda x: norm(head(x.view(*x.shape[:2], self.streams, self.hidden)))), lm_head
        return norm, lm_head

    def mtp_inputs(
        self, i: int, sequences: list[torch.Tensor], previous: HiddenStateStore, previous_norm_key: str
    ) -> HiddenStateStore:
        """Input of MTP layer i at position p: eh_proj(cat(enorm(embed(t[p + 1])), hnorm(norm(h[p])))) for
        p < T - 1, where h is `previous` (the last decoder layer's output, or the previous MTP layer's)."""
        spec, r = self.layout.spec, self.layout.reader
        prefix = self.layout.layers[i].prefix
        embed_key = spec.mtp_key(prefix, spec.mtp_embed)
        emb = r.get(embed_key if embed_key in r else spec.embed_key, dtype=self.dtype, device=self.device)
        prev_norm = self.norm_module(previous_norm_key)
        enorm = self.norm_module(spec.mtp_key(prefix, spec.mtp_enorm))
        hnorm = self.norm_module(spec.mtp_key(prefix, spec.mtp_hnorm))
        proj = r.get(spec.mtp_key(prefix, spec.mtp_proj), dtype=self.dtype, device=self.device)
        store = self.new_store([len(s) - 1 for s in sequences])
        with torch.inference_mode():
            for b in previous.batches(self.opts.tokens_per_batch):
                h = previous.read(b, self.device)[:, :-1]
                ids = torch.stack([sequences[j][1:] for j in b.seqs]).to(self.device)
                x = torch.cat([enorm(F.embedding(ids, emb)), hnorm(prev_norm(h))], dim=-1)
                first, last = b.seqs.start, b.seqs.stop
                dst = Batch(b.seqs, b.length - 1, int(store.offsets[first]), int(store.offsets[last]))
                store.write(dst, F.linear(x, proj))
        return store

    def logits(self, h: HiddenStateStore, max_tokens: int | None = None) -> Iterator[tuple[Batch, torch.Tensor]]:
        """(batch, float32 logits [B, T, V]) for every batch of the final hidden states."""
        norm, lm_head = self.head()
        divisor = self.layout.spec.config_scalar(self.hf_config, self.layout.spec.logits_divisor_key)
        with torch.inference_mode():
            for b in h.batches(max_tokens or self.opts.tokens_per_batch):
                x = h.read(b, self.device)
                y = F.linear(norm(x), lm_head)
                yield b, (y / divisor if divisor != 1.0 else y).float()
