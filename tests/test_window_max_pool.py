"""The irregular window max-pool plugin (engines/plugins/window_max_pool.py): Triton kernel (interpreter) against
its reference op, and its ONNX form on ONNX Runtime and TensorRT-RTX. Max pooling only selects values, so every
dtype must match the reference exactly (no tolerance)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engines.plugins.window_max_pool import window_max_pool  # noqa: E402
from fusion_export.plugin_ops.reference import window_max_pool_reference  # noqa: E402
from reference_model.errors import FusionError  # noqa: E402

ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.int8: 3}


def _grid(B, H, W, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, (B, H, W, D), generator=g, dtype=torch.int8)
    return torch.randn(B, H, W, D, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize(
    "B,side,n,D",
    [(2, 54, 4, 37), (1, 54, 8, 130), (2, 54, 12, 16), (1, 27, 5, 3), (3, 7, 7, 1), (1, 9, 1, 8)],
)
def test_window_max_pool_matches_reference(B, side, n, D, dtype):
    """FUSION's 54 -> 4 / 8 / 12 (query_len 16 / 64 / 144: overlapping windows of unequal length), odd channel
    counts, more than one block of channels, identity and whole-grid windows."""
    grid = _grid(B, side, side, D, dtype, seed=side * n + D)
    out = window_max_pool(grid, n)
    assert out.dtype == dtype and out.shape == (B, n * n, D)
    assert torch.equal(out, window_max_pool_reference(grid, n))


def test_window_max_pool_reads_each_window():
    """A single large value in one window shows up in exactly the output cells whose windows cover it."""
    grid = torch.zeros(1, 54, 54, 4)
    # 54 -> 4 windows: [0, 14), [13, 27), [27, 41), [40, 54); row 13 is in windows 0 and 1, column 30 in 2 only
    grid[0, 13, 30] = 1.0
    out = window_max_pool(grid, 4).view(4, 4, 4)[..., 0]
    expected = torch.zeros(4, 4)
    expected[0, 2] = expected[1, 2] = 1.0
    assert torch.equal(out, expected)


def test_window_max_pool_refuses_bad_inputs():
    with pytest.raises(FusionError, match=r"grid \(54, 54, 8\); expected \[B, H, W, D\]"):
        window_max_pool(torch.zeros(54, 54, 8), 4)
    with pytest.raises(FusionError, match="dtype torch.float64"):
        window_max_pool(torch.zeros(1, 54, 54, 8, dtype=torch.float64), 4)
    with pytest.raises(FusionError, match="out_size 60 for a 54x54 grid"):
        window_max_pool(torch.zeros(1, 54, 54, 8), 60)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_window_max_pool_onnx_form_runs_on_onnxruntime(dtype, opset):
    """The plugin node with its local-function decomposition, on ONNX Runtime, equals the reference op."""
    import onnx
    import onnxruntime as ort

    from fusion_export.plugin_ops.onnx_forms import DOMAIN, WINDOW_MAX_POOL, window_max_pool_model

    model = window_max_pool_model(ONNX_TYPES[dtype], side=54, out_size=8, channels=37, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, WINDOW_MAX_POOL)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    grid = _grid(2, 54, 54, 37, dtype, seed=opset)
    out = torch.from_numpy(session.run(None, {"grid": grid.numpy()})[0])
    assert torch.equal(out, window_max_pool_reference(grid, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_max_pool_onnx_form_builds_with_tensorrt_rtx(dtype, tmp_path):
    """Without the plugin registered, TensorRT-RTX's parser inlines the local function and the builder builds it;
    the static check reads the node through its function for every target."""
    from fusion_export.plugin_ops.onnx_forms import window_max_pool_model

    from .conftest import build_plugin_model

    model = window_max_pool_model(ONNX_TYPES[dtype], side=54, out_size=8, channels=64, opset=17)
    profile = {"grid": ((1, 54, 54, 64), (2, 54, 54, 64), (4, 54, 54, 64))}
    build_plugin_model(model, tmp_path / "window_max_pool.onnx", profile, min_layers=5, min_plan_bytes=10_000)
