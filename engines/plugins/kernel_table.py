"""The tables both plugin registrations read (tensorrt.plugin and TensorRT-RTX's IPluginV3): type
combinations, float attributes, and each op's kernel."""

from __future__ import annotations

from typing import Any

from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, INTERACTION_ATTENTION, KV_SCALES, WINDOW_MAX_POOL

from . import decode_attention, interaction_attention, window_max_pool

LOCAL_FUNCTION = "local function"  # no plugin registered: the parser inlines the node's standard-op decomposition


# The type combinations each kernel takes, per input then output, in tensorrt.plugin's AutoTuneCombination notation:
# position by position, the i-th choice of every multi-choice position goes together (all float, or all half).
TYPE_COMBINATIONS = {
    # q, k, v, start, end -> out; the cache is q's type or int8 (dequantized in the kernel by k_scale / v_scale)
    DECODE_ATTENTION: (
        "FP32|FP16|FP32|FP16, FP32|FP16|INT8|INT8, FP32|FP16|INT8|INT8, INT32, INT32, FP32|FP16|FP32|FP16"
    ),
    INTERACTION_ATTENTION: "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16",  # q, k, v -> out
    WINDOW_MAX_POOL: "FP32|FP16|INT8, INT64, FP32|FP16|INT8",  # grid, index (its length is the output side) -> out
}


# Each op's float attributes (ONNX node attributes, plugin fields) and their defaults.
ATTRIBUTES = {DECODE_ATTENTION: dict.fromkeys(KV_SCALES, 1.0), INTERACTION_ATTENTION: {}, WINDOW_MAX_POOL: {}}


def run_kernel(op: str, inputs: list[Any], out: Any, attributes: dict[str, float] | None = None) -> None:
    """The op's Triton kernel on device tensors (the plugin's inputs, its output buffer), on the current stream.
    Every plugin's enqueue comes here, possibly while the stream is captured into a CUDA graph: only host-side
    checks (shapes, dtypes) run, never one that reads a device value, which would synchronize and end the capture
    (tests/test_plugin_kernels.py drives this with meta tensors, whose values cannot be read)."""
    if op == DECODE_ATTENTION:
        decode_attention.decode_attention(*inputs, **(attributes or {}), out=out, check_values=False)
    elif op == INTERACTION_ATTENTION:
        interaction_attention.interaction_attention(*inputs, out=out)
    else:
        window_max_pool.window_max_pool(inputs[0], int(inputs[1].shape[0]), out=out)
