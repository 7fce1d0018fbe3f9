"""Memory planning from tensor sizes, before any work: store tier, expert chunk size, token batch size, and whether
an MoE layer's experts are read once and kept on the device while it is compressed (`expert_cache`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.expert_cache import encoded_cache_bytes
from ream_lite.engine.experts import expert_bytes
from ream_lite.engine.store import Tier, choose_tier
from ream_lite.errors import ReamLiteError

GiB = 1024**3
EXPERT_CACHE_MODES = ("auto", "off")


def parse_bytes(text: str | None) -> int | None:
    """'24GB', '24GiB', '1.5G', '800MB', '123' (bytes) -> bytes. GB and GiB both mean 2**30 here."""
    if text is None:
        return None
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 1024**4, "GB": GiB, "MB": 1024**2, "KB": 1024, "T": 1024**4, "G": GiB, "M": 1024**2, "K": 1024, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(float(s))


def physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GiB


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, where the platform tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_ram() -> int:
    """Host memory the kernel could hand out now without swapping (MemAvailable: free plus reclaimable page
    cache); a quarter of RAM where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_ram() // 4


def default_cpu_budget() -> int:
    """Host RAM the hidden-state store may use by default: 40% of RAM, at most 16 GiB."""
    return min(16 * GiB, int(0.4 * physical_ram()))


# Left out of the default device budget on top of what other processes hold: the CUDA context of this process
# is already counted in `free`, this is for allocator fragmentation and kernels' workspaces.
GPU_HEADROOM = 512 * 1024**2


def default_gpu_budget(device: torch.device) -> int:
    """90% of the card, but never more than what is free now less a little headroom: a 24 GB card that also
    drives a display has 1-2 GiB taken by other processes, and 90% of its total would overcommit it."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, min(int(0.9 * total), free - GPU_HEADROOM))
    return 0


def require_device(device: torch.device) -> None:
    """Refuse a CUDA device on a machine without one, before any work."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReamLiteError("--device cuda requested but no CUDA device is available")


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    store_tier: Tier
    store_bytes: int  # one hidden-state buffer
    stores: float  # buffers alive at once, in units of one buffer (layer input + output, + a kept reference for
    # eval, + the guard's held-out outputs)
    tokens: int
    tokens_per_batch: int
    max_layer_dense_bytes: int  # largest non-expert part of a decoder layer, decoded
    expert_bytes: int  # one routed expert, decoded
    experts_per_chunk: int
    max_experts: int
    device_budget: int
    host_budget: int
    activation_bytes: int
    layer_experts_bytes: int = 0  # every routed expert of the largest MoE layer, decoded
    expert_cache: str = "auto"  # as asked: auto | off
    cache_experts: bool = False  # an MoE layer's experts are read once and kept on the device while it is compressed
    # one more buffer placed after the others, in what room they leave (the refit's float32 target / residual):
    # the hidden states keep their tier, and this one alone goes to host RAM or the work dir when it must
    side_store_bytes: int = 0
    side_tier: Tier = "host"
    # where a GPU run parks the alignment pass's Grams once each chunk is done (passes.gram_park): host memory, or
    # files in the work dir when they would not fit the host budget beside the host-tier stores (Kimi-K2's guard:
    # ~50 GiB a layer); `gram_spill_bytes` of them at most
    gram_tier: Tier = "host"
    gram_spill_bytes: int = 0
    # where merged experts wait until the layer is written (the guard holds up to three candidates' sets): host
    # memory, or work-dir files beyond the host budget (Kimi-K2's: ~28 GiB a layer)
    merged_tier: Tier = "host"
    merged_spill_bytes: int = 0

    def side_bytes(self, tier: str) -> int:
        return self.side_store_bytes if self.side_tier == tier else 0

    @property
    def all_stores_bytes(self) -> int:
        return int(self.stores * self.store_bytes)

    @property
    def expert_cache_bytes(self) -> int:
        """Device bytes the expert cache holds while an MoE layer is compressed (0 without it)."""
        return self.layer_experts_bytes if self.cache_experts else 0

    @property
    def peak_device_bytes(self) -> int:
        chunk = self.experts_per_chunk * self.expert_bytes
        store = (self.all_stores_bytes if self.store_tier == "device" else 0) + self.side_bytes("device")
        return self.max_layer_dense_bytes + chunk + store + self.activation_bytes + self.expert_cache_bytes

    @property
    def peak_host_bytes(self) -> int:
        store = (self.all_stores_bytes if self.store_tier == "host" else 0) + self.side_bytes("host")
        if self.device == "cpu":
            return self.peak_device_bytes + store
        return store + self.max_layer_dense_bytes  # staging of weights on their way to the device

    @property
    def disk_bytes(self) -> int:
        return (self.all_stores_bytes if self.store_tier == "disk" else 0) + self.side_bytes("disk") + (
            self.gram_spill_bytes if self.gram_tier == "disk" else 0) + (
            self.merged_spill_bytes if self.merged_tier == "disk" else 0)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return [
            f"device {self.device}, compute dtype {self.dtype}",
            f"hidden states: {self.tokens:,} tokens, {g(self.store_bytes)} per buffer x{self.stores:g}, tier '{self.store_tier}'",
            f"largest decoder layer without routed experts: {g(self.max_layer_dense_bytes)}",
            f"routed experts: {g(self.expert_bytes)} each, {self.experts_per_chunk} of {self.max_experts} per chunk",
            f"experts: {self.expert_cache_line()}",
            f"batches of up to {self.tokens_per_batch:,} tokens; activations ~{g(self.activation_bytes)}",
            f"expected peak: device {g(self.peak_device_bytes)}, host {g(self.peak_host_bytes)}, "
            f"work dir {g(self.disk_bytes)}",
        ]

    def expert_cache_line(self) -> str:
        size = f"{self.layer_experts_bytes / GiB:.2f} GiB"
        if self.cache_experts:
            return f"cached once per layer ({size}): every pass of a layer runs them from one read"
        why = "--expert-cache off" if self.expert_cache == "off" else "no room in the budget"
        return f"re-read from the checkpoint by every pass ({why}; all of a layer's take {size})"


