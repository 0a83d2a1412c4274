"""Adaptive max pooling over irregular windows: the global context's 54x54 grid -> n x n (n = 4, 8, 12 for
query_len 16, 64, 144), where the windows [floor(i*H/n), ceil((i+1)*H/n)) overlap and differ in length.

    grid  [B, H, W, D]        float32 | float16 | int8 (between Q/DQ: max commutes with a per-tensor scale)
    -> out [B, n*n, D]        grid's dtype, row-major over the n x n windows

`window_max_pool_reference` is the definition (the reference model's `adaptive_max_pool`); `window_max_pool` runs
the Triton kernel (one program per output cell and block of channels, each window read once). The standard-op
form, what the exported graphs compute without the plugin, is `fusion_export/graphs/window_pool.py`. NaN: the
reference propagates it, the kernel's max may not; the grid is the vision encoder's finite output.
"""

from __future__ import annotations

import functools
import os

import torch

from reference_model.errors import FusionError
from reference_model.global_context import adaptive_max_pool

BLOCK_D = 128  # channels per program
DTYPES = (torch.float32, torch.float16, torch.int8)


def window_max_pool_reference(grid: torch.Tensor, out_size: int) -> torch.Tensor:
    if grid.dtype == torch.int8:  # torch has no integer max pooling; int8 is exact in float32
        return adaptive_max_pool(grid.float(), out_size).to(torch.int8)
    return adaptive_max_pool(grid, out_size)


def check_inputs(grid: torch.Tensor, out_size: int) -> None:
    if grid.dim() != 4:
        raise FusionError(f"window max pool: grid {tuple(grid.shape)}; expected [B, H, W, D]")
    if grid.dtype not in DTYPES:
        raise FusionError(f"window max pool: dtype {grid.dtype}; expected one of float32 / float16 / int8")
    if not 1 <= out_size <= min(grid.shape[1], grid.shape[2]):
        raise FusionError(f"window max pool: out_size {out_size} for a {grid.shape[1]}x{grid.shape[2]} grid; "
                          "expected 1 <= out_size <= the grid's side")  # fmt: skip


@functools.cache
def _kernel():
    """Defined on first use: Triton reads TRITON_INTERPRET when the kernel is decorated."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, H, W, D, N, BLOCK: tl.constexpr):
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

    return kernel


def window_max_pool(grid: torch.Tensor, out_size: int) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    check_inputs(grid, out_size)
    if not grid.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusionError("window max pool on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1")
    import triton

    grid = grid.contiguous()
    B, H, W, D = grid.shape
    out = torch.empty((B, out_size * out_size, D), dtype=grid.dtype, device=grid.device)
    block = min(BLOCK_D, triton.next_power_of_2(D))
    _kernel()[(B * out_size * out_size, triton.cdiv(D, block))](grid, out, H, W, D, out_size, BLOCK=block)
    return out
