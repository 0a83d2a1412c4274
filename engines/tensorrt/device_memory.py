"""How the TensorRT runtime allocates device memory, as rules the build planner counts by too (plan.py), so the
`--device-memory` check is made against what a load will really allocate.

- Scratch: every execution context is created with `ExecutionContextAllocationStrategy.USER_MANAGED` and given one
  block shared by all of them (`set_device_memory`), because they run one at a time on one stream. TensorRT's
  default (STATIC) would give each context its own block of its engine's largest size (docs/tensorrt.md section 7.1).
- KV cache: one buffer per cache tensor where the engine updates it in place (TensorRT's KV-cache update layer
  aliases `present` to `past`), two that take turns otherwise (kv_buffers.py).

No torch and no TensorRT here: the planner runs without either.
"""

from __future__ import annotations

from collections.abc import Iterable

# CUDA's allocation granularity for device pointers; TensorRT asks for 256-byte aligned addresses (NvInferRuntime.h)
ALIGNMENT = 256


def shared_scratch_bytes(per_context: Iterable[int]) -> int:
    """The one scratch block every context shares: the largest any of them needs (never two at once)."""
    largest = max(per_context, default=0)
    return -(-largest // ALIGNMENT) * ALIGNMENT


def kv_buffers(in_place: bool) -> int:
    """Buffers a KV-cache tensor needs: one where the engine updates it in place, two that take turns otherwise."""
    return 1 if in_place else 2


IN_PLACE_OP = "TensorScatter"  # the ONNX write TensorRT turns into its KV-cache update layer (10.15+)


def writes_in_place(write_ops: Iterable[str], kv_dtype: str) -> bool:
    """Whether the engines will update the cache in place, from the ONNX ops that write it (the decoder graphs'
    `present_*` producers): only TensorScatter on a float cache becomes TensorRT's KV-cache update layer
    (an INT8 cache is written by ScatterND, engines/quantization/kv_cache.py)."""
    ops = set(write_ops)
    return ops == {IN_PLACE_OP} and kv_dtype != "int8"
