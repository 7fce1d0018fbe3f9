"""ream-lite: compress Mixture-of-Experts checkpoints layer by layer, streaming, on hardware people own."""

import os

# PyTorch's bfloat16 matmuls on a CPU go through oneDNN, which caches one compiled primitive (and ideep one reordered
# operand) per operand shape, 1024 of each by default. An expert's token count differs per batch and per layer, so
# nearly every call is a new shape: the caches filled at ~40 MB a layer and the heap they fragmented kept growing
# after they were full (12 Qwen3-MoE-shaped layers, REAP + refit: resident set 0.99 -> 1.71 GiB between layers,
# peak 2.05 GiB). Capped at 128 entries each it stays flat (1.01 -> 1.00 GiB, peak 1.34 GiB) in the same time
# (76.8 s against 76.5 s). The caps are read when oneDNN first builds a primitive; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

__version__ = "0.1.0"