def plan_memory(
    layout: ModelLayout,
    tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    max_gpu_memory: int | None = None,
    max_cpu_memory: int | None = None,
    tokens_per_batch: int = 4096,
    store_tier: str = "auto",
    extra_activation_bytes: int = 0,
    stores: float = 2,
    seq_len: int = 4096,
    expert_cache: str = "auto",
    phase_bytes: int = 0,
    side_stores: float = 0.0,
    max_chunk: int | None = None,
) -> MemoryPlan:
    """The plan for `tokens` hidden states. `phase_bytes`: the most device bytes a pass of the caller holds in place
    of an expert chunk (the alignment pass's chunk, a merge in float32), beside which the expert cache must fit.

    The expert chunk is sized as without the cache (the chunking decides float rounding; the cache must not), and
    the cache is used only when all of a layer's experts fit beside the largest chunk or pass as well. `max_chunk`:
    at most this many experts per chunk (--experts-per-chunk)."""
    if max_chunk is not None and max_chunk < 1:
        raise ReamLiteError(f"--experts-per-chunk {max_chunk}: give at least 1")
    if expert_cache not in EXPERT_CACHE_MODES:
        raise ReamLiteError(f"--expert-cache {expert_cache}: choose from {', '.join(EXPERT_CACHE_MODES)}")
    elt = torch.empty(0, dtype=dtype).element_size()
    cfg = layout.config
    hidden = int(cfg["hidden_size"])
    host_budget = max_cpu_memory if max_cpu_memory is not None else default_cpu_budget()
    device_budget = max_gpu_memory if max_gpu_memory is not None else default_gpu_budget(device)
    if device.type == "cpu":
        device_budget = host_budget if max_gpu_memory is None else max_gpu_memory

    dense = 0
    for layer in layout.layers:
        expert_keys = set(layout.expert_keys(layer.index))
        if layer.is_mtp:  # the MTP embedding and head are used before / outside the layer, not with it
            spec = layout.spec
            expert_keys |= {spec.mtp_key(layer.prefix, spec.mtp_embed), spec.mtp_key(layer.prefix, spec.mtp_head)}
        nbytes = sum(
            layout.reader.entry(k).numel * elt
            for k in layout.layer_keys(layer.index)
            if k not in expert_keys
        )
        dense = max(dense, nbytes)
    moe = layout.moe_layers
    e_bytes = max(expert_bytes(layout, m.index, dtype) for m in moe)
    max_n = max(m.num_experts for m in moe)
    inter = max(int(cfg.get(layout.spec.moe_intermediate_key) or 0), 1)
    heads = int(cfg.get("num_attention_heads", 1))
    # per token in flight: a few hidden-sized vectors, the widest expert activation, router scores, and attention
    # probabilities (sdpa's math path may materialise heads x T x T per sequence).
    act = tokens_per_batch * elt * (8 * hidden + 3 * inter + 4 * max_n) + extra_activation_bytes
    act += tokens_per_batch * heads * 4 * min(tokens_per_batch, seq_len)

    store_bytes = tokens * layout.residual_width * elt  # (DeepSeek-V4: hc_mult streams of `hidden` per token)
    # (the stores stay on the device only beside a few experts' chunk and the largest phase of a layer's passes)
    device_free = device_budget - dense - act - max(e_bytes * min(max_n, 8), phase_bytes)
    tier = choose_tier(store_bytes, stores, device, device_free, host_budget, store_tier)
    on_device = tier == "device" or (device.type == "cpu" and tier == "host")
    left = device_budget - dense - act - (int(stores * store_bytes) if on_device else 0)
    chunk = max(1, min(max_n, left // max(e_bytes, 1), max_chunk or max_n))
    # (an encoded layer's cache keeps the stored parts beside the decoded values: expert_cache.keeps_encoded)
    layer_experts = max(m.num_experts * expert_bytes(layout, m.index, dtype) + encoded_cache_bytes(layout, m.index)
                        for m in moe)
    cached = expert_cache == "auto" and layer_experts + max(chunk * e_bytes, phase_bytes) <= left
    # the side buffer in the room the rest leaves (never at the cost of the chunk, the cache or the other buffers)
    side_bytes = int(side_stores * store_bytes)
    device_room = left - max(chunk * e_bytes, phase_bytes) - (layer_experts if cached else 0)
    host_room = host_budget - (int(stores * store_bytes) if tier == "host" else 0)
    if side_bytes and store_tier != "auto":
        side_tier = tier
    elif device.type != "cpu" and side_bytes <= device_room:
        side_tier = "device"
    elif side_bytes <= (device_room if device.type == "cpu" else host_room):
        side_tier = "host"
    else:
        side_tier = "disk"
    return MemoryPlan(
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        store_tier=tier,
        store_bytes=store_bytes,
        stores=stores,
        tokens=tokens,
        tokens_per_batch=tokens_per_batch,
        max_layer_dense_bytes=dense,
        expert_bytes=e_bytes,
        experts_per_chunk=int(chunk),
        max_experts=max_n,
        device_budget=device_budget,
        host_budget=host_budget,
        activation_bytes=act,
        layer_experts_bytes=layer_experts,
        expert_cache=expert_cache,
        cache_experts=cached,
        side_store_bytes=side_bytes,
        side_tier=side_tier,
    )


def expert_width(expert_bytes: int, elt: int, hidden: int) -> int:
    """An expert's intermediate width from its decoded bytes (gate, up and down of hidden x I values of `elt`
    bytes): from the tensors, since families name the config key differently."""
    return expert_bytes // elt // (3 * hidden)


def alignment_chunk_size(experts_per_chunk: int, expert_bytes: int, inter: int) -> int:
    """Experts an alignment pass runs at once (a centroid and some of its members): as many as fit in an expert
    chunk's room together with the float64 [I, I] Gram each member's pair sums beside them (at least a pair)."""
    return max(2, experts_per_chunk * expert_bytes // (expert_bytes + 8 * inter * inter))


MERGE_HELD = 7  # float32 experts a merge holds beside its slice of members: the centroid, the sum, a permuted
# copy, and (aligning by weights) the centroid's and a member's float64 features


def merge_slice_size(experts_per_chunk: int, expert_bytes: int, elt: int) -> int:
    """Members a merge loads at once (float32) so that it holds no more than an expert chunk's room (at least one)."""
    return max(1, experts_per_chunk * expert_bytes // (expert_bytes // elt * 4) - MERGE_HELD)
