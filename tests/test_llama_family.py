"""The rest of the FUSION family end to end: LLaMA-3.1 decoders (grouped-query attention, llama3 RoPE, the llama_3
template) and SigLIP2 towers, through export, ONNX Runtime, quantization and TensorRT-RTX's real builder.

- The upstream LLaMA oracle (tests/data/oracle/fusion-x-llama-tiny) exported for opset 24 (TensorScatter, a fixed
  KV capacity) gives the oracle's greedy ids and logits on ONNX Runtime, and its graphs build (`-m slow`: the
  39-layer tower's export alone takes 75 s, so these run on request, with the full-size test).
- The demo's toy members (`demo --family`: LLaMA with 8 heads over 2 KV heads, 16-wide so ONNX Runtime's fused
  GroupQueryAttention takes it; Phi with SigLIP2): every export flavour over them, the plugins, INT4 and
  W8A8 + INT8 KV each validate against the reference (their precision's gates, greedy ids identical where they
  are gated) and build. The decoder and the tower are independent axes, so the flavours are spread over the
  members (LLaMA + SigLIP, Phi + SigLIP2 and LLaMA + SigLIP2 each appear).
The KV cache holds the KV heads only (2 of 8), never repeated, in every graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.validation import Tolerances, validate_session
from engines.onnxruntime.session import OrtModel
from engines.tensorrt.build import BuildOptions, build_engines
from engines.tensorrt.flavours import TrtFlavour, installed_flavours
from engines.tensorrt.plan import BuildLimits
from fusion_export.export import ExportOptions, export_artifact
from fusion_export.manifest import open_artifact
from fusion_export.precision import Precision
from fusion_export.trt_rules.targets import TrtTarget
from reference_model import GenerationConfig, generate, load_model, make_request, prepare_batch
from reference_model.prompt import load_tokenizer

from .conftest import DEMO_IMAGE, LLAMA_ORACLE_DIR, run_main
from .test_memory_plan import CONSTANTS_BYTES, planned_like

needs_rtx = pytest.mark.skipif(
    TrtFlavour.tensorrt_rtx not in installed_flavours(), reason="needs TensorRT-RTX (in the test extras)"
)
HAS_RTX = TrtFlavour.tensorrt_rtx in installed_flavours()  # the builds run where it is; validation runs anywhere
QUESTIONS = ["What is in front of the house?", "Count the boxes, then name their colours."]


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    """The demo's toy checkpoint of each family member, written once."""
    from fusion_export_cli.commands.demo import DEMO_SEED, demo_config
    from reference_model.synthetic import write_random_checkpoint

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            folder = tmp_path_factory.mktemp("family") / family
            cache[family] = write_random_checkpoint(folder, demo_config(family), seed=DEMO_SEED)
        return cache[family]

    return get


def export(model_dir: Path, out: Path, target: str = "trt-10.3", precision: str = "fp32", **options) -> Path:
    opts = ExportOptions(precision=Precision(precision), trt_target=TrtTarget(target), **options)
    return export_artifact(model_dir, out, opts, verbose=False).folder


def validate(model_dir: Path, folder: Path, questions=QUESTIONS[:1], steps: int = 6):
    """validate_session of the artifact on ONNX Runtime against the reference, under its precision's gates."""
    model = load_model(model_dir)
    artifact = open_artifact(folder)
    tokenizer = load_tokenizer(artifact.model_dir)
    requests = [make_request(DEMO_IMAGE, q, tokenizer, model.config) for q in questions]
    batch = prepare_batch(requests, model.config, artifact.query_len)
    runtime = OrtModel(artifact)
    tolerances = Tolerances.for_precision(artifact.precision, artifact.quantization)
    return validate_session(model, batch, runtime.session(batch, steps), steps, tolerances, artifact.kv_int8_scales)


def build(folder: Path, out: Path) -> dict:
    fixed = open_artifact(folder).max_context is not None  # else 2048 columns, not the default 8192
    options = BuildOptions(limits=BuildLimits(max_context=None if fixed else 2048), flavour=TrtFlavour.tensorrt_rtx)
    return build_engines(folder, out, options, verbose=False).engines


def plans_agree(folder: Path, **export) -> None:
    """The plan made from the config alone (build --dry-run --preset/--model) agrees with the artifact's."""
    from engines.tensorrt.plan import plan_build

    artifact = open_artifact(folder)
    limits = BuildLimits(max_context=None if artifact.max_context else 2048)
    planned = planned_like(artifact, limits, precision=artifact.precision.value, **export)
    real = plan_build(artifact, limits)
    assert (planned.kv_write_ops, planned.memory["kv_cache"]) == (real.kv_write_ops, real.memory["kv_cache"])
    assert 0 <= real.memory["weights"] - planned.memory["weights"] <= CONSTANTS_BYTES


