"""The plugins' TensorRT registration, through `tensorrt.plugin` (TensorRT >= 10.6; ahead-of-time from 10.9).

Each plugin registers as `fusion_export.plugins::<Name>`: the ONNX node's domain and op type, which TensorRT's
parser (10.10+) takes as the plugin's namespace and name when the node has no `plugin_namespace` attribute
(docs/tensorrt.md section 8). Per plugin:
- `register`: the output's descriptor;
- `autotune`: the type combinations its kernel takes (linear layout);
- `aot_impl` (10.9+): the Triton kernel compiled to PTX at build time for the build GPU (`launch.compile_ptx`),
  with TensorRT's launch parameters and the kernel's int32 scalars as symbolic expressions (each plugin's
  `launch()` evaluated over shape expressions): the engine runs it with no Python;
- `impl` (JIT, the fallback before 10.9): the same kernel launched through torch on TensorRT's stream; the engine
  then needs Python, torch and triton wherever it runs.

Only the decorators' bodies need TensorRT and a GPU; what they call (launch descriptions, PTX compilation, the
kernels and their reference ops) is tested on the CPU. This module has no `from __future__ import annotations`:
`tensorrt.plugin` reads the `TensorDesc` annotations as objects.
"""

import importlib
from collections.abc import Iterable
from typing import Any

from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, DOMAIN, INTERACTION_ATTENTION, WINDOW_MAX_POOL
from reference_model.errors import FusionError

from . import decode_attention, interaction_attention, window_max_pool
from .kernel_table import LOCAL_FUNCTION, TYPE_COMBINATIONS, run_kernel
from .launch import Launch, compile_ptx


def plugin_module_name(trt: Any) -> str:
    return "tensorrt_rtx.plugin" if trt.module.__name__.startswith("tensorrt_rtx") else "tensorrt.plugin"


def load_plugin_api(trt: Any) -> tuple[Any | None, str]:
    """(the `tensorrt.plugin` module, "") or (None, why it cannot be used with this TensorRT)."""
    name = plugin_module_name(trt)
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # ImportError, or the module's own errors on an incomplete install
        return None, f"{name} does not import in {trt.describe()} ({type(e).__name__}: {e})"


def register_plugins(trt: Any, ops: Iterable[str], parsing: bool = True) -> dict[str, str]:
    """Register the plugins `ops` names; per op, how engines will run it: "tensorrt.plugin aot (sm_XY)",
    "tensorrt.plugin jit", TensorRT-RTX's "IPluginV3 (Python, Triton JIT)" (rtx_plugins.py), or
    "local function: <why no plugin>". Registering twice in a process is a no-op. `parsing`: for a build, whose
    parser must also be able to import the plugins (TensorRT-RTX's library link, rtx_plugins.py); False when
    loading engines, which need only the creators in the registry before deserializing: nothing is linked or
    written then, so a read-only install loads them."""
    ops = sorted(ops)
    if not ops:
        return {}
    unknown = [op for op in ops if op not in _DEFINITIONS]
    if unknown:
        raise FusionError(f"plugin ops {unknown} in the graphs: this fusion-export defines {sorted(_DEFINITIONS)}")
    trtp, why = load_plugin_api(trt)
    if trtp is None and trt.module.__name__.startswith("tensorrt_rtx"):
        from . import rtx_plugins  # its IPluginV3 classes stand in for the missing tensorrt_rtx.plugin

        blocked = rtx_plugins.parser_can_import_plugins() if parsing else ""
        if not blocked:
            return rtx_plugins.register(trt.module, ops)
        why = f"{why}; IPluginV3: {blocked}"
    if trtp is None:
        return {op: f"{LOCAL_FUNCTION}: {why}" for op in ops}
    aot = hasattr(trtp, "aot_impl")
    arch = _build_gpu_arch() if aot else None
    for op in ops:
        if (op, id(trtp)) not in _REGISTERED:
            _DEFINITIONS[op](trtp, trt.module, arch)
            _REGISTERED.add((op, id(trtp)))
    how = f"tensorrt.plugin aot (sm_{arch})" if aot else "tensorrt.plugin jit"
    return dict.fromkeys(ops, how)


_REGISTERED: set[tuple[str, int]] = set()


