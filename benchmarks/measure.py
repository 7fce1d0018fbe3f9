"""Measuring one run from inside its own process: peak host RSS, peak GPU memory as torch and as the driver see it,
wall time; the page-cache eviction and the matmul rate behind the floors a run is compared against.

Used by scale.py (and its children scale_child.py and reference_style.py), so that ream-lite and the
reference-style run are measured by the same code.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from ream_lite.rates import timed_rate
from ream_lite.report import peak_host_bytes


class GpuSampler:
    """The driver's view of GPU memory, sampled every `period` seconds in a thread: this process's own use as NVML
    reports it (CUDA context, allocator cache and all; what nvidia-smi lists for the process), and the whole card's
    used memory (total - free, other processes included); torch's own peak counters are read at the end."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.peak = self.own_peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        if torch.cuda.is_available():
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            self.baseline = total - free  # this process's context and whatever other processes hold
            self.peak = self.baseline
            torch.cuda.reset_peak_memory_stats()
            self._nvml = _nvml_handle()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _own(self) -> int:
        import pynvml

        pid = os.getpid()
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml)
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            tick += 1
            # NVML's process list is slow (milliseconds, GIL held): every 10th sample, so the run is not slowed
            if self._nvml is not None and tick % 10 == 0:
                try:
                    self.own_peak = max(self.own_peak, self._own())
                except Exception:  # noqa: BLE001 (a sampler must not stop the run it measures)
                    self._nvml = None
            time.sleep(self.period)

    def stop(self) -> dict:
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        out = {"gpu_driver_peak_bytes": self.peak, "gpu_driver_baseline_bytes": self.baseline,
               "gpu_torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
               "gpu_torch_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        if self.own_peak:
            out["gpu_process_peak_bytes"] = self.own_peak
        return out


def _nvml_handle():
    """NVML's handle of the current device, or None without nvidia-ml-py (the card-wide figure remains)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # noqa: BLE001
        return None


def host_peak() -> int:
    return peak_host_bytes() or 0


# ---------------------------------------------------------------- floors


def evict_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop these files' cached pages (clean pages go; needs no privileges), so the next read of
    them comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """FLOP/s of x[m, k] @ w[n, k].T in `dtype` on `device` (F.linear, as the engine calls it), on random data, timed
    as `ream-lite plan` times the engine's own code."""
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    return timed_rate(2.0 * m * k * n, lambda: torch.nn.functional.linear(x, w), torch.device(device), seconds)
