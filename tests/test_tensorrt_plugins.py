"""The plugins' TensorRT registration (engines/plugins/tensorrt_plugins.py) and their ahead-of-time kernels.

What runs here for real: Triton compiling every plugin kernel to PTX for Jetson Orin (sm_87) and Hopper (sm_90) at
FUSION's full-size shapes, with the launch description TensorRT would use; TensorRT-RTX, whose plugin API does not
import, takes the IPluginV3 classes instead (tests/test_rtx_plugins.py). What cannot run here is `tensorrt.plugin`
itself (enterprise TensorRT does not install here); its decorators are recorded by a minimal stand-in so that
the bodies we hand them (output descriptors, type combinations, aot_impl) run over real shapes.

Compiling happens in a fresh process: Triton's interpreter, which other test modules run in this one, patches
triton.language in place and compiled kernels then fail to build.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("triton")

from engines.plugins import decode_attention, interaction_attention, window_max_pool  # noqa: E402
from engines.plugins.kernel_table import ATTRIBUTES  # noqa: E402
from engines.plugins.launch import compile_ptx  # noqa: E402
from engines.plugins.tensorrt_plugins import _DEFINITIONS, register_plugins  # noqa: E402
from fusion_export.plugin_ops.onnx_forms import (  # noqa: E402
    DECODE_ATTENTION,
    DOMAIN,
    INTERACTION_ATTENTION,
    WINDOW_MAX_POOL,
)
from reference_model.config import preset_config  # noqa: E402
from reference_model.errors import FusionError  # noqa: E402


def _full_size_inputs() -> dict[str, tuple]:
    """Per plugin op: its module, its inputs as (shape, dtype) and its output shape at the full-size model's shapes
    (batch 1, query_len 64, 4096 KV columns), all read off the preset."""
    from fusion_export.plugin_ops.reference import window_indices

    cfg = preset_config("fusion-phi3.5-3b")
    d, it = cfg.decoder, cfg.interaction
    s, w, capacity = 8, it.window_size, 4096
    q = (1, d.num_heads, 1, d.head_dim)
    kv = (1, d.num_kv_heads, capacity, d.head_dim)
    latents = (1, s, s, it.num_heads, d.hidden_size // it.num_heads)
    context = (1, s * w, s * w, *latents[3:])
    side = 2 * math.isqrt(cfg.vision.num_patches)
    grid = (1, side, side, cfg.vision.hidden_size)
    table = tuple(window_indices(side, s).shape)
    f16 = "float16"
    return {
        DECODE_ATTENTION: (decode_attention, [(q, f16), (kv, f16), (kv, f16), ((1,), "int32"), ((1,), "int32")], q),
        INTERACTION_ATTENTION: (interaction_attention, [(latents, f16), (context, f16), (context, f16)], latents),
        WINDOW_MAX_POOL: (window_max_pool, [(grid, f16), (table, "int64")], (1, s * s, grid[3])),
    }


def _launch(op: str, shapes: list[tuple]):
    """The op's launch description for these input shapes, as the Triton call and the AOT plugin compute it."""
    module = _full_size_inputs()[op][0]
    return module.launch(shapes[0], shapes[1][0]) if op == WINDOW_MAX_POOL else module.launch(shapes[0], shapes[1])


