"""Real TensorRT engines, built by TensorRT-RTX's builder (it needs no GPU): every export flavour and precision of
the demo model and the oracle checkpoint parse and build, the engine folder is checked on open, tampering and
version mismatches are refused, the static check agrees with the real parser, and the TensorRT backend's
GPU-free paths (request limits, folder checks, the GPU requirement itself) say what they should."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest

from engines.tensorrt.build import BuildOptions, EngineBuildError, build_engines
from engines.tensorrt.engine_manifest import (
    ENGINE_MANIFEST,
    ENGINE_SETS,
    EngineError,
    check_built_from,
    check_runtime,
    open_engines,
)
from engines.tensorrt.flavours import TrtFlavour, installed_flavours, load_trt, read_rtx_plan_header
from engines.tensorrt.plan import DECODER, BuildLimits, parse_device_memory, plan_build
from fusion_export.decoder_merge import merge_decoder
from fusion_export.manifest import file_entries, open_artifact, save_manifest
from fusion_export.progress import Progress
from fusion_export.trt_rules.operator_check import check_graph
from fusion_export.trt_rules.targets import TrtTarget
from reference_model.errors import FusionError

from .conftest import DEMO_IMAGE, FLAVOURS, run_main

pytestmark = pytest.mark.skipif(
    TrtFlavour.tensorrt_rtx not in installed_flavours(),
    reason="needs TensorRT-RTX (pip install tensorrt-rtx-cu12, in the test extras on x86-64 Linux)",
)
GRAPHS = ("vision_encoder", "decoder_prefill", "decoder_step")


@pytest.fixture(scope="module")
def built(export_demo, tmp_path_factory):
    """Engine folders for every demo flavour, built once per module."""
    cache: dict[tuple, Path] = {}

    def get(target: str, precision: str, max_context: int | None) -> Path:
        key = (target, precision, max_context)
        if key not in cache:
            out = tmp_path_factory.mktemp("engines") / f"demo-{target}-{precision}"
            options = BuildOptions(limits=BuildLimits(max_context=None if max_context else 1024),
                                   flavour=TrtFlavour.tensorrt_rtx)  # fmt: skip
            cache[key] = build_engines(export_demo(target, precision, max_context), out, options, verbose=False).folder
        return cache[key]

    return get


@pytest.mark.parametrize("target,precision,max_context", FLAVOURS)
def test_every_flavour_builds(built, export_demo, target, precision, max_context):
    folder = built(target, precision, max_context)
    engines = open_engines(folder)
    manifest = engines.manifest
    trt = load_trt(TrtFlavour.tensorrt_rtx)
    check_runtime(engines, trt)  # same flavour and version; every plan's header reads as TensorRT-RTX's
    assert manifest["precision"] == precision and manifest["query_len"] == 16
    assert manifest["tensorrt"] == {
        "flavour": "tensorrt-rtx",
        "version": trt.version,
        "compute_capabilities": ["SM80", "SM86", "SM89", "SM120", "SM121"],  # TensorRT-RTX's default targets
        "builder_optimization_level": 3,
        "strongly_typed": True,
    }
    artifact = open_artifact(export_demo(target, precision, max_context))
    check_built_from(engines, artifact)
    assert manifest["source"]["manifest_sha256"] == artifact.manifest["manifest_sha256"]
    assert engines.limits["max_context"] == 1024 and engines.config == artifact.config
    opset24 = target == "trt-10.15"
    assert engines.engine_names == ("vision_encoder", "decoder")  # the decoder held once (decoder_merge.py)
    for name in engines.engine_names:
        engine = manifest["engines"][name]
        path = folder / engine["file"]
        assert path.stat().st_size == engine["bytes"] > 1_000_000 and engine["layers"] > 300
        plan = path.read_bytes()
        assert read_rtx_plan_header(plan[:64], len(plan), str(path))["bytes"] == engine["bytes"]
        # ONNX Attention (opset 24) becomes TensorRT attention, marked decomposable so fp32 can fall back
        assert engine["attention_layers_decomposable"] == (6 if opset24 and name != "vision_encoder" else 0)
        dtypes = {t["name"]: t["dtype"] for t in engine["io"]["inputs"]}
        embeds = "instruct_embeds" if name == "vision_encoder" else "inputs_embeds"
        assert dtypes[embeds] == {"fp32": "FLOAT", "fp16": "HALF"}[precision]  # strongly typed: the graph's
    decoder = manifest["engines"]["decoder"]
    assert decoder["graphs"] == ["decoder_prefill", "decoder_step"]
    cache = decoder["profile"]["past_key_values.0.key"]
    assert cache["min"] == cache["max"] == [1, 4, 1024, 32]  # one fixed capacity, batch 1
    # one profile for both phases: a decode step (one token, no latents) to the longest prompt with every latent
    assert decoder["profile"]["inputs_embeds"]["min"][1] == 1 and decoder["profile"]["vision_pos"]["min"] == [1, 0]
    assert decoder["profile"]["inputs_embeds"]["max"][1] == 1023 and decoder["profile"]["vision_pos"]["max"] == [1, 16]


@pytest.mark.parametrize("target,precision,max_context", FLAVOURS)
def test_kv_buffers_follow_what_tensorrt_made_of_the_writes(built, target, precision, max_context):
    """Which flavours get one KV buffer per tensor and which two (engines/tensorrt/kv_buffers.py): the trt-10.15
    graphs' TensorScatter becomes TensorRT's KV-cache update layer, which writes its cache input in place (the
    runtime binds one buffer, as `get_aliased_input_tensor` will say); the trt-10.3 graphs' ScatterElements is an
    ordinary layer (two buffers that take turns). The parsed network says so, the plan counted so from the ONNX
    ops, and its KV figure is exactly what the runtime's KvBuffers allocates at the profile's largest batch."""
    import torch

    from engines.tensorrt.kv_buffers import KvBuffers
    from fusion_export.graph_inputs import past_names, present_names

    manifest = open_engines(built(target, precision, max_context)).manifest
    plan, decoder = manifest["plan"], manifest["engines"]["decoder"]
    cache = decoder["profile"]["past_key_values.0.key"]["max"]  # the cache's shape at the profile's max
    in_place = target == "trt-10.15"
    assert decoder["kv_updated_in_place"] == (sorted(past_names(6)) if in_place else [])
    assert manifest["engines"]["vision_encoder"]["kv_updated_in_place"] == []
    assert (plan["kv_in_place"], plan["kv_buffers"]) == ((True, 1) if in_place else (False, 2))
    assert plan["kv_write_ops"] == (["TensorScatter"] if in_place else ["ScatterElements", "ScatterND"])
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    buffers = KvBuffers(list(zip(past_names(6), present_names(6))),
                        lambda past, present: past in decoder["kv_updated_in_place"],
                        lambda: torch.empty(cache, dtype=dtype, device="meta"))  # fmt: skip
    assert cache[0] == plan["limits"]["max_batch"] and buffers.nbytes == plan["memory"]["kv_cache"]
    assert buffers.turns == (1 if in_place else 2)


def test_oracle_checkpoint_builds(export_oracle, tmp_path):
    result = build_engines(export_oracle(16), tmp_path / "eng", BuildOptions(), verbose=False)
    assert {name: e["layers"] > 300 for name, e in result.engines.items()} == dict.fromkeys(ENGINE_SETS[1], True)
    open_engines(result.folder)


def test_engine_folder_checks(built, export_demo, tmp_path):
    folder = shutil.copytree(built("trt-10.3", "fp32", None), tmp_path / "eng")
    trt = load_trt(TrtFlavour.tensorrt_rtx)
    step = folder / "decoder.engine"
    original = step.read_bytes()

    step.write_bytes(original[:-1000])  # a truncated copy: caught by its size
    with pytest.raises(EngineError, match="decoder.engine: .* bytes, manifest says"):
        open_engines(folder)
    reseal(folder)  # even with the hashes rewritten, the plan's own header says it is short
    with pytest.raises(FusionError, match="truncated or padded engine"):
        check_runtime(open_engines(folder), trt)

    step.write_bytes(b"ptrt" + original[4:])  # a different magic: not a TensorRT-RTX plan
    reseal(folder)
    with pytest.raises(FusionError, match="not a TensorRT-RTX engine"):
        check_runtime(open_engines(folder), trt)
    validity, diagnostics = trt.engine_validity(step.read_bytes())
    assert validity == "INVALID" and diagnostics == ["MALFORMED_ENGINE"]  # the runtime's own verdict agrees

    step.write_bytes(original)
    reseal(folder, lambda m: m["tensorrt"].update(version="1.6.0.1"))  # built by another TensorRT
    with pytest.raises(
        EngineError, match=r"built with tensorrt-rtx 1\.6\.0\.1, this machine has tensorrt-rtx .*rebuild"
    ):
        check_runtime(open_engines(folder), trt)

    reseal(folder, lambda m: m["tensorrt"].update(version=trt.version))
    check_runtime(open_engines(folder), trt)
    edited = json.loads((folder / ENGINE_MANIFEST).read_text())
    edited["plan"]["limits"]["max_context"] = 99999
    (folder / ENGINE_MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(EngineError, match="edited after it was written"):
        open_engines(folder)

    with pytest.raises(EngineError, match="built from a different vision_encoder.onnx"):
        check_built_from(open_engines(built("trt-10.3", "fp32", None)), open_artifact(export_demo("trt-10.3", "fp16")))


def reseal(folder: Path, change=lambda manifest: None) -> None:
    manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
    change(manifest)
    manifest["files"] = file_entries(folder, manifest_name=ENGINE_MANIFEST)
    save_manifest(folder, manifest, ENGINE_MANIFEST)


@pytest.mark.parametrize("target,precision,max_context", FLAVOURS)
def test_check_trt_agrees_with_the_real_parser(export_demo, target, precision, max_context):
    folder = export_demo(target, precision, max_context)
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        findings, _ = check_graph(path, TrtTarget(target))
        static_ok = not [f for f in findings if f.severity == "error"]
        assert static_ok and parses(path) == (True, []), name
    result = run_main("check-trt", str(folder), "--parser")
    assert result.returncode == 0 and result.stdout.count(": parses") == 3 and "DISAGREES" not in result.stdout


def test_static_check_and_parser_reject_a_symbolic_kv_capacity(export_demo, tmp_path):
    """What the real parser taught: TensorScatter's cache must have a fixed length. A static-capacity graph with
    the capacity made symbolic again is rejected by both, for the same reason."""
    folder = export_demo("trt-10.15", "fp32", 1024)
    model = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_value == 1024:
                dim.dim_param = "capacity"
    path = folder.parent / "symbolic-capacity" / "decoder_step.onnx"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(folder / "decoder.onnx.data", path.parent / "decoder.onnx.data")
    onnx.save(model, path)
    findings, _ = check_graph(path, TrtTarget.trt_10_15)
    static = [f.message for f in findings if f.severity == "error"]
    assert static and all("The KV cache tensor must have a static sequence length dimension" in m for m in static)
    ok, errors = parses(path)
    assert not ok and any("The KV cache tensor must have a static sequence length dimension" in e for e in errors)
    result = run_main("check-trt", str(path), "--trt-target", "trt-10.15", "--parser")
    assert result.returncode == 1 and "decoder_step: REJECTED" in result.stdout and "DISAGREES" not in result.stdout


def parses(path: Path) -> tuple[bool, list[str]]:
    _, _, errors = load_trt(TrtFlavour.tensorrt_rtx).parse(path)
    return not errors, errors


def test_parser_errors_are_quoted(export_demo, tmp_path):
    """A graph TensorRT rejects fails with the parser's own words; an artifact whose graphs disagree with each
    other is refused before TensorRT runs, and nothing is left behind."""
    from engines.tensorrt.build import build_graph

    folder = shutil.copytree(export_demo("trt-10.15", "fp32", 1024), tmp_path / "art")
    plan = plan_build(open_artifact(folder), BuildLimits())
    model = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    for dim in model.graph.input[5].type.tensor_type.shape.dim:  # past_key_values.0.key
        if dim.dim_value == 1024:
            dim.dim_param = "capacity"
    onnx.save(model, folder / "decoder_step.onnx")
    trt = load_trt(TrtFlavour.tensorrt_rtx)
    decoder = next(g for g in plan.graphs if g.name == DECODER)
    prefill = onnx.load(folder / "decoder_prefill.onnx", load_external_data=False)
    merged = merge_decoder(prefill, model).SerializeToString()  # what build parses: the edited step graph merged
    with pytest.raises(EngineBuildError) as error:
        build_graph(trt, folder / "decoder_step.onnx", decoder, BuildOptions(), Progress(1, enabled=False), None,
                    tmp_path / "decoder.engine", model_bytes=merged)  # fmt: skip
    assert "TensorRT's parser (tensorrt-rtx" in str(error.value)
    assert "The KV cache tensor must have a static sequence length dimension" in str(error.value)

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder)
    manifest["graphs"]["decoder_step"]["inputs"][5]["shape"][2] = "capacity"
    save_manifest(folder, manifest)
    with pytest.raises(FusionError, match="the decoder graphs disagree on their KV capacity"):
        build_engines(folder, tmp_path / "eng", BuildOptions(), verbose=False)
    assert not (tmp_path / "eng").exists()


def test_dry_run_and_memory_planner(export_demo, tmp_path):
    art = export_demo("trt-10.3", "fp32", None)
    result = run_main("build", str(art), "--dry-run", "--device-memory", "orin-nano-8", "--max-context", "2048")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "precision fp32 (from the graphs), query_len 16, KV capacity 2048 (chosen at build)" in out
    assert "past_key_values.0.key" in out and "min [1, 4, 2048, 32]  opt [1, 4, 2048, 32]  max [1, 4, 2048, 32]" in out
    assert "instruct_embeds" in out and "min [1, 1, 128]  opt [1, 32, 128]  max [1, 512, 128]" in out
    assert "Jetson Orin Nano 8 GB" in out and "largest KV capacity that fits:" in out
    assert f"trtexec --onnx={art}/vision_encoder.onnx --saveEngine=ENG/vision_encoder.engine --stronglyTyped" in out
    assert "# decoder: decoder_prefill.onnx + decoder_step.onnx merged in memory" in out  # trtexec cannot build it
    assert "inputs_embeds" in out and "min [1, 1, 128]  opt [1, 1, 128]  max [1, 2047, 128]" in out
    assert "vision_pos" in out and "min [1, 0]  opt [1, 0]  max [1, 16]" in out
    assert "tensorrt_rtx --onnx=" in out and "once, in one engine for prefill and decode" in out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing

    plan = plan_build(open_artifact(art), BuildLimits(max_context=1024), parse_device_memory("1.2"))
    fits = plan.largest_context
    assert 1000 < fits < 4096  # the tiny model's activations at long prompts exceed 0.2 GB beyond the overhead
    result = run_main("build", str(art), "--dry-run", "--device-memory", "1.2", "--max-context", "4096")
    assert (
        result.returncode == 2
        and f"the largest KV capacity that fits is {fits} (--max-context {fits})" in result.stderr
    )
    result = run_main("build", str(art), "--dry-run", "--device-memory", "0.5")
    assert result.returncode == 2 and "even the shortest context does not fit" in result.stderr
    result = run_main("build", str(export_demo("trt-10.15", "fp32", 1024)), "--dry-run", "--max-context", "2048")
    assert result.returncode == 2 and "exported with a fixed KV capacity of 1024" in result.stderr
    result = run_main("build", str(art), "--dry-run", "--device-memory", "tx2")
    assert result.returncode == 2 and "--device-memory 'tx2': a preset (agx-orin-64" in result.stderr


def test_build_cli(export_demo, tmp_path):
    art = export_demo("trt-10.3", "fp16", None)
    result = run_main("build", str(art), "--out", str(tmp_path / "eng"), "--max-context", "1024", "--quiet",
                      "--compute-capability", "sm86,SM89")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "decoder:" in result.stdout and "layers" in result.stdout
    engines = open_engines(tmp_path / "eng")
    assert engines.manifest["tensorrt"]["compute_capabilities"] == ["SM86", "SM89"]  # read back from the plans
    result = run_main("build", str(art), "--out", str(tmp_path / "eng2"), "--compute-capability", "SM90")
    assert result.returncode == 2 and "--compute-capability SM90: tensorrt-rtx" in result.stderr
    result = run_main("build", str(art), "--out", str(art / "engines"))
    assert result.returncode == 2 and "is an artifact folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_fp32_attention_needs_the_decomposable_marking(export_demo, tmp_path, monkeypatch):
    """Without the marking, TensorRT-RTX stops at fp32 ONNX Attention ("not supported by a dedicated kernel"):
    the reason the builder marks every attention layer decomposable."""
    from engines.tensorrt.flavours import Trt

    monkeypatch.setattr(Trt, "attention_layers", lambda self, network: [])
    with pytest.raises(EngineBuildError, match="Attention operation was not supported by a dedicated kernel"):
        build_engines(export_demo("trt-10.15", "fp32", 1024), tmp_path / "eng", BuildOptions(), verbose=False)
    assert not (tmp_path / "eng").exists()


def test_tensorrt_backend_without_a_gpu(built, tmp_path):
    """What the backend checks before it needs a GPU, through the CLI a user runs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU refusal cannot be shown")
    folder = built("trt-10.3", "fp32", None)
    common = ["--image", str(DEMO_IMAGE), "--question", "What is this?", "--quiet"]
    result = run_main("generate", "--engines", str(folder), *common, "--max-new-tokens", "4")
    assert result.returncode == 2 and "TensorRT engines run on an NVIDIA GPU and this machine has none" in result.stderr
    result = run_main("generate", "--engines", str(folder), *common, "--max-new-tokens", "400")
    assert result.returncode == 2 and re.search(r"needs \d+ KV-cache columns .* these engines hold 1024", result.stderr)
    long_question = "why " * 200  # 800 tokens with the byte tokenizer; the vision engine takes 512
    result = run_main("generate", "--engines", str(folder), "--image", str(DEMO_IMAGE), "--question", long_question)
    assert result.returncode == 2 and "question is 800; these engines take at most 512" in result.stderr
    assert "--max-question-tokens" in result.stderr
    result = run_main("generate", "--engines", str(folder), *common, "--provider", "cpu")
    assert result.returncode == 2 and "--provider does not apply to --backend tensorrt" in result.stderr
    result = run_main("validate", str(folder), "--model", str(folder / "model"))
    assert result.returncode == 2 and "this machine has none" in result.stderr


