"""One description of a plugin kernel's launch, shared by the Triton call and TensorRT's ahead-of-time plugin.

Every plugin kernel takes its arguments in the order TensorRT's AOT plugins pass them (`tensorrt.plugin.aot_impl`;
the TensorRT sample `quickly_deployable_plugins/oait_kernels.py` keeps "extra scalar args in between input and
output tensors"): input pointers, then int32 scalars, then output pointers, then compile-time constants. A
`Launch` holds the grid, the scalars and the constants, computed by one function per plugin from the input
shapes; that function is written with `+ - * //` only, so it runs on Python ints (the Triton call here) and on
TensorRT's symbolic shape expressions (the AOT plugin, where dynamic dims such as batch stay symbolic) alike.
Constants must be build-time values: `static()` reads them.

`compile_ptx` compiles a kernel to PTX for a GPU architecture with Triton, which needs no GPU: what an AOT plugin
embeds in the engine. `require_kernel_device` and `check_kv_scales` are the checks every kernel call shares.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from reference_model.errors import FusionError

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "int8": "*i8", "int32": "*i32", "int64": "*i64"}


@dataclass(frozen=True)
class Launch:
    grid: tuple[Any, ...]  # programs per axis: ints or shape expressions
    scalars: tuple[Any, ...]  # int32 arguments between the input and output pointers
    constexprs: dict[str, Any] = field(default_factory=dict)  # compile-time constants (block sizes, scales)


def require_kernel_device(tensor: Any, what: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter only."""
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusionError(f"{what} on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1")


def check_kv_scales(what: str, quantized: bool, k_scale: float, v_scale: float, operands: str) -> None:
    """Per-tensor dequantization scales: positive, and other than 1 only for int8 `operands`."""
    if not quantized and (k_scale, v_scale) != (1.0, 1.0):
        raise FusionError(f"{what}: k_scale {k_scale}, v_scale {v_scale} apply to {operands} only")
    if not (k_scale > 0 and v_scale > 0):
        raise FusionError(f"{what}: k_scale {k_scale}, v_scale {v_scale} must be positive")


def static(dim: Any, what: str) -> int:
    """A dimension's build-time value: an int, or a TensorRT shape expression that is constant."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        raise FusionError(f"{what} must be a static dimension for the plugin's compiled kernel")
    return int(dim.constant_value())


def jit(fn: Any, compiled: bool = False) -> Any:
    """`triton.jit(fn)`, which under TRITON_INTERPRET=1 is the interpreter's stand-in; `compiled`: always the
    compilable JITFunction, whatever the environment."""
    import triton
    from triton.runtime.jit import JITFunction

    return JITFunction(fn) if compiled else triton.jit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_bytes: int


def compile_ptx(kernel: Any, pointers: list[str], launch: Launch, arch: int) -> CompiledKernel:
    """Triton -> PTX for compute capability `arch` (e.g. 87 for Jetson Orin, 90 for Hopper). `pointers`: the
    dtype of each pointer argument in order (inputs, then outputs), e.g. ["float16", "float16", "float16"]. Not in
    a process that has run a kernel in Triton's interpreter: it patches triton.language in place."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(kernel.arg_names)
    n_in = len(names) - len(launch.constexprs) - len(launch.scalars) - 1  # one output per plugin
    if len(pointers) != n_in + 1:
        raise FusionError(f"{kernel.__name__}: {len(pointers)} pointer dtypes for {n_in + 1} pointer arguments")
    types = [POINTER_TYPES[p] for p in pointers[:n_in]] + ["i32"] * len(launch.scalars) + [POINTER_TYPES[pointers[-1]]]
    signature = dict(zip(names, types)) | {name: "constexpr" for name in launch.constexprs}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=dict(launch.constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    ptx, meta = compiled.asm["ptx"], compiled.metadata
    # Triton appends scratch-buffer pointers after the declared arguments; TensorRT passes only inputs, scalars and
    # outputs, so a kernel is embeddable only while it needs no scratch and never reads those trailing parameters.
    scratch = getattr(meta, "global_scratch_size", 0) + getattr(meta, "profile_scratch_size", 0)
    read = {int(i) for i in re.findall(r"ld\.param\.\w+\s+%\w+, \[\w+_param_(\d+)\]", ptx)}
    if scratch or max(read, default=-1) >= len(types):
        raise FusionError(f"{kernel.__name__}: Triton's kernel for sm_{arch} needs scratch memory or reads "
                          f"parameters past its {len(types)} arguments (read: {sorted(read)}): TensorRT cannot "
                          "launch it")  # fmt: skip
    return CompiledKernel(meta.name, ptx, meta.num_warps, meta.shared)