def _in_fresh_process(check: str) -> None:
    """Run `check()` of this module in a new Python without TRITON_INTERPRET; its failure fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import tests.test_tensorrt_plugins as t; t.{check}()"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_kernels_compile_to_ptx_for_tensorrt():
    """The PTX an AOT plugin embeds, for each plugin at full-size shapes, for Orin (sm_87) and Hopper (sm_90):
    built for the architecture, entry point named, and launchable by TensorRT (no scratch memory, no parameter
    read past inputs + scalars + output: compile_ptx refuses otherwise)."""
    _in_fresh_process("check_kernels_compile_to_ptx")


def check_kernels_compile_to_ptx() -> None:
    for op in (DECODE_ATTENTION, INTERACTION_ATTENTION, WINDOW_MAX_POOL):
        for arch in (87, 90):
            _check_kernel_compiles(op, arch)
    # decode attention over an int8 cache: int8 K/V pointers, the scales compiled in
    _, inputs, _ = _full_size_inputs()[DECODE_ATTENTION]
    (q, _), (kv, _) = inputs[:2]
    run = decode_attention.launch(q, kv, k_scale=0.0123, v_scale=0.0457)
    pointers = ["float16", "int8", "int8", "int32", "int32", "float16"]
    compiled = compile_ptx(decode_attention.triton_kernel(compiled=True), pointers, run, 87)
    assert ".target sm_87" in compiled.ptx and "ld.global" in compiled.ptx and ".s8" in compiled.ptx


def _check_kernel_compiles(op: str, arch: int) -> None:
    module, inputs, _ = _full_size_inputs()[op]
    pointers = [dtype for _, dtype in inputs] + ["float16"]
    run = _launch(op, [shape for shape, _ in inputs])
    compiled = compile_ptx(module.triton_kernel(compiled=True), pointers, run, arch)
    assert f".target sm_{arch}" in compiled.ptx and f".entry {compiled.name}(" in compiled.ptx
    assert compiled.num_warps >= 1 and compiled.shared_bytes >= 0
    with pytest.raises(FusionError, match="pointer dtypes"):
        compile_ptx(module.triton_kernel(compiled=True), pointers[:-1], run, arch)


class _Desc:
    """A tensorrt.plugin TensorDesc as aot_impl sees it: static dims as ints, a dtype."""

    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype, self.shape = tuple(shape), dtype, tuple(shape)

    def like(self):
        return _Desc(self.shape_expr, self.dtype)


def _stand_in_api() -> types.SimpleNamespace:
    recorded: dict[tuple[str, str], object] = {}

    def decorator(kind):
        return lambda pid: lambda fn: recorded.setdefault((kind, pid), fn)

    return types.SimpleNamespace(
        recorded=recorded, TensorDesc=_Desc, register=decorator("register"), autotune=decorator("autotune"),
        impl=decorator("impl"), aot_impl=decorator("aot_impl"), AutoTuneCombination=lambda t, f: (t, f),
        KernelLaunchParams=types.SimpleNamespace, SymInt32=lambda e: e,
        SymIntExprs=types.SimpleNamespace(from_tuple=tuple), from_shape_expr=lambda shape, dtype: _Desc(shape, dtype),
    )  # fmt: skip


TRT_TYPES = types.SimpleNamespace(float32="FP32", float16="FP16", int8="INT8", int32="INT32", int64="INT64")


def test_registration_bodies_over_full_size_shapes():
    """Each plugin defines register/autotune/impl/aot_impl under `fusion_export.plugins::<op>`; the output
    descriptors have the op's output shape, every type combination names one type per input and output, and
    aot_impl returns the PTX and the very grid and scalars the Triton call uses."""
    _in_fresh_process("check_registration_bodies")


def check_registration_bodies() -> None:
    api = _stand_in_api()
    for define in _DEFINITIONS.values():
        define(api, TRT_TYPES, 87)
    trt_types = {"float16": TRT_TYPES.float16, "int32": TRT_TYPES.int32, "int64": TRT_TYPES.int64}
    for op, (_, inputs, output_shape) in _full_size_inputs().items():
        pid = f"{DOMAIN}::{op}"
        assert {kind for kind, p in api.recorded if p == pid} == {"register", "autotune", "impl", "aot_impl"}
        descs = [_Desc(shape, trt_types[dtype]) for shape, dtype in inputs]
        attributes = list(ATTRIBUTES[op].values())  # the node's float attributes, after the inputs
        out = api.recorded[("register", pid)](*descs, *attributes)
        assert out.shape_expr == output_shape and out.dtype == TRT_TYPES.float16
        [(combination, layout)] = api.recorded[("autotune", pid)](*descs, [out])
        assert len(combination.split(",")) == len(descs) + 1 and layout == "LINEAR"
        name, ptx, params, scalars = api.recorded[("aot_impl", pid)](*descs, *attributes, [out], 0)
        run = _launch(op, [shape for shape, _ in inputs])
        assert name.decode() in ptx.decode() and b".target sm_87" in ptx
        assert (params.grid_x, getattr(params, "grid_y", 1)) == (run.grid + (1,))[:2]
        assert scalars == run.scalars and params.block_x % 32 == 0


def test_tensorrt_rtx_registers_ipluginv3_classes():
    """TensorRT-RTX 1.7.1 ships tensorrt_rtx/plugin but it does not import: the plugins register as IPluginV3
    classes instead (engines/plugins/rtx_plugins.py; built for real in tests/test_rtx_plugins.py), and that is
    what build records (engines.json `plugin_implementation`); an op this version does not define is refused."""
    from engines.plugins.rtx_plugins import IMPLEMENTATION
    from engines.tensorrt.flavours import load_trt

    trt = load_trt("tensorrt-rtx")
    how = register_plugins(trt, [WINDOW_MAX_POOL, DECODE_ATTENTION])
    assert how == {DECODE_ATTENTION: IMPLEMENTATION, WINDOW_MAX_POOL: IMPLEMENTATION}
    assert register_plugins(trt, []) == {}
    with pytest.raises(FusionError, match=r"plugin ops \['Softmax2'\]"):
        register_plugins(trt, ["Softmax2"])