def test_small_shape_builds(tmp_path):
    """The `small` preset (decoder 512 x 8 layers, vocabulary 32064; realistic weights for a CPU) exported in fp16
    with a fixed capacity, as a datacenter deployment would be, builds the same way."""
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.precision import Precision
    from reference_model.synthetic import write_random_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "small", "small", seed=0)
    options = ExportOptions(query_len=64, precision=Precision.fp16, trt_target=TrtTarget.trt_10_15, max_context=2048)
    artifact = export_artifact(checkpoint, tmp_path / "art", options, verbose=False).folder
    result = build_engines(artifact, tmp_path / "eng", BuildOptions(), verbose=False)
    engines = result.engines
    decoder_bytes = open_artifact(artifact).manifest["files"]["decoder.onnx.data"]["bytes"]
    # the one decoder engine carries the fp16 weights once: 1.1x the weights file measured (its kernels besides),
    # where a prefill and a step engine held 1.96x (109.6 + 89.6 MB of 101.7)
    assert 0.9 * decoder_bytes < engines["decoder"]["bytes"] < 1.4 * decoder_bytes, engines["decoder"]["bytes"]
    assert engines["decoder"]["attention_layers_decomposable"] == 8  # one per decoder layer
    assert result.plan.limits["max_context"] == 2048 and result.plan.capacity_fixed_at_export
