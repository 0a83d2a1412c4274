"""kv_write's two ONNX translations (ScatterElements, TensorScatter) equal its torch semantics on ORT."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fusion_export.graphs.kv_write import kv_write, scatter_index
from fusion_export.graphs.spec import GraphSpec
from fusion_export.onnx_export import trace


class Writer(torch.nn.Module):
    def forward(self, cache, update, write_indices):
        index = scatter_index(write_indices, update, self.rows)
        return torch.ops.fusion_export.kv_write(cache, update, write_indices, index, self.rows) * 1.0

    def __init__(self, rows: bool):
        super().__init__()
        self.rows = rows


@pytest.mark.parametrize("opset,rows", [(20, False), (20, True), (24, False)])
def test_translations_match_torch(opset, rows, tmp_path):
    import onnx_ir as ir

    batch, capacity = torch.export.Dim("batch"), torch.export.Dim("capacity")
    spec = GraphSpec(
        name="w",
        module=Writer(rows),
        example_inputs=(torch.zeros(2, 3, 11, 4), torch.ones(2, 3, 2, 4), torch.tensor([1, 5])),
        input_names=["cache", "update", "write_indices"],
        output_names=["present"],
        dynamic_shapes={"cache": {0: batch, 2: capacity}, "update": {0: batch}, "write_indices": {0: batch}},
        weights_group="w",
    )
    model = trace(spec, opset)
    ops = {node.op_type for node in model.graph}
    assert ("TensorScatter" if opset >= 24 else "ScatterND" if rows else "ScatterElements") in ops
    path = tmp_path / "w.onnx"
    ir.save(model, path)
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((3, 3, 9, 4)).astype(np.float32)
    update = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    write = np.array([0, 4, 7], dtype=np.int64)  # per-row columns, the last one filling the buffer
    got = ort.InferenceSession(str(path)).run(None, {"cache": cache, "update": update, "write_indices": write})[0]
    expected = independent_write(cache, update, write)
    np.testing.assert_array_equal(got, expected)  # every row, written and unwritten columns alike
    cache_t, update_t, write_t = torch.from_numpy(cache), torch.from_numpy(update), torch.from_numpy(write)
    torch_op = kv_write(cache_t, update_t, write_t, scatter_index(write_t, update_t, rows), rows).numpy()
    np.testing.assert_array_equal(torch_op, expected)
    assert not np.array_equal(expected, cache)  # the writes happened


def independent_write(cache: np.ndarray, update: np.ndarray, write: np.ndarray) -> np.ndarray:
    """The semantics spelled out with loops: row b's columns w_b .. w_b + n - 1 take the update, nothing else
    changes."""
    out = cache.copy()
    batch, heads, capacity, head_dim = cache.shape
    n = update.shape[2]
    for b in range(batch):
        for h in range(heads):
            for c in range(capacity):
                if write[b] <= c < write[b] + n:
                    out[b, h, c] = update[b, h, c - write[b]]
    return out
