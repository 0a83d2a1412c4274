"""The decoder's attention in the exported graphs.

`use_export_attention` swaps an export-friendly forward into the model's Attention modules (the model code is
unchanged): the same math in fewer graph nodes. RoPE is applied once to the queries and keys together (they
share the qkv projection), before they are split, and `rotate_half` is a MatMul by a constant +-1 permutation
instead of Split + Neg + Concat; per layer that is 13 nodes fewer than the reference's form, which is what a
decode step of a small model is made of (ONNX Runtime spends a few microseconds per node).

The attention itself is one torch op with one ONNX translation per opset, like `kv_write`: the prefill calls
`F.scaled_dot_product_attention` (what the reference calls), a decode step `fusion_export::decode_attention`
(the same math), because the best form differs between them (below).

- opset >= 23: the exporter's own translation, ONNX `Attention`, which TensorRT maps to its attention layer and
  ONNX Runtime runs with its fused kernel.
- opset <= 22 (`trt-10.3`): the exporter's generic decomposition scales both q and k by sqrt(scale), reshapes and
  transposes the whole key cache, and guards the softmax with IsNaN/Where: five passes over the cache per layer
  and step. Here instead:

```text
scores = MatMul(q * scale, Transpose(k))          the Transpose feeds the MatMul directly, so ONNX Runtime fuses it
                                                  into one MatMul(transB) and TensorRT into its attention kernel
probs  = Softmax(scores + Where(mask, 0, -inf))   our masks always leave a row's own column visible: no NaN guard
out    = MatMul(probs, v)
```
Same math as the reference (softmax(q k^T / sqrt(d) + mask) v), in float32 or the graph's precision; in a 16-bit
graph the scores are cast to float32 for the softmax and the probabilities back.

A decode step has one or a few queries against the whole cache, so its scores are formed the other way round,
`Transpose(MatMul(k, Transpose(q * scale)))`: the cache is then the streamed left operand, which ONNX Runtime's
GEMM reads as it is, instead of the right operand, which it repacks on every call (on the `small` preset decode
steps got 7-12% faster, measured interleaved). For a prefill the extra transpose would copy S x S scores per
layer, so it keeps the first form.
"""

from __future__ import annotations

import math
import types

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnxscript import opset20 as op
from torch import nn

from reference_model.decoder import Attention

ATTENTION_OPSET = 23  # ONNX Attention exists from here; below it, the decomposition above


