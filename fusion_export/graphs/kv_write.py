"""`fusion_export::kv_write`: write new keys/values into a fixed-capacity cache buffer at per-row columns.

One torch op with two ONNX translations, chosen by opset:
- opset >= 24: `TensorScatter(cache, update, write_indices, axis=-2)`, which TensorRT 10.15+ maps to its
  KV-cache update layer and ONNX Runtime updates in place when past and present share a buffer;
- opset <= 23: `ScatterElements(cache, scatter_index, update, axis=2)` (TensorRT 10.3 on JetPack 6 has no
  TensorScatter; ONNX Runtime still skips the copy when the buffers are aliased).

`scatter_index` is `write_indices` expanded to the update's shape (`scatter_index()`), computed once per forward by
the caller and shared by every layer's keys and values: computed inside each translation it cost eight shape
nodes per write, 128 of the `small` step graph's nodes. TensorScatter does not read it (its graph is dropped).

A prefill writes a whole prompt, and ScatterElements moves it element by element with an int64 index per
element; there `scatter_index` is built for ScatterND instead, one (row, head, column) index per written vector
of head_dim values (`scatter_index(..., rows=True)`): ONNX Runtime copies whole rows then, and skips the buffer
copy when past and present are aliased, as it does for ScatterElements (which stays the decode step's form,
the faster one for a single column).
"""

from __future__ import annotations

import torch
from onnxscript import opset20 as op20
from onnxscript.values import Opset

TENSOR_SCATTER_OPSET = 24


def scatter_index(write_indices: torch.Tensor, update: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """ScatterElements' index, (B, H, n, hd) int64: column w_b + j for row b, every head and channel; or with
    `rows`, ScatterND's, (B, H, n, 3): the (row, head, column) each vector of head_dim values goes to."""
    B, H, n, _ = update.shape
    columns = write_indices[:, None] + torch.arange(n, device=update.device)[None]  # (B, n)
    if not rows:
        return columns[:, None, :, None].expand_as(update)
    row = torch.arange(B, device=update.device)[:, None, None].expand(B, H, n)
    head = torch.arange(H, device=update.device)[None, :, None].expand(B, H, n)
    return torch.stack((row, head, columns[:, None, :].expand(B, H, n)), dim=-1)  # (B, H, n, 3)


@torch.library.custom_op("fusion_export::kv_write", mutates_args=())
def kv_write(
    cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, index: torch.Tensor, rows: bool
) -> torch.Tensor:
    """cache (B, H, C, hd), update (B, H, n, hd), write_indices (B,), index = scatter_index(write_indices, update,
    rows) -> cache with row b's columns w_b..w_b+n-1 set to the update."""
    if rows:
        out = cache.clone()
        out[index[..., 0], index[..., 1], index[..., 2]] = update
        return out
    return cache.scatter(2, index, update)


@kv_write.register_fake
def _(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, index: torch.Tensor, rows: bool):
    return torch.empty_like(cache)


_op24 = Opset("", TENSOR_SCATTER_OPSET)


def _tensor_scatter(cache, update, write_indices, index, rows):
    return _op24.TensorScatter(cache, update, write_indices, axis=-2)


def _scatter_elements(cache, update, write_indices, index, rows):
    if rows:
        return op20.ScatterND(cache, index, update)  # the prefill's row form
    return op20.ScatterElements(cache, index, update, axis=2)


def translation_table(opset: int) -> dict:
    """custom_translation_table entry for torch.onnx.export at this opset."""
    fn = _tensor_scatter if opset >= TENSOR_SCATTER_OPSET else _scatter_elements
    return {torch.ops.fusion_export.kv_write.default: fn}
