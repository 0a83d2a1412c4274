"""Decode attention over the valid cache: a step's queries read only the KV columns each row has written.

With a fixed-capacity KV buffer (what TensorRT's KV update needs), the step graph's attention otherwise reads the
whole capacity under a mask every token. Here each row b reads columns [start[b], end[b]) of its cache: start is
its left padding, end the columns written so far including this step's T new tokens, and new token t attends
causally up to its own column end[b] - T + t. Query head h reads KV head h // (heads / kv_heads) (GQA).

    q      [B, heads, T, D]         float32 | float16
    k, v   [B, kv_heads, C, D]      q's dtype, or int8 (an INT8 KV cache: value = int8 * k_scale / v_scale,
                                    per-tensor scales as a Q/DQ pair around the cache would carry them)
    start  [B] int32, end [B] int32 (0 <= start < end - T + 1, end <= C)
    -> out [B, heads, T, D]         q's dtype; scores, softmax and accumulation in float32

`decode_attention_reference` is the definition; `decode_attention` runs the Triton kernel (split over rows, query
heads and new tokens; an online softmax over blocks of columns, so it reads each valid column once).
"""

# no `from __future__ import annotations`: Triton 3.0's interpreter takes only an annotation that is the object
# tl.constexpr (or the string "constexpr") as a constexpr, not the string "tl.constexpr"

import functools

import torch

from reference_model.errors import FusionError

from .launch import Launch, check_kv_scales, jit, next_power_of_2, require_kernel_device, static

BLOCK_N = 32  # columns per block: the online softmax's unit of work


def check_inputs(q, k, v, start, end, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Shapes, dtypes and scales, named: host-side facts only, so this runs inside a TensorRT enqueue under CUDA
    graph capture, where reading a device value (a sync) would abort the capture."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise FusionError(f"decode attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                          "q [B, heads, T, D] and k, v [B, kv_heads, C, D]")  # fmt: skip
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise FusionError(f"decode attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)} (GQA needs "
                          "heads % kv_heads == 0)")  # fmt: skip
    if q.dtype not in (torch.float32, torch.float16) or k.dtype != v.dtype or k.dtype not in (q.dtype, torch.int8):
        raise FusionError(f"decode attention: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; expected q float32 / "
                          "float16 and k, v of q's dtype or both int8")  # fmt: skip
    check_kv_scales("decode attention", k.dtype == torch.int8, k_scale, v_scale, "an int8 cache")
    if start.shape != (B,) or end.shape != (B,):
        raise FusionError(f"decode attention: start {tuple(start.shape)} and end {tuple(end.shape)} must be [{B}]")


def check_ranges(start, end, T: int, capacity: int) -> None:
    """The rows' column ranges, which the kernel trusts: a device read (a host sync), so direct calls only."""
    s, e = start.long(), end.long()
    if bool(((s < 0) | (e > capacity) | (e - T < s)).any()):
        raise FusionError(f"decode attention: need 0 <= start <= end - T and end <= {capacity}; got start "
                          f"{s.tolist()}, end {e.tolist()}, T {T}")  # fmt: skip


@functools.cache
def triton_kernel(compiled: bool = False):
    """Defined on first use: Triton reads TRITON_INTERPRET when the kernel is decorated. `compiled`: the compilable
    kernel even under TRITON_INTERPRET=1 (what launch.compile_ptx takes)."""
    # a module global, not a local the kernel closes over: Triton 3.0 (torch 2.4's) resolves names, and its
    # interpreter finds triton.language, only in the kernel's __globals__
    global tl
    import triton.language as tl

    def kernel(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, H, KVH, T, C, D, out_ptr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)  # one program per (row, query head, new token)
        scale = 1.0 / tl.sqrt_rn(D.to(tl.float32))
        t = pid % T
        h = (pid // T) % H
        b = pid // (T * H)
        kvh = h // (H // KVH)
        start = tl.load(start_ptr + b)
        last = tl.load(end_ptr + b) - T + t  # the token's own column, inclusive
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + ((b * H + h) * T + t) * D + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        kv_base = (b * KVH + kvh) * C * D
        m = tl.full([1], float("-inf"), tl.float32)
        denom = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for first in range(start, last + 1, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            n_ok = n <= last
            offsets = kv_base + n[:, None] * D + d[None, :]
            ok = n_ok[:, None] & d_ok[None, :]
            keys = tl.load(k_ptr + offsets, mask=ok, other=0).to(tl.float32) * K_SCALE  # int8: dequantized here
            s = tl.sum(keys * q[None, :], axis=1)
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            correction = tl.exp(m - m_new)
            values = tl.load(v_ptr + offsets, mask=ok, other=0).to(tl.float32) * V_SCALE
            acc = acc * correction + tl.sum(p[:, None] * values, axis=0)
            denom = denom * correction + tl.sum(p, axis=0)
            m = m_new
        out = acc / denom
        tl.store(out_ptr + ((b * H + h) * T + t) * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return jit(kernel, compiled)


def launch(q_shape, k_shape, k_scale: float = 1.0, v_scale: float = 1.0) -> Launch:
    """Grid, scalars and constants from q [B, heads, T, D] and k [B, kv_heads, C, D] (ints or TensorRT shape
    expressions: engines/plugins/launch.py)."""
    B, H, T, D = q_shape
    constexprs = dict(BLOCK_N=BLOCK_N, BLOCK_D=next_power_of_2(static(D, "decode attention's head size")),
                      K_SCALE=float(k_scale), V_SCALE=float(v_scale))  # fmt: skip
    return Launch(grid=(B * H * T,), scalars=(H, k_shape[1], T, k_shape[2], D), constexprs=constexprs)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); `out`: a contiguous buffer of q's
    shape and dtype to write (a TensorRT plugin's output), else a new one. `check_values=False`: the plugins'
    enqueue, where start and end come from the graph and only host-side checks may run (check_inputs)."""
    check_inputs(q, k, v, start, end, k_scale, v_scale)
    if check_values:
        check_ranges(start, end, q.shape[2], k.shape[2])
    require_kernel_device(q, "decode attention")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    start, end = start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()
    out = torch.empty_like(q) if out is None else out
    run = launch(tuple(q.shape), tuple(k.shape), k_scale, v_scale)
    triton_kernel()[run.grid](q, k, v, start, end, *run.scalars, out, **run.constexprs)
    return out