def _rotation(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """R with x @ R == rotate_half(x) == cat(-x2, x1): exact (one +-1 product per output)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=dtype)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def _forward(self: Attention, x, cos, sin, mask, cache):
    """Attention.forward with RoPE once over q and k, as one MatMul-based rotation (module docstring)."""
    B, S, _ = x.shape
    H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv_proj(x).view(B, S, H + 2 * KV, hd)  # (B, S, heads, hd): rows q, k, v
    qk, v = qkv.split((H + KV, KV), dim=2)
    cos, sin = cos[:, :, None].to(qk.dtype), sin[:, :, None].to(qk.dtype)  # (B, S, 1, hd)
    qk = qk * cos + torch.matmul(qk, self.rotation) * sin
    q, k = qk.split((H, KV), dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, hd)
    if cache is not None:
        k, v = cache.update(k, v)
    if getattr(cache, "decode", False):  # a decode step: queries against the whole buffer (graphs/decoder.py)
        out = torch.ops.fusion_export.decode_attention(q, k, v, mask)  # GQA inside: the plugin reads KV heads
    else:
        groups = H // KV
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, hd)
    return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


@torch.library.custom_op("fusion_export::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, hd), k/v (B, KV, C, hd) with H % KV == 0, mask (B, 1, n, C) bool -> (B, H, n, hd)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def use_export_attention(model: nn.Module) -> nn.Module:
    """Swap the export forward into every decoder Attention of `model` (idempotent; same math)."""
    for module in model.modules():
        if isinstance(module, Attention) and not hasattr(module, "rotation"):
            module.register_buffer("rotation", _rotation(module.head_dim, module.qkv_proj.weight.dtype), False)
            module.forward = types.MethodType(_forward, module)
    return model


def _attention(query, key, value, attn_mask, decode: bool):
    dtype = query.dtype.numpy()

    def constant(x: float, as_type=dtype):
        return op.Constant(value=ir.tensor(np.array(x, dtype=as_type)))

    scale = 1.0 / math.sqrt(int(query.shape[-1]))  # head_dim is a static dim of every graph
    to_keys = [0, 1, 3, 2]
    if decode:
        scores = op.Transpose(op.MatMul(key, op.Transpose(op.Mul(query, constant(scale)), perm=to_keys)), perm=to_keys)
    else:
        scores = op.MatMul(op.Mul(query, constant(scale)), op.Transpose(key, perm=to_keys))
    if dtype == np.float32:
        probs = op.Softmax(op.Add(scores, op.Where(attn_mask, constant(0.0), constant(-np.inf))), axis=-1)
    else:  # 16-bit graphs: the softmax (exp and its row sum) in float32, like every numerically sensitive reduction
        mask = op.Where(attn_mask, constant(0.0, np.float32), constant(-np.inf, np.float32))
        probs32 = op.Softmax(op.Add(op.Cast(scores, to=ir.DataType.FLOAT), mask), axis=-1)
        probs = op.Cast(probs32, to=ir.DataType.from_numpy(dtype))
    return op.MatMul(probs, value)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p or is_causal or enable_gqa or attn_mask is None or scale is not None:
        raise NotImplementedError("the decoder graphs call attention with a boolean mask only")
    return _attention(query, key, value, attn_mask, decode=False)


def _repeat_kv(x, heads: int):
    """(B, KV, C, hd) -> (B, heads, C, hd), each KV head repeated heads // KV times (repeat_interleave)."""
    kv_heads = int(x.shape[1])
    if kv_heads == heads:
        return x
    shape = op.Shape(x)
    groups = op.Constant(value_ints=[heads // kv_heads])
    expanded = op.Expand(
        op.Unsqueeze(x, op.Constant(value_ints=[2])),
        op.Concat(op.Slice(shape, [0], [2]), groups, op.Slice(shape, [2], [4]), axis=0),
    )
    return op.Reshape(expanded, op.Constant(value_ints=[0, heads, -1, int(x.shape[3])]))


def _decode(q, k, v, mask):
    heads = int(q.shape[1])
    return _attention(q, _repeat_kv(k, heads), _repeat_kv(v, heads), mask, decode=True)


def _decode_attention_op(q, k, v, mask):
    from onnxscript.values import Opset

    heads = int(q.shape[1])
    y, _, _, _ = Opset("", ATTENTION_OPSET).Attention(q, _repeat_kv(k, heads), _repeat_kv(v, heads), attn_mask=mask)
    return y


def _decode_plugin(q, k, v, mask):
    """The DecodeAttention plugin node (engines/plugins): the valid columns [start, end) of each row, read off the
    last new token's mask row (valid columns are contiguous: left padding, then the written ones)."""
    from onnxscript.values import Opset

    from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, DOMAIN, register_schemas

    register_schemas()
    last_row = op.Cast(op.Squeeze(op.Slice(mask, [-1], [2**62], [2]), [1, 2]), to=ir.DataType.INT32)  # (B, C)
    start = op.Cast(op.ArgMax(last_row, axis=-1, keepdims=0), to=ir.DataType.INT32)
    end = op.Add(start, op.ReduceSum(last_row, op.Constant(value_ints=[-1]), keepdims=0))
    # a float cache: scales 1, written out all the same (TensorRT hands a plugin only the attributes a node has)
    return getattr(Opset(DOMAIN, 1), DECODE_ATTENTION)(q, k, v, start, end, k_scale=1.0, v_scale=1.0)


def translation_table(opset: int, plugins: bool = False) -> dict:
    """custom_translation_table entries for torch.onnx.export at this opset (plugins: decode steps as the
    DecodeAttention plugin node, whose local function the caller attaches)."""
    decode = _decode_plugin if plugins else _decode_attention_op if opset >= ATTENTION_OPSET else _decode
    if opset >= ATTENTION_OPSET:  # the exporter's own Attention for SDPA
        return {torch.ops.fusion_export.decode_attention.default: decode}
    return {
        torch.ops.aten.scaled_dot_product_attention.default: _sdpa,
        torch.ops.fusion_export.decode_attention.default: decode,
    }
