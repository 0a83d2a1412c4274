"""The decoder's attention in the exported graphs: one torch op (`F.scaled_dot_product_attention`, what the
reference calls) with one ONNX translation per opset, like `kv_write`.

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
Same math as the reference (softmax(q k^T / sqrt(d) + mask) v), in float32 or the graph's precision.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset20 as op

ATTENTION_OPSET = 23  # ONNX Attention exists from here; below it, the decomposition above


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p or is_causal or enable_gqa or attn_mask is None:
        raise NotImplementedError("the decoder graphs call attention with a boolean mask only")
    dtype = query.dtype.numpy()

    def constant(x: float):
        return op.Constant(value=ir.tensor(np.array(x, dtype=dtype)))

    if scale is None:
        scale = 1.0 / math.sqrt(int(query.shape[-1]))  # head_dim is a static dim of every graph
    scores = op.MatMul(op.Mul(query, constant(scale)), op.Transpose(key, perm=[0, 1, 3, 2]))
    probs = op.Softmax(op.Add(scores, op.Where(attn_mask, constant(0.0), constant(-np.inf))), axis=-1)
    return op.MatMul(probs, value)


def translation_table(opset: int) -> dict:
    """custom_translation_table entries for torch.onnx.export at this opset."""
    if opset >= ATTENTION_OPSET:
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: _sdpa}
