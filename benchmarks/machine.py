"""The machine a benchmark ran on, and its memory bandwidth measured in the same run.

Decode is memory-bound: each token streams every decoder weight and the KV columns it attends to. The bound a
backend is held to is therefore this machine's own streaming bandwidth at the run's thread count, measured with a
large matrix-vector product (the decode step's dominant operation), not a datasheet figure.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    versions = {"python": platform.python_version()}
    for dist in ("fusion-export", "torch", "onnxruntime", "onnxruntime-genai", "transformers", "tensorrt",
                 "tensorrt-rtx-cu12"):  # fmt: skip
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def measure_bandwidth(threads: int, device: str = "cpu", megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second a matrix-vector product streams (best of `repeats`): fp32 on the CPU with `threads`
    threads, fp16 on a GPU (CUDA events)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dtype = torch.float32 if device == "cpu" else torch.float16
        side = int((megabytes * 2**20 / torch.finfo(dtype).bits * 8) ** 0.5)
        matrix = torch.randn(side, side, dtype=dtype, device=device)
        vector = torch.randn(side, dtype=dtype, device=device)
        nbytes = matrix.numel() * matrix.element_size()
        best = float("inf")
        for _ in range(repeats):
            if device == "cpu":
                start = time.perf_counter()
                torch.mv(matrix, vector)
                best = min(best, time.perf_counter() - start)
            else:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                torch.mv(matrix, vector)
                end.record()
                torch.cuda.synchronize()
                best = min(best, begin.elapsed_time(end) / 1e3)
        return nbytes / best
    finally:
        torch.set_num_threads(saved)


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process."""
    current = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return current, peak
