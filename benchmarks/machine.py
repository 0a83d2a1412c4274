"""The machine a benchmark ran on, and its memory bandwidth measured in the same run.

Decode is memory-bound: each token streams every decoder weight and the KV columns it attends to. The bound a
backend is held to is therefore this machine's own streaming bandwidth at the run's thread count, measured with a
large matrix-vector product (the decode step's dominant operation), not a datasheet figure.
"""

from __future__ import annotations

import functools
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


def measure_bandwidth(threads: int, device: str = "cpu", megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second this machine streams from memory (best of `repeats`, the best of the methods): on the CPU
    with `threads` threads, a fp32 matrix-vector product as ONNX Runtime runs a decode step's projections, and a
    plain reduction (torch's own GEMV streams less than either here: ~22 vs ~32 GB/s on 2 cores); on a GPU, an
    fp16 matrix-vector product timed with CUDA events. The buffer (1 GiB) is far larger than any cache."""
    import torch

    if device != "cpu":
        return _cuda_gemv_bandwidth(megabytes, repeats)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = _stream_buffer(megabytes)
        rates = [data.numel() * 4 / _best(lambda: data.sum(), repeats)]
        rates.append(_ort_gemv_bandwidth(data.numpy(), threads, repeats))
        return max(r for r in rates if r)
    finally:
        torch.set_num_threads(saved)


@functools.cache
def _stream_buffer(megabytes: int):
    """The probe's float32 buffer, made once per run: the bench probes at the start of every round."""
    import torch

    return torch.full((megabytes * 2**20 // 4,), 0.5)


def _best(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _ort_gemv_bandwidth(flat, threads: int, repeats: int) -> float | None:
    """ONNX Runtime's MatMul of one row against a prepacked [K, N] fp32 weight built from `flat`."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    k = 4096
    weight = flat[: (flat.size // k) * k].reshape(k, -1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [1, k]), ("w", weight.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("x", np.ones((1, k), np.float32))
    binding.bind_cpu_input("w", weight)  # bound, not copied
    binding.bind_output("y", "cpu")
    session.run_with_iobinding(binding)
    return weight.nbytes / _best(lambda: session.run_with_iobinding(binding), repeats)


def _cuda_gemv_bandwidth(megabytes: int, repeats: int) -> float:
    import torch

    side = int((megabytes * 2**20 / 2) ** 0.5)
    matrix = torch.randn(side, side, dtype=torch.float16, device="cuda")
    vector = torch.randn(side, dtype=torch.float16, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.mv(matrix, vector)
        end.record()
        torch.cuda.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3)
    return matrix.numel() * 2 / best


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