def kv_heads(folder: Path) -> int:
    """The KV-head axis of the decoder graphs' cache inputs, as the manifest lists them."""
    manifest = open_artifact(folder).manifest
    shapes = {tuple(e["shape"][1:2]) for g in ("decoder_prefill", "decoder_step")
              for e in manifest["graphs"][g]["inputs"] if e["name"].startswith("past_")}  # fmt: skip
    assert len(shapes) == 1
    return shapes.pop()[0]


@pytest.fixture(scope="module")
def oracle_export(tmp_path_factory):
    return export(LLAMA_ORACLE_DIR, tmp_path_factory.mktemp("llama-oracle") / "art", "trt-10.15")


@pytest.mark.slow  # the 39-layer tower's export: 75 s; run on request with the full-size test
def test_oracle_export_gives_the_oracles_ids(oracle_export):
    """Opset-24 graphs of the upstream LLaMA oracle on ONNX Runtime: the oracle's own greedy ids and logits."""
    from safetensors.torch import load_file

    artifact = open_artifact(oracle_export)
    assert artifact.manifest["export"]["kv_cache"]["update_op"] == "TensorScatter"
    assert artifact.max_context == 4096  # the default fixed capacity: tokenizer_model_max_length, not llama3's 8192
    assert kv_heads(oracle_export) == 2
    inputs = load_file(LLAMA_ORACLE_DIR / "inputs.safetensors")
    outputs = load_file(LLAMA_ORACLE_DIR / "outputs.safetensors")
    from reference_model import Request

    request = Request(inputs["input_ids"][0].tolist(), inputs["instructs"][0].tolist(), inputs["images"][0])
    batch = prepare_batch([request], artifact.config, 36)
    out = generate(OrtModel(artifact).session(batch, 6), GenerationConfig(max_new_tokens=6), keep_logits=True)
    assert out.token_ids == outputs["generated_ids"].tolist() == [[33, 55, 175, 31, 167, 26]]
    assert (out.step_logits - outputs["generate_step_logits"]).abs().max().item() <= 1e-4  # fp32 gate


@pytest.mark.slow  # the 39-layer tower's export: 75 s; run on request with the full-size test
def test_oracle_export_validates_in_a_padded_batch(oracle_export):
    report = validate(LLAMA_ORACLE_DIR, oracle_export, QUESTIONS, steps=8)
    assert report.passed, report.table()


@pytest.mark.slow
@needs_rtx
def test_oracle_graphs_build(oracle_export, tmp_path):
    """TensorRT-RTX builds the opset-24 graphs; the static check passes them for trt-11 too (the same graphs)."""
    from fusion_export.trt_rules.operator_check import check_graphs

    graphs = {name: oracle_export / f"{name}.onnx" for name in ("vision_encoder", "decoder_prefill", "decoder_step")}
    assert check_graphs(graphs, TrtTarget.trt_11).ok
    engines = build(oracle_export, tmp_path / "eng")
    assert set(engines) == {"vision_encoder", "decoder"} and all(e["layers"] > 300 for e in engines.values())