def _build_gpu_arch() -> int:
    """The build GPU's compute capability (enterprise TensorRT builds on the GPU it targets), e.g. 87 on Orin."""
    import torch

    if not torch.cuda.is_available():
        raise FusionError("tensorrt.plugin's ahead-of-time plugins compile for the build GPU: none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _dtype_names(trt_module: Any) -> dict[Any, str]:
    return {trt_module.float32: "float32", trt_module.float16: "float16", trt_module.int8: "int8",
            trt_module.int32: "int32", trt_module.int64: "int64"}  # fmt: skip


def _aot(trtp: Any, trt_module: Any, plugin: Any, tensors: list[Any], run: Launch, arch: int) -> tuple:
    """aot_impl's return value for the kernel of `plugin` (its module): kernel name, PTX, launch parameters, the
    int32 scalars as symbolic expressions."""
    names = _dtype_names(trt_module)
    compiled = compile_ptx(plugin.triton_kernel(compiled=True), [names[t.dtype] for t in tensors], run, arch)
    params = trtp.KernelLaunchParams()
    params.grid_x = run.grid[0]
    if len(run.grid) > 1:
        params.grid_y = run.grid[1]
    params.block_x = compiled.num_warps * 32
    params.shared_mem = compiled.shared_bytes
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in run.scalars])
    return compiled.name.encode(), compiled.ptx.encode(), params, scalars


def _torch(*tensors: Any) -> list[Any]:
    import torch

    return [torch.as_tensor(t, device="cuda") for t in tensors]


def _on_stream(stream: int):
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def _define_decode_attention(trtp: Any, trt_module: Any, arch: int | None) -> None:
    pid = f"{DOMAIN}::{DECODE_ATTENTION}"
    TensorDesc = trtp.TensorDesc  # noqa: N806 (the annotation tensorrt.plugin matches)

    @trtp.register(pid)
    def _(
        q: TensorDesc, k: TensorDesc, v: TensorDesc, start: TensorDesc, end: TensorDesc, k_scale: float, v_scale: float
    ) -> TensorDesc:
        return q.like()

    @trtp.autotune(pid)
    def _(q, k, v, start, end, outputs) -> list:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[DECODE_ATTENTION], "LINEAR")]

    @trtp.impl(pid)
    def _(q, k, v, start, end, k_scale: float, v_scale: float, outputs, stream) -> None:
        with _on_stream(stream):
            *inputs, out = _torch(q, k, v, start, end, outputs[0])
            run_kernel(DECODE_ATTENTION, inputs, out, {"k_scale": k_scale, "v_scale": v_scale})

    if arch is not None:

        @trtp.aot_impl(pid)
        def _(q, k, v, start, end, k_scale: float, v_scale: float, outputs, tactic) -> tuple:
            # the scales are the kernel's compile-time constants: an int8 cache's are fixed at export
            run = decode_attention.launch(q.shape_expr, k.shape_expr, k_scale, v_scale)
            return _aot(trtp, trt_module, decode_attention, [q, k, v, start, end, outputs[0]], run, arch)


def _define_interaction_attention(trtp: Any, trt_module: Any, arch: int | None) -> None:
    pid = f"{DOMAIN}::{INTERACTION_ATTENTION}"
    TensorDesc = trtp.TensorDesc  # noqa: N806

    @trtp.register(pid)
    def _(q: TensorDesc, k: TensorDesc, v: TensorDesc) -> TensorDesc:
        return q.like()

    @trtp.autotune(pid)
    def _(q, k, v, outputs) -> list:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[INTERACTION_ATTENTION], "LINEAR")]

    @trtp.impl(pid)
    def _(q, k, v, outputs, stream) -> None:
        with _on_stream(stream):
            *inputs, out = _torch(q, k, v, outputs[0])
            run_kernel(INTERACTION_ATTENTION, inputs, out)

    if arch is not None:

        @trtp.aot_impl(pid)
        def _(q, k, v, outputs, tactic) -> tuple:
            run = interaction_attention.launch(q.shape_expr, k.shape_expr)
            return _aot(trtp, trt_module, interaction_attention, [q, k, v, outputs[0]], run, arch)


def _define_window_max_pool(trtp: Any, trt_module: Any, arch: int | None) -> None:
    pid = f"{DOMAIN}::{WINDOW_MAX_POOL}"
    TensorDesc = trtp.TensorDesc  # noqa: N806

    @trtp.register(pid)
    def _(grid: TensorDesc, index: TensorDesc) -> TensorDesc:
        n, shape = index.shape_expr[0], grid.shape_expr
        return trtp.from_shape_expr((shape[0], n * n, shape[3]), dtype=grid.dtype)

    @trtp.autotune(pid)
    def _(grid, index, outputs) -> list:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[WINDOW_MAX_POOL], "LINEAR")]

    @trtp.impl(pid)
    def _(grid, index, outputs, stream) -> None:
        with _on_stream(stream):
            x, out = _torch(grid, outputs[0])
            run_kernel(WINDOW_MAX_POOL, [x, index], out)

    if arch is not None:

        @trtp.aot_impl(pid)
        def _(grid, index, outputs, tactic) -> tuple:
            run = window_max_pool.launch(grid.shape_expr, index.shape_expr[0])
            return _aot(trtp, trt_module, window_max_pool, [grid, index, outputs[0]], run, arch)


_DEFINITIONS = {
    DECODE_ATTENTION: _define_decode_attention,
    INTERACTION_ATTENTION: _define_interaction_attention,
    WINDOW_MAX_POOL: _define_window_max_pool,
}
