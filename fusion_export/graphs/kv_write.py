"""`fusion_export::kv_write`: write new keys/values into a fixed-capacity cache buffer at per-row columns.

One torch op with two ONNX translations, chosen by opset:
- opset >= 24: `TensorScatter(cache, update, write_indices, axis=-2)`, which TensorRT 10.15+ maps to its
  KV-cache update layer and ONNX Runtime updates in place when past and present share a buffer;
- opset <= 23: `ScatterElements(cache, columns, update, axis=2)` (TensorRT 10.3 on JetPack 6 has no
  TensorScatter; ONNX Runtime still skips the copy when the buffers are aliased).
"""

from __future__ import annotations

import torch
from onnxscript import opset20 as op20
from onnxscript.values import Opset

TENSOR_SCATTER_OPSET = 24


@torch.library.custom_op("fusion_export::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """cache (B, H, C, hd), update (B, H, n, hd), write_indices (B,) -> cache with columns w_b..w_b+n-1 set."""
    n = update.shape[2]
    columns = write_indices[:, None] + torch.arange(n, device=cache.device)[None]  # (B, n)
    return cache.scatter(2, columns[:, None, :, None].expand_as(update), update)


@kv_write.register_fake
def _(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(cache)


_op24 = Opset("", TENSOR_SCATTER_OPSET)


def _tensor_scatter(cache, update, write_indices):
    return _op24.TensorScatter(cache, update, write_indices, axis=-2)


def _scatter_elements(cache, update, write_indices):
    n = op20.Squeeze(op20.Shape(update, start=2, end=3), [0])
    steps = op20.Range(op20.Constant(value_int=0), n, op20.Constant(value_int=1))  # (n,)
    columns = op20.Unsqueeze(write_indices, [1]) + op20.Unsqueeze(steps, [0])  # (B, n)
    index = op20.Expand(op20.Unsqueeze(columns, [1, 3]), op20.Shape(update))  # (B, H, n, hd)
    return op20.ScatterElements(cache, index, update, axis=2)


def translation_table(opset: int) -> dict:
    """custom_translation_table entry for torch.onnx.export at this opset."""
    fn = _tensor_scatter if opset >= TENSOR_SCATTER_OPSET else _scatter_elements
    return {torch.ops.fusion_export.kv_write.default: fn}
