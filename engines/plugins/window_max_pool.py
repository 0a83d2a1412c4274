"""Adaptive max pooling over irregular windows: the global context's 54x54 grid -> n x n (n = 4, 8, 12 for
query_len 16, 64, 144), where the windows [floor(i*H/n), ceil((i+1)*H/n)) overlap and differ in length.

    grid  [B, H, W, D]        float32 | float16 | int8 (between Q/DQ: max commutes with a per-tensor scale)
    -> out [B, n*n, D]        grid's dtype, row-major over the n x n windows

`window_max_pool_reference` is the definition (the reference model's `adaptive_max_pool`); `window_max_pool` runs
the Triton kernel (one program per output cell and block of channels, each window read once). The standard-op
form, what the exported graphs compute without the plugin, is `fusion_export/graphs/window_pool.py`. NaN: the
reference propagates it, the kernel's max may not; the grid is the vision encoder's finite output.
"""

# no `from __future__ import annotations`: Triton 3.0's interpreter takes only an annotation that is the object
# tl.constexpr (or the string "constexpr") as a constexpr, not the string "tl.constexpr"

import functools

import torch

from reference_model.errors import FusionError

from .launch import Launch, jit, next_power_of_2, require_kernel_device, static

BLOCK_D = 128  # channels per program
DTYPES = (torch.float32, torch.float16, torch.int8)


def check_inputs(grid: torch.Tensor, out_size: int) -> None:
    if grid.dim() != 4:
        raise FusionError(f"window max pool: grid {tuple(grid.shape)}; expected [B, H, W, D]")
    if grid.dtype not in DTYPES:
        raise FusionError(f"window max pool: dtype {grid.dtype}; expected one of float32 / float16 / int8")
    if not 1 <= out_size <= min(grid.shape[1], grid.shape[2]):
        raise FusionError(f"window max pool: out_size {out_size} for a {grid.shape[1]}x{grid.shape[2]} grid; "
                          "expected 1 <= out_size <= the grid's side")  # fmt: skip


@functools.cache
def triton_kernel(compiled: bool = False):
    """Defined on first use: Triton reads TRITON_INTERPRET when the kernel is decorated. `compiled`: the compilable
    kernel even under TRITON_INTERPRET=1 (what launch.compile_ptx takes)."""
    # a module global, not a local the kernel closes over: Triton 3.0 (torch 2.4's) resolves names, and its
    # interpreter finds triton.language, only in the kernel's __globals__
    global tl
    import triton.language as tl

    def kernel(x_ptr, index_ptr, H, W, D, N, out_ptr, BLOCK: tl.constexpr):
        # index_ptr: the ONNX node's window table, unread: the windows follow from H, W and N
        cell = tl.program_id(0)  # b * N * N + i * N + j
        j = cell % N
        i = (cell // N) % N
        b = cell // (N * N)
        row_first, row_end = (i * H) // N, ((i + 1) * H + N - 1) // N
        col_first, col_end = (j * W) // N, ((j + 1) * W + N - 1) // N
        d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = d < D
        acc = tl.full([BLOCK], float("-inf"), tl.float32)  # float32 holds fp16 and int8 values exactly
        for r in range(row_first, row_end):
            for c in range(col_first, col_end):
                x = tl.load(x_ptr + ((b * H + r) * W + c) * D + d, mask=ok, other=0)
                acc = tl.maximum(acc, x.to(tl.float32))
        tl.store(out_ptr + cell * D + d, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return jit(kernel, compiled)


def launch(grid_shape, out_size) -> Launch:
    """Grid, scalars and constants from grid [B, H, W, D] and the output side n (ints or TensorRT shape
    expressions: engines/plugins/launch.py; for the ONNX node, n is the window table's first dim)."""
    B, H, W, D = grid_shape
    block = min(BLOCK_D, next_power_of_2(static(D, "the pooled channels")))
    return Launch(grid=(B * out_size * out_size, (D + block - 1) // block), scalars=(H, W, D, out_size),
                  constexprs=dict(BLOCK=block))  # fmt: skip


def window_max_pool(grid: torch.Tensor, out_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); `out`: a contiguous
    [B, out_size^2, D] buffer of grid's dtype to write (a TensorRT plugin's output), else a new one."""
    check_inputs(grid, out_size)
    require_kernel_device(grid, "window max pool")
    grid = grid.contiguous()
    B, H, W, D = grid.shape
    if out is None:
        out = torch.empty((B, out_size * out_size, D), dtype=grid.dtype, device=grid.device)
    run = launch(tuple(grid.shape), out_size)
    triton_kernel()[run.grid](grid, grid, *run.scalars, out, **run.constexprs)  # the table is unread: grid stands in
    return out
