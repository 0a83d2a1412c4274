"""kv_write's two ONNX translations (ScatterElements, TensorScatter) equal its torch semantics on ORT."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fusion_export.graphs.kv_write import kv_write
from fusion_export.graphs.spec import GraphSpec
from fusion_export.onnx_export import trace


class Writer(torch.nn.Module):
    def forward(self, cache, update, write_indices):
        return torch.ops.fusion_export.kv_write(cache, update, write_indices) * 1.0


@pytest.mark.parametrize("opset", [20, 24])
def test_translations_match_torch(opset, tmp_path):
    import onnx_ir as ir

    batch, capacity = torch.export.Dim("batch"), torch.export.Dim("capacity")
    spec = GraphSpec(
        name="w",
        module=Writer(),
        example_inputs=(torch.zeros(2, 3, 11, 4), torch.ones(2, 3, 2, 4), torch.tensor([1, 5])),
        input_names=["cache", "update", "write_indices"],
        output_names=["present"],
        dynamic_shapes={"cache": {0: batch, 2: capacity}, "update": {0: batch}, "write_indices": {0: batch}},
        weights_group="w",
    )
    model = trace(spec, opset)
    ops = {node.op_type for node in model.graph}
    assert ("TensorScatter" if opset >= 24 else "ScatterElements") in ops
    path = tmp_path / "w.onnx"
    ir.save(model, path)
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((3, 3, 9, 4)).astype(np.float32)
    update = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    write = np.array([0, 4, 7], dtype=np.int64)  # per-row columns, the last one filling the buffer
    got = ort.InferenceSession(str(path)).run(None, {"cache": cache, "update": update, "write_indices": write})[0]
    expected = independent_write(cache, update, write)
    np.testing.assert_array_equal(got, expected)  # every row, written and unwritten columns alike
    torch_op = kv_write(torch.from_numpy(cache), torch.from_numpy(update), torch.from_numpy(write)).numpy()
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
