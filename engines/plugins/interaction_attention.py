"""Window cross-attention of the interaction layers: each latent's query over its own w x w window of the context.

The interaction layer (reference_model/interaction.py) gives each of the s x s latents one query and lets it
attend, per head, to the w^2 entries of its window of the (s*w) x (s*w) global context. The reference gathers
the windows into a (B, s^2, w^2, D) copy first (`context_windows`); the projections in front of the attention
are per-entry, so they commute with that gather, and the op here reads each window in place from the projected
context grid instead: latent (r, c) reads rows r*w .. r*w+w-1 and columns c*w .. c*w+w-1.

    q      [B, s, s, heads, D]         float32 | float16: the latents' projected queries, row-major grid
    k, v   [B, s*w, s*w, heads, D]     q's dtype, or int8 (value = int8 * k_scale / v_scale, per-tensor scales
                                       as a Q/DQ pair around the projected context would carry them)
    -> out [B, s, s, heads, D]         q's dtype; scores, softmax and accumulation in float32

Every shape is carried by the tensors (w = k's side / s), so the op needs no attributes. Windows do not overlap
and cover the grid, so every key is read exactly once. `interaction_attention_reference` is the definition;
`interaction_attention` runs the Triton kernel (one program per row, latent and head; the whole window in one
block, w^2 <= a few hundred).
"""

# no `from __future__ import annotations`: Triton 3.0's interpreter takes only an annotation that is the object
# tl.constexpr (or the string "constexpr") as a constexpr, not the string "tl.constexpr"

import functools

import torch

from reference_model.errors import FusionError

from .launch import Launch, check_kv_scales, jit, next_power_of_2, require_kernel_device, static


def check_inputs(q, k, v, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Shapes, dtypes and scales, named; the kernel reads no memory outside what they allow."""
    if q.dim() != 5 or k.dim() != 5 or k.shape != v.shape:
        raise FusionError(f"interaction attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                          "expected q [B, s, s, heads, D] and k, v [B, s*w, s*w, heads, D]")  # fmt: skip
    B, s, s2, H, D = q.shape
    if s != s2 or k.shape[1] != k.shape[2] or k.shape[1] % s or (k.shape[0], k.shape[3], k.shape[4]) != (B, H, D):
        raise FusionError(f"interaction attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)}: the "
                          "context grid's side must be a multiple w of the latent grid's side s, with the same "
                          "batch, heads and head size")  # fmt: skip
    if q.dtype not in (torch.float32, torch.float16) or k.dtype != v.dtype or k.dtype not in (q.dtype, torch.int8):
        raise FusionError(f"interaction attention: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; expected q "
                          "float32 / float16 and k, v of q's dtype or both int8")  # fmt: skip
    check_kv_scales("interaction attention", k.dtype == torch.int8, k_scale, v_scale, "int8 k, v")


@functools.cache
def triton_kernel(compiled: bool = False):
    """Defined on first use: Triton reads TRITON_INTERPRET when the kernel is decorated. `compiled`: the compilable
    kernel even under TRITON_INTERPRET=1 (what launch.compile_ptx takes)."""
    # a module global, not a local the kernel closes over: Triton 3.0 (torch 2.4's) resolves names, and its
    # interpreter finds triton.language, only in the kernel's __globals__
    global tl
    import triton.language as tl

    def kernel(q_ptr, k_ptr, v_ptr, S, W, H, D, out_ptr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)  # one program per (row, latent, head); latents row-major over the s x s grid
        scale = 1.0 / tl.sqrt_rn(D.to(tl.float32))
        h = pid % H
        cell = pid // H  # b * S * S + r * S + c
        c = cell % S
        r = (cell // S) % S
        b = cell // (S * S)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + (cell * H + h) * D + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        e = tl.arange(0, BLOCK_K)  # window entry i * W + j: context row r*W + i, column c*W + j
        e_ok = e < W * W
        side = S * W
        entry = (b * side + r * W + e // W) * side + c * W + e % W
        offsets = (entry[:, None] * H + h) * D + d[None, :]
        ok = e_ok[:, None] & d_ok[None, :]
        keys = tl.load(k_ptr + offsets, mask=ok, other=0).to(tl.float32) * K_SCALE  # int8: dequantized here
        s = tl.where(e_ok, tl.sum(keys * q[None, :], axis=1), float("-inf"))
        p = tl.exp(s - tl.max(s, axis=0))
        values = tl.load(v_ptr + offsets, mask=ok, other=0).to(tl.float32) * V_SCALE
        out = tl.sum(p[:, None] * values, axis=0) / tl.sum(p, axis=0)
        tl.store(out_ptr + (cell * H + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return jit(kernel, compiled)


def launch(q_shape, k_shape, k_scale: float = 1.0, v_scale: float = 1.0) -> Launch:
    """Grid, scalars and constants from q [B, s, s, heads, D] and k [B, s*w, s*w, heads, D] (ints or TensorRT shape
    expressions: engines/plugins/launch.py). s and w are static in the prefill graphs."""
    B, s, _, H, D = q_shape
    w = static(k_shape[1], "the context grid's side") // static(s, "the latent grid's side")
    constexprs = dict(BLOCK_K=next_power_of_2(w * w), BLOCK_D=next_power_of_2(static(D, "the head size")),
                      K_SCALE=float(k_scale), V_SCALE=float(v_scale))  # fmt: skip
    return Launch(grid=(B * s * s * H,), scalars=(s, w, H, D), constexprs=constexprs)


def interaction_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); `out`: a contiguous buffer of q's
    shape and dtype to write (a TensorRT plugin's output), else a new one."""
    check_inputs(q, k, v, k_scale, v_scale)
    require_kernel_device(q, "interaction attention")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q) if out is None else out
    run = launch(tuple(q.shape), tuple(k.shape), k_scale, v_scale)
    triton_kernel()[run.grid](q, k, v, *run.scalars, out, **run.constexprs)
    return out
