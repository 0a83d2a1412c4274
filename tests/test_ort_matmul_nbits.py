"""ONNX Runtime's 4-bit and 8-bit kernels (engines/onnxruntime/matmul_nbits.py): the artifact's weight-only forms,
rewritten in memory as `MatMulNBits` (or, INT8 at level 1, float MatMuls over weights dequantized once), compute the
dequantized float product at each accuracy level: in one-layer models, and in the demo model's INT4 and INT8 exports
with the decoder weights shared between sessions or prepacked per session.

Tolerances, relative to the largest |reference| (the float64 product of the input and the dequantized weight):
- level 1, float32: float32 products summed in another order than float64's (K = 320 terms): measured <= 2e-6 on
  real `small` layers; gate 1e-5.
- level 1, float16 activations: the kernel computes in float32 and rounds its output to float16 once (2^-11 =
  4.9e-4 relative); gate 1e-3.
- level 4: the kernel quantizes the activations to INT8 per block of `block_size` inputs (scale max|x| / 127), each
  term off by up to half a step: measured 0.5-1.5% on real `small` layers (0.7-0.9% on these random ones); gate 3%,
  and above 1e-4, the proof that level 4 ran rather than level 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import engines.onnxruntime.matmul_nbits as matmul_nbits
from engines.onnxruntime import session as session_module
from engines.onnxruntime.matmul_nbits import QuantizedLayerRewrite, QuantizedLayers, SharedOperands, rewrite_graph
from engines.onnxruntime.session import OrtModel
from fusion_export.manifest import open_artifact
from reference_model import GenerationConfig, generate, make_request, prepare_batch
from reference_model.errors import FusionError
from reference_model.prompt import load_tokenizer

from .conftest import DEMO_IMAGE, run_main

K, N, BLOCK = 320, 96, 32  # K: 10 INT4 blocks, and 2.5 INT8 blocks of 128 (the last one padded)
LEVEL_1 = {np.float32: 1e-5, np.float16: 1e-3}
LEVEL_4 = 3e-2
LEVEL_4_FLOOR = 1e-4
TARGET = ("trt-10.15", 1024)  # opset 24: DequantizeLinear's block_size (opset 21) is there


def _quantized(rng, bits: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Signed q [K, N] (INT4 in [-7, 7], INT8 in [-127, 127]) and its scales ([K / BLOCK, N] or [N])."""
    top = 7 if bits == 4 else 127
    q = rng.integers(-top, top + 1, size=(K, N)).astype(np.int8)
    shape = (K // BLOCK, N) if bits == 4 else (N,)
    return q, (rng.random(shape) * 0.02 + 0.002).astype(dtype)


def _dequantized(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    scale = scale.astype(np.float64)
    if scale.ndim == 1:
        return q * scale[None, :]
    return (q.reshape(scale.shape[0], -1, N) * scale[:, None, :]).reshape(K, N)


def _layer_file(folder, q: np.ndarray, scale: np.ndarray, bits: int, w8a8: bool = False):
    """A one-layer graph in the artifact's form, its weights in an external data file: one weight read by two
    MatMuls (as the vision tower's are), each product a graph output."""
    dtype = ir.DataType.from_numpy(scale.dtype)
    values = ir.tensor(q.astype(ir.DataType.INT4.numpy()) if bits == 4 else q, name=f"l.weight.T.int{bits}")
    weight = ir.Value(name=values.name, const_value=values, shape=ir.Shape([K, N]), type=ir.TensorType(values.dtype))
    scales = ir.Value(name="l.weight.T.scale", const_value=ir.tensor(scale, name="l.weight.T.scale"))
    inputs = [ir.Value(name=n, shape=ir.Shape(["m", K]), type=ir.TensorType(dtype)) for n in ("x", "x2")]
    attributes = {"axis": 0, "block_size": BLOCK} if bits == 4 else {"axis": 1}
    dq = ir.node("DequantizeLinear", [weight, scales], attributes, name="l.weight.T/dequantize")
    nodes, initializers, left = [dq], [weight, scales], inputs[0]
    if w8a8:  # the left operand through Q/DQ: W8A8, which the rewrite leaves to ONNX Runtime
        act = ir.Value(name="act.scale", const_value=ir.tensor(np.array(0.05, scale.dtype), name="act.scale"))
        q_node = ir.node("QuantizeLinear", [inputs[0], act])
        dqa = ir.node("DequantizeLinear", [q_node.outputs[0], act])
        nodes, initializers, left = [dq, q_node, dqa], [weight, scales, act], dqa.outputs[0]
    products = [ir.node("MatMul", [x, dq.outputs[0]]) for x in (left, inputs[1])]
    for i, node in enumerate(products, 1):
        node.outputs[0].name, node.outputs[0].shape = f"y{i}", ir.Shape(["m", N])
        node.outputs[0].type = ir.TensorType(dtype)
    graph = ir.Graph(inputs, [p.outputs[0] for p in products], nodes=[*nodes, *products], initializers=initializers,
                     opset_imports={"": 21}, name="layer")  # fmt: skip
    folder.mkdir(exist_ok=True)
    path = folder / "layer.onnx"
    ir.save(ir.Model(graph, ir_version=10), path, external_data="layer.onnx.data", size_threshold_bytes=0)
    return path


def _session(path, model: bytes, done: QuantizedLayers, operands: SharedOperands | None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    if operands is not None:
        operands.hand_in(opts, done)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _run(path, level: int, x: np.ndarray, x2: np.ndarray) -> tuple[list[np.ndarray], QuantizedLayers, onnx.ModelProto]:
    model, done = rewrite_graph(path, None, QuantizedLayerRewrite(level))
    operands = SharedOperands()  # alive while the session runs
    outputs = _session(path, model, done, operands).run(None, {"x": x, "x2": x2})
    return outputs, done, onnx.load_from_string(model)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("level", [1, 4])
def test_one_layer_computes_the_dequantized_product(tmp_path, bits, dtype, level):
    rng = np.random.default_rng(bits * 10 + level)
    q, scale = _quantized(rng, bits, dtype)
    x, x2 = (rng.standard_normal((5, K)).astype(dtype) for _ in range(2))
    outputs, done, model = _run(_layer_file(tmp_path, q, scale, bits), level, x, x2)

    ops = _ops(model)
    assert "DequantizeLinear" not in ops and [o.name for o in model.graph.output] == ["y1", "y2"]
    if bits == 8 and level == 1:  # no float32 8-bit kernel on x86: a float MatMul over the dequantized weight
        assert (done.int8_float, done.kernels, ops.get("MatMul")) == (1, 0, 2)
    else:
        assert ops == {"MatMulNBits": 2} and (done.int4, done.int8) == ((1, 0) if bits == 4 else (0, 1))
        for node in model.graph.node:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            block = BLOCK if bits == 4 else matmul_nbits.INT8_BLOCK_SIZE
            assert attributes == {"K": K, "N": N, "bits": bits, "block_size": block, "accuracy_level": level}
    weight = _dequantized(q, scale)
    for got, a in zip(outputs, (x, x2)):
        reference = a.astype(np.float64) @ weight
        error = np.abs(got.astype(np.float64) - reference).max() / np.abs(reference).max()
        if level == 1:
            assert error <= LEVEL_1[dtype], error
        else:
            assert LEVEL_4_FLOOR < error <= LEVEL_4, error


@pytest.mark.parametrize("bits,k", [(4, 33), (8, 300)])  # INT4: a high nibble; INT8: in the padded last block
def test_a_changed_weight_changes_exactly_its_column(tmp_path, bits, k):
    """The packing's layout (transpose, nibble order, zero point, padding) puts each value where the kernel reads
    it: one changed value moves only its own output column, by x[:, k] * its scale * the change."""
    rng = np.random.default_rng(7)
    q, scale = _quantized(rng, bits, np.float32)
    x, x2 = (rng.standard_normal((4, K)).astype(np.float32) for _ in range(2))
    n, delta = 17, (5 if q[k, 17] < 0 else -5)
    changed = q.copy()
    changed[k, n] += delta
    level = 4 if bits == 8 else 1  # the 8-bit kernel runs at level 4 (level 1 is the float form)
    (base, _), (moved, _) = (_run(_layer_file(tmp_path / str(i), w, scale, bits), level, x, x2)[0]
                             for i, w in enumerate((q, changed)))  # fmt: skip
    others = np.arange(N) != n
    assert np.array_equal(base[:, others], moved[:, others])
    expected = x[:, k] * (scale[k // BLOCK, n] if bits == 4 else scale[n]) * delta
    # level 4 quantizes x: the change is x's INT8 value times the weight's change, x off by at most half a step
    # of its block's max / 127 (gate: a whole step of the largest block)
    tolerance = 1e-5 if level == 1 else np.abs(x).max() / 127 * abs(delta) * scale.max()
    np.testing.assert_allclose(moved[:, n] - base[:, n], expected, atol=tolerance, rtol=1e-4)


def test_operands_not_handed_in_fail_loudly(tmp_path):
    """The new initializers are declared past the end of the graph's own file: a session not given them fails to
    load rather than reading other bytes."""
    rng = np.random.default_rng(5)
    q, scale = _quantized(rng, 4, np.float32)
    path = _layer_file(tmp_path, q, scale, 4)
    model, done = rewrite_graph(path, None, QuantizedLayerRewrite(1))
    with pytest.raises(Exception, match="(?i)out of bounds|exceed|offset|length"):
        _session(path, model, done, None)


def test_w8a8_layers_are_left_as_exported(tmp_path):
    rng = np.random.default_rng(3)
    q, scale = _quantized(rng, 8, np.float32)
    path = _layer_file(tmp_path, q, scale, 8, w8a8=True)
    for level in (1, 4):
        model, done = rewrite_graph(path, None, QuantizedLayerRewrite(level))
        assert model is None and not (done.kernels or done.int8_float)  # a reader is W8A8: the weight stays


# ---- the demo model's INT4 and INT8 exports, through OrtModel


@pytest.fixture(scope="module")
def quantized_demo(export_demo, tmp_path_factory):
    """(precision, form) -> the demo export quantized (round to nearest INT4 in blocks of 32, or INT8 weight-only:
    no calibration), made once."""
    made = {}

    def get(precision: str, form: str):
        if (precision, form) not in made:
            out = tmp_path_factory.mktemp("nbits") / f"{precision}-{form}"
            int4 = ["--precision", "int4", "--method", "rtn", "--block-size", "32"]
            flags = int4 if form == "int4" else ["--weight-only"]
            source = export_demo(TARGET[0], precision, TARGET[1])
            result = run_main("quantize", str(source), "--out", str(out), "--quiet", *flags)
            assert result.returncode == 0, result.stderr
            made[(precision, form)] = open_artifact(out)
        return made[(precision, form)]

    return get


def _logits(model) -> np.ndarray:
    """Prefill and three greedy steps' logits for two demo requests (a left-padded batch)."""
    tokenizer = load_tokenizer(model.model_dir)
    questions = ["What is in front of the house?", "Count the boxes, then name every one of their colours."]
    batch = prepare_batch([make_request(DEMO_IMAGE, q, tokenizer, model.config) for q in questions], model.config, 16)
    out = generate(model.session(batch, 4), GenerationConfig(max_new_tokens=4), keep_logits=True)
    return out.step_logits.numpy()


def _as_exported(artifact, monkeypatch) -> np.ndarray:
    """The same artifact with ONNX Runtime's own fusion off (DequantizeLinear folded into float weights) and no
    rewrite: the dequantized float product, layer by layer."""
    with monkeypatch.context() as patch:
        patch.setattr(session_module, "rewrite_graph", lambda path, model, rewrite: (model, QuantizedLayers()))
        return _logits(OrtModel(artifact, weights="packed", int8_kernels="off").load())


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("form", ["int4", "int8"])
def test_demo_export_runs_the_kernels_at_each_level(quantized_demo, monkeypatch, form):
    """Both weights modes (shared: the INT4 initializers are not handed in, the operands are), both levels: every
    quantized layer of every graph rewritten, level 1 at float parity with the dequantized product (measured 0 for
    INT4, bit-identical here, and 9e-7 for INT8; gate 1e-4, the fp32 parity gate), level 4 near it: every layer's
    input quantized to INT8, the vision tower's and the LM head's too, measured 1.5% (INT4) and 1.9% (INT8) of the
    largest logit over a prefill and three steps; gate 5%."""
    artifact = quantized_demo("fp32", form)
    expected = _as_exported(artifact, monkeypatch)
    counts = artifact.manifest["quantization"]["quantized_layers"]
    for weights, level in (("shared", 1), ("shared", 4), ("packed", 4)):
        model = OrtModel(artifact, weights=weights, accuracy_level=level).load()
        text = model.describe()
        assert f"MatMulNBits accuracy level {level}" in text, text
        for graph, count in counts.items():
            done = model.quantized_layers[graph]
            assert done.kernels + done.int8_float == count, (graph, done)
            assert (done.int8 if level == 1 else done.int8_float) == 0, (graph, done)  # 8-bit: float at level 1
        error = _relative(_logits(model), expected)
        assert (error <= 1e-4) if level == 1 else (LEVEL_4_FLOOR < error <= 5e-2), (weights, level, error)


def test_fp16_export_runs_the_kernels(quantized_demo, monkeypatch):
    """fp16 graphs run with ONNX Runtime's optimizer off on CPU, so its own fusion never happens: the rewrite is
    what runs them as MatMulNBits. Level 1 against the dequantized product (float16 activations rounded in other
    places: measured 1.1e-3 of the largest logit) within the fp16 parity gate (1e-2 of the range, validation.py)."""
    artifact = quantized_demo("fp16", "int4")
    model = OrtModel(artifact, accuracy_level=1).load()
    for graph, count in artifact.manifest["quantization"]["quantized_layers"].items():
        done = model.quantized_layers[graph]
        assert done.kernels + done.int8_float == count and (graph == "vision_encoder") == (done.int4 == 0), done
    assert "decoder_step: 24 INT4 as MatMulNBits, 1 INT8 as float MatMul" in model.describe(), model.describe()
    assert _relative(_logits(model), _as_exported(artifact, monkeypatch)) <= 1e-2


def test_the_sessions_compute_from_the_handed_in_operands(quantized_demo, monkeypatch):
    """Every INT4 B zeroed (all values at the zero point) in the operands handed to the sessions: the logits move, so
    the sessions read those operands, not the artifact's INT4 initializers (measured: 1.37x the largest logit)."""
    artifact = quantized_demo("fp32", "int4")
    baseline = _logits(OrtModel(artifact, weights="shared", accuracy_level=1).load())
    original = matmul_nbits.nbits_operands

    def zeroed(q, scale, bits, block_size):
        b, scales = original(q, scale, bits, block_size)
        return (np.full_like(b, 0x88) if bits == 4 else b), scales

    monkeypatch.setattr(matmul_nbits, "nbits_operands", zeroed)
    perturbed = _logits(OrtModel(artifact, weights="shared", accuracy_level=1).load())
    assert _relative(perturbed, baseline) > 0.1


def test_accuracy_level_is_checked(quantized_demo):
    artifact = quantized_demo("fp32", "int4")
    for level in (0, 2, 3, 5):
        with pytest.raises(FusionError, match="--ort-accuracy-level"):
            OrtModel(artifact, accuracy_level=level)