@pytest.mark.parametrize(
    "family,target,precision,options",
    [("llama", "trt-10.3", "fp16", {}), ("x-llama", "trt-10.15", "fp32", {"max_context": 2048, "plugins": True}),
     pytest.param("x-phi", "trt-10.15", "fp32", {"max_context": 1024}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_members_validate_and_build(family_checkpoint, tmp_path, family, target, precision, options):
    """Each export flavour on a member (the oracle's test above adds LLaMA + SigLIP2 at opset 24 in fp32, the INT8
    test's source LLaMA + SigLIP2 at trt-10.3 in fp32): the graphs validate on ONNX Runtime under their precision's
    gates and TensorRT-RTX builds them; the KV cache holds the KV heads alone."""
    model_dir = family_checkpoint(family)
    folder = export(model_dir, tmp_path / "art", target, precision, **options)
    config = open_artifact(folder).config
    assert kv_heads(folder) == config.decoder.num_kv_heads
    assert (config.decoder.num_kv_heads < config.decoder.num_heads) == (config.decoder.family == "llama")
    report = validate(model_dir, folder, QUESTIONS)
    assert report.passed, report.table()
    if HAS_RTX:
        assert all(e["layers"] > 100 for e in build(folder, tmp_path / "eng").values())
    if options.get("plugins"):  # the GQA path of the decode-attention plugin is in the step graph
        assert "DecodeAttention" in open_artifact(folder).manifest["export"]["plugins"]
    else:
        plans_agree(folder)


@pytest.mark.parametrize(
    "target,flags",
    [("trt-10.15", ["--precision", "int4", "--method", "rtn"]),
     ("trt-10.3", ["--precision", "int8", "--kv-cache", "int8", "--num-samples", "2"])],
)  # fmt: skip
def test_quantized_validates_and_builds(family_checkpoint, tmp_path, target, flags):
    model_dir = family_checkpoint("x-llama")
    source = export(model_dir, tmp_path / "art", target, max_context=2048 if target == "trt-10.15" else None)
    if target == "trt-10.3":  # the source itself: LLaMA + SigLIP2 at opset 20 in fp32, greedy ids identical
        assert validate(model_dir, source).passed
    result = run_main("quantize", str(source), "--out", str(tmp_path / "q"), *flags, "--quiet")
    assert result.returncode == 0, result.stderr
    report = validate(model_dir, tmp_path / "q")
    assert report.passed, report.table()
    if HAS_RTX:
        assert build(tmp_path / "q", tmp_path / "eng")
    int4 = "int4" in flags
    plans_agree(tmp_path / "q", quantization="int4" if int4 else "int8", kv_cache="float" if int4 else "int8",
                **({"method": "rtn"} if int4 else {}))  # fmt: skip


def test_decode_attention_kernel_on_the_llama_step(family_checkpoint, monkeypatch):
    """The DecodeAttention plugin's Triton kernel (interpreted on CPU) in place of the step graph's attention in the
    first and the last layer, on the LLaMA member's own queries and grouped KV cache (8 heads over 2 KV heads, a
    left-padded batch of two): each step's logits equal the reference session's."""
    import copy

    import torch

    from engines.plugins.decode_attention import decode_attention as kernel
    from fusion_export.graphs.decoder import DecoderStepGraph
    from reference_model import ReferenceSession
    from reference_model.rope import rope_cos_sin

    model = load_model(family_checkpoint("x-llama"))
    tokenizer = load_tokenizer(family_checkpoint("x-llama"))
    batch = prepare_batch([make_request(DEMO_IMAGE, q, tokenizer, model.config) for q in QUESTIONS], model.config, 36)
    session = ReferenceSession(model, batch, 4)
    tokens = session.prefill().argmax(-1)
    past = tuple(t.clone() for pair in zip(session.cache.keys, session.cache.values) for t in pair)
    graph = DecoderStepGraph(copy.deepcopy(model)).eval()

    calls, layers = [], model.config.decoder.num_layers
    reference_op = torch.ops.fusion_export.decode_attention

    def plugin(q, k, v, mask):
        assert k.shape[1] * 4 == q.shape[1] == 8  # the grouped cache reaches the kernel unrepeated
        calls.append(q.shape)
        if len(calls) % layers not in (1, 0):  # the kernel in the first and the last layer (2 s a call, interpreted)
            return reference_op(q, k, v, mask)
        last_row = mask[:, 0, -1].to(torch.int32)  # valid columns are contiguous: left padding, then the written
        start = last_row.argmax(-1).to(torch.int32)
        return kernel(q, k, v, start, start + last_row.sum(-1).to(torch.int32))

    monkeypatch.setattr(torch.ops.fusion_export, "decode_attention", plugin)
    for _ in range(2):  # the second step reads the column the first wrote
        state_length = session.state.length
        expected = session.step(tokens)
        valid = session.state.key_valid.to(torch.int64)  # this step's column included
        cos, sin = rope_cos_sin(session.state.positions[:, None], model.config.decoder.rope)
        write = torch.full((2,), state_length, dtype=torch.int64)
        with torch.inference_mode():
            logits, *past = graph(model.embed_tokens(tokens[:, None]), valid, cos, sin, write, past)
        assert (logits - expected).abs().max().item() <= 1e-5
        tokens = expected.argmax(-1)
    assert len(calls) == 2 * layers  # every layer of both steps called the plugin's op


def test_demo_families_are_the_four_members():
    """`demo --family`: each toy is its member's decoder and tower (the demo runs them through the same steps)."""
    from fusion_export_cli.commands.demo import DEMO_FAMILIES, demo_config

    shapes = {family: (demo_config(family).decoder.family, demo_config(family).vision.num_patches,
                       demo_config(family).decoder.num_kv_heads) for family in DEMO_FAMILIES}  # fmt: skip
    assert shapes == {"phi": ("phi3", 729, 4), "x-phi": ("phi3", 576, 4), "llama": ("llama", 729, 2),
                      "x-llama": ("llama", 576, 2)}  # fmt: skip
    assert demo_config("x-llama").raw["mm_vision_tower"] == "tiny-siglip2-giant-opt-patch16-384"
