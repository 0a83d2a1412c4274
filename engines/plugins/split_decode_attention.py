"""Decode attention split over chunks of columns (flash-decoding): the DecodeAttention op for one new token per row,
shaped for a GPU's many SMs.

`decode_attention.py` runs one program per (row, query head) that walks every valid column alone: at batch 1 that
is 32 programs for Phi-3.5, a quarter of an H100's SMs, so a long cache is read at a fraction of the bandwidth.
Here each (row, head) is split into `splits` chunks of the capacity read in parallel, each keeping its own online
softmax (max, sum, unnormalised output), and a second kernel merges the chunks. Chunks past a row's written columns
return at once, so a step reads only valid columns while its grid, fixed by the capacity, is the same every step:
what a CUDA graph replays. The INT8 cache's scales are run-time arguments (one compiled kernel for every layer).

    q      [B, heads, 1, D]         float32 | float16
    k, v   [B, kv_heads, C, D]      q's dtype, or int8 (value = int8 * k_scale / v_scale)
    start  [B] int32, end [B] int32 (each row reads columns start .. end - 1; its new token is column end - 1)
    -> out [B, heads, 1, D]         q's dtype; scores, softmax and accumulation in float32

The definition is the op's (`fusion_export/plugin_ops/reference.py: decode_attention_reference` with T = 1).
"""

# no `from __future__ import annotations`: Triton 3.0's interpreter takes only an annotation that is the object
# tl.constexpr (or the string "constexpr") as a constexpr, not the string "tl.constexpr"

import functools

import torch

from reference_model.errors import FusionError

from .decode_attention import check_inputs, check_ranges
from .launch import jit, next_power_of_2, require_kernel_device

BLOCK_N = 32  # columns per block of a chunk's online softmax
CHUNK = 256  # columns per chunk: large enough that merging is cheap, small enough to fill the SMs at 1k columns
MAX_SPLITS = 64


def split_count(capacity: int) -> int:
    """Chunks per (row, head) for a cache of `capacity` columns: fixed by the capacity, not the fill."""
    return max(1, min(MAX_SPLITS, -(-capacity // CHUNK)))


@functools.cache
def triton_kernels():
    """(partial, merge), defined on first use (Triton reads TRITON_INTERPRET when a kernel is decorated)."""
    # a module global, not a local the kernels close over: Triton 3.0 (torch 2.4's) resolves names only in a
    # kernel's __globals__
    global tl
    import triton.language as tl

    def partial(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, k_scale, v_scale, H, KVH, C, D, chunk, splits,
                part_ptr, stats_ptr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        row_head = tl.program_id(0)  # b * H + h
        split = tl.program_id(1)
        h = row_head % H
        b = row_head // H
        kvh = h // (H // KVH)
        scale = 1.0 / tl.sqrt_rn(D.to(tl.float32))
        first = tl.maximum(tl.load(start_ptr + b), split * chunk)
        end = tl.minimum(tl.load(end_ptr + b), (split + 1) * chunk)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + row_head * D + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        kv_base = (b * KVH + kvh) * C * D
        m = tl.full([1], float("-inf"), tl.float32)
        denom = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for block in range(first, end, BLOCK_N):  # empty when the chunk holds no written column
            n = block + tl.arange(0, BLOCK_N)
            n_ok = n < end
            offsets = kv_base + n[:, None] * D + d[None, :]
            ok = n_ok[:, None] & d_ok[None, :]
            keys = tl.load(k_ptr + offsets, mask=ok, other=0).to(tl.float32) * k_scale
            s = tl.where(n_ok, tl.sum(keys * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            correction = tl.exp(m - m_new)
            values = tl.load(v_ptr + offsets, mask=ok, other=0).to(tl.float32) * v_scale
            acc = acc * correction + tl.sum(p[:, None] * values, axis=0)
            denom = denom * correction + tl.sum(p, axis=0)
            m = m_new
        slot = row_head * splits + split
        tl.store(part_ptr + slot * D + d, acc, mask=d_ok)
        two = tl.arange(0, 2)
        tl.store(stats_ptr + slot * 2 + two, tl.where(two == 0, tl.sum(m, axis=0), tl.sum(denom, axis=0)))

    def merge(part_ptr, stats_ptr, D, splits, out_ptr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        row_head = tl.program_id(0)
        i = tl.arange(0, BLOCK_S)
        i_ok = i < splits
        slot = row_head * splits + i
        m = tl.load(stats_ptr + slot * 2, mask=i_ok, other=float("-inf"))  # -inf: an empty chunk
        denom = tl.load(stats_ptr + slot * 2 + 1, mask=i_ok, other=0.0)
        weight = tl.where(m > float("-inf"), tl.exp(m - tl.max(m, axis=0)), 0.0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        parts = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(weight[:, None] * parts, axis=0) / tl.sum(weight * denom, axis=0)
        tl.store(out_ptr + row_head * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return jit(partial), jit(merge)


class SplitDecodeAttention:
    """The kernels with their scratch (partial outputs and softmax statistics) allocated once for a shape, so a
    call allocates nothing: what a CUDA graph needs."""

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, device: torch.device | str):
        self.splits = split_count(capacity)
        self.chunk = -(-capacity // self.splits)
        self.parts = torch.empty(batch * heads * self.splits, head_dim, dtype=torch.float32, device=device)
        self.stats = torch.empty(batch * heads * self.splits, 2, dtype=torch.float32, device=device)
        self.block_d = next_power_of_2(head_dim)

    def __call__(self, q, k, v, start, end, k_scale: float = 1.0, v_scale: float = 1.0, out=None,
                 check_values: bool = True) -> torch.Tensor:  # fmt: skip
        """start, end: int32 on q's device. `check_values=False` under CUDA graph capture (no device reads)."""
        check_inputs(q, k, v, start, end, k_scale, v_scale)
        B, H, T, D = q.shape
        if T != 1 or self.parts.shape != (B * H * self.splits, D) or k.shape[2] > self.splits * self.chunk:
            raise FusionError(f"split decode attention: q {tuple(q.shape)}, k {tuple(k.shape)} do not fit the "
                              f"kernels made for {self.parts.shape[0] // self.splits} rows x heads, one new token, "
                              f"head size {self.parts.shape[1]}, {self.splits * self.chunk} columns")  # fmt: skip
        if check_values:
            check_ranges(start, end, 1, k.shape[2])
        require_kernel_device(q, "split decode attention")
        out = torch.empty_like(q) if out is None else out
        partial, merge = triton_kernels()
        C = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        partial[(B * H, self.splits)](q, k, v, start, end, float(k_scale), float(v_scale), H, k.shape[1], C, D,
                                      self.chunk, self.splits, self.parts, self.stats, BLOCK_N=BLOCK_N,
                                      BLOCK_D=self.block_d)  # fmt: skip
        merge[(B * H,)](self.parts, self.stats, D, self.splits, out,
                        BLOCK_S=next_power_of_2(self.splits), BLOCK_D=self.block_d)  # fmt: skip
        return out
