"""The interaction layers' window cross-attention plugin (engines/plugins/interaction_attention.py): its reference
op against the reference model's layer, the Triton kernel (interpreter) against the reference op, and its ONNX
form on ONNX Runtime and TensorRT-RTX."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engines.plugins.interaction_attention import interaction_attention  # noqa: E402
from fusion_export.plugin_ops.reference import interaction_attention_reference  # noqa: E402
from reference_model.errors import FusionError  # noqa: E402
from reference_model.global_context import context_windows  # noqa: E402
from reference_model.interaction import WindowCrossAttention  # noqa: E402

# fp32: both sides accumulate in float32 over the same w^2 keys; only summation order differs.
# fp16: the same fp16 inputs on both sides and float32 math, so the bound is the output's own fp16 rounding (half
# an ulp at |out| < 4 is <= 2e-3) plus the fp32 order effects.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}
ONNX_TYPES = {torch.float32: 1, torch.float16: 10}  # TensorProto.FLOAT, FLOAT16


def _case(B, s, w, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, s, s, H, D, generator=g).to(dtype)
    k = torch.randn(B, s * w, s * w, H, D, generator=g).to(dtype)
    v = torch.randn(B, s * w, s * w, H, D, generator=g).to(dtype)
    return q, k, v


def test_reference_op_is_the_interaction_layers_attention():
    """The op's definition, fed the projected context grid, equals the reference model's WindowCrossAttention fed
    the gathered windows (projections commute with the gather): the semantics the plugin replaces."""
    torch.manual_seed(0)
    B, s, w, D, H = 2, 3, 3, 64, 16
    layer = WindowCrossAttention(D, H, eps=1e-5).eval()
    for norm in (layer.q_proj[0], layer.k_proj[0], layer.v_proj[0]):  # non-trivial LayerNorm affine parameters
        torch.nn.init.normal_(norm.weight, 1.0, 0.2), torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    queries = torch.randn(B, s * s, D)
    context = torch.randn(B, (s * w) ** 2, D)
    with torch.no_grad():
        expected = layer(queries, context_windows(context, s, w))
        q = layer.q_proj(queries).view(B, s, s, H, D // H)
        k = layer.k_proj(context).view(B, s * w, s * w, H, D // H)
        v = layer.v_proj(context).view(B, s * w, s * w, H, D // H)
        got = layer.o_proj(interaction_attention_reference(q, k, v).reshape(B, s * s, D))
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,s,w,H,D",
    # query_len 4 / 9 / 16 / 64 / 144 (s = 2, 3, 4, 8, 12), FUSION's w = 3 and others, odd head sizes
    [(2, 2, 3, 16, 8), (3, 3, 5, 4, 13), (1, 4, 3, 16, 24), (2, 8, 2, 2, 16), (1, 12, 4, 2, 8), (1, 5, 1, 3, 7)],
)
def test_interaction_attention_matches_reference(B, s, w, H, D, dtype):
    q, k, v = _case(B, s, w, H, D, dtype, seed=s * 100 + w * 10 + D)
    out = interaction_attention(q, k, v)
    ref = interaction_attention_reference(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interaction_attention_int8_context_matches_reference(dtype):
    """INT8 projected context (per-tensor scales) dequantized on load; a kernel that dropped a scale would be off
    by far more than the tolerance."""
    q, k, v = _case(2, 3, 3, 4, 16, dtype, seed=8)
    k_scale, v_scale = float(k.float().abs().max()) / 127, float(v.float().abs().max()) / 127
    k8 = (k.float() / k_scale).round().clamp(-127, 127).to(torch.int8)
    v8 = (v.float() / v_scale).round().clamp(-127, 127).to(torch.int8)
    out = interaction_attention(q, k8, v8, k_scale, v_scale)
    ref = interaction_attention_reference(q, k8, v8, k_scale, v_scale)
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]
    assert (ref.float() - interaction_attention_reference(q, k8, v8, k_scale, 2 * v_scale).float()).abs().max() > 0.1


def test_interaction_attention_reads_only_its_window():
    """One huge key at context cell (4, 7), 3 x 3 latents with w = 3: only latent (1, 2), whose window is rows 3-5
    and columns 6-8, puts all its weight on that entry's value; the others see only zero values."""
    s, w, H, D = 3, 3, 2, 4
    q = torch.ones(1, s, s, H, D)
    k = torch.zeros(1, s * w, s * w, H, D)
    v = torch.zeros(1, s * w, s * w, H, D)
    k[0, 4, 7] = 100.0
    v[0, 4, 7] = 1.0
    out = interaction_attention(q, k, v)[0, ..., 0, 0]  # (s, s): latent grid, head 0, channel 0
    expected = torch.full((s, s), 0.0)
    expected[1, 2] = 1.0
    assert torch.allclose(out, expected, atol=1e-6)


def test_interaction_attention_refuses_bad_inputs():
    q, k, v = _case(1, 3, 3, 2, 8, torch.float32, seed=1)
    with pytest.raises(FusionError, match=r"q \(9, 2, 8\), k"):
        interaction_attention(q.view(9, 2, 8), k, v)
    with pytest.raises(FusionError, match="multiple w of the latent grid's side"):
        interaction_attention(q, k[:, :8, :8], v[:, :8, :8])
    with pytest.raises(FusionError, match="dtypes q torch.float32, k torch.float16"):
        interaction_attention(q, k.half(), v.half())
    with pytest.raises(FusionError, match="apply to int8 k, v only"):
        interaction_attention(q, k, v, k_scale=0.5)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interaction_attention_onnx_form_runs_on_onnxruntime(dtype, opset):
    """The plugin node with its local-function decomposition, on ONNX Runtime, equals the reference op."""
    import onnx
    import onnxruntime as ort

    from fusion_export.plugin_ops.onnx_forms import DOMAIN, INTERACTION_ATTENTION, interaction_attention_model

    model = interaction_attention_model(ONNX_TYPES[dtype], side=4, window=3, heads=16, head_dim=12, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, INTERACTION_ATTENTION)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, k, v = _case(2, 4, 3, 16, 12, dtype, seed=opset)
    out = torch.from_numpy(session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0])
    assert out.dtype == dtype
    assert (out.float() - interaction_attention_reference(q, k, v).float()).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interaction_attention_onnx_form_builds_with_tensorrt_rtx(dtype, tmp_path):
    """Without the plugin registered, TensorRT-RTX's parser inlines the local function and the builder builds it;
    the static check reads the node through its function for every target."""
    from fusion_export.plugin_ops.onnx_forms import interaction_attention_model

    from .conftest import build_plugin_model

    model = interaction_attention_model(ONNX_TYPES[dtype], side=8, window=3, heads=16, head_dim=32)
    profile = {
        name: tuple((b, side, side, 16, 32) for b in (1, 2, 4)) for name, side in (("q", 8), ("k", 24), ("v", 24))
    }
    build_plugin_model(model, tmp_path / "interaction_attention.onnx", profile, min_layers=10, min_plan_bytes=10_000)
