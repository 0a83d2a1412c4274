"""`fusion-export quantize`: INT8 Q/DQ artifacts (W8A8 calibrated through the graphs, and weight-only) and fp16
re-exports of the tiny demo model, checked against the float32 reference with the int8 gates, parsed and built by
TensorRT-RTX, checked by `check-trt` for every target; bad calibration input is refused before any work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from benchmarks.harness import BackendContender, BenchSettings
from benchmarks.roofline import graph_weight_bytes
from engines.tensorrt.build import BuildOptions, build_engines
from engines.tensorrt.engine_manifest import open_engines
from engines.tensorrt.runtime import TrtModel
from fusion_export.manifest import ArtifactError, open_artifact, save_manifest
from fusion_export.trt_rules.operator_check import check_graphs
from fusion_export.trt_rules.targets import TrtTarget

from .conftest import ROOT, run_main, scale_initializer

GRAPHS = ("vision_encoder", "decoder_prefill", "decoder_step")


@pytest.fixture(scope="module")
def quantized(export_demo, tmp_path_factory):
    """(target, mode) -> a quantized demo artifact, made once."""
    made = {}

    def get(target: str, mode: str):
        if (target, mode) not in made:
            out = tmp_path_factory.mktemp("q") / f"{target}-{mode}"
            flags = ["--weight-only"] if mode == "int8-weight-only" else ["--num-samples", "3", "--decode-steps", "4"]
            result = run_main("quantize", str(export_demo(target)), "--out", str(out), "--quiet", *flags)
            assert result.returncode == 0, result.stderr
            made[target, mode] = out
        return made[target, mode]

    return get


def _validate(deployment, model, tmp_path, tokens=16, *extra):
    report = tmp_path / f"{deployment.name}.json"
    result = run_main("validate", str(deployment), "--model", str(model), "--max-new-tokens", str(tokens),
                      "--json", str(report), *extra)  # fmt: skip
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("mode", ["int8", "int8-weight-only"])
def test_int8_artifact_matches_reference_within_int8_gates(quantized, demo_checkpoint, tmp_path, mode):
    folder = quantized("trt-10.3", mode)
    artifact = open_artifact(folder)
    record = artifact.manifest["quantization"]
    assert artifact.quantization == record["mode"] == mode and record["excluded"] == ["model.lm_head.weight.T"]
    assert record["quantized_layers"]["decoder_step"] > 0 and record["quantized_layers"]["vision_encoder"] > 0
    assert ("calibration" in record) == (mode == "int8")
    if mode == "int8":
        assert record["calibration"]["samples"] == 3 and record["calibration"]["source"].startswith("bundled")
        assert record["float_inputs"] == ["*down_proj*"] and record["activations"].endswith("percentile 99.9")
    # the prefill and step graphs share every INT8 weight and, W8A8, every activation scale: stored once
    graphs = {g: onnx.load(folder / f"{g}.onnx", load_external_data=False) for g in GRAPHS}
    names = [{t.name for t in graphs[g].graph.initializer if t.name.endswith((".int8", ".input_scale"))}
             for g in ("decoder_prefill", "decoder_step")]  # fmt: skip
    assert names[1] and names[1] <= names[0]
    refs = {(t.name, *[(e.key, e.value) for e in t.external_data]) for g in ("decoder_prefill", "decoder_step")
            for t in graphs[g].graph.initializer if t.name.endswith(".int8")}  # fmt: skip
    assert len(refs) == len({r[0] for r in refs})  # one location per weight name across both graphs
    ops = {n.op_type for g in graphs.values() for n in g.graph.node}
    assert ("QuantizeLinear" in ops) == (mode == "int8") and "DequantizeLinear" in ops

    plot = tmp_path / "errors.png"
    result, report = _validate(folder, demo_checkpoint, tmp_path, 16, "--plot", str(plot))
    assert result.returncode == 0 and report["passed"], result.stdout
    assert report["quantization"] == mode
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.text.get("Software") == "fusion-export validate"
    layers = report["kv_layers_after_prefill"]
    assert len(layers) == artifact.config.decoder.num_layers and all(
        0.99 < e["key_cosine"] < 1 and 0.99 < e["value_cosine"] < 1 for e in layers
    )
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["prefill logits"]["cosine"] >= 0.99 and report["top1_agreement"] >= 0.9
    assert 1e-4 < stages["prefill logits"]["max_abs"]  # INT8 really is in the path: not bit-equal to fp32


def test_perturbed_int8_weight_fails_validation(quantized, demo_checkpoint, tmp_path):
    """A real fault (one INT8 weight tensor scaled, every hash and the manifest digest kept consistent) fails."""
    folder = shutil.copytree(quantized("trt-10.3", "int8"), tmp_path / "broken")
    scale_initializer(folder, "model.layers.0.mlp.down_proj.weight.T.scale", 8.0)
    open_artifact(folder)  # consistent: only the numbers are wrong
    result, report = _validate(folder, demo_checkpoint, tmp_path)
    assert result.returncode == 1 and not report["passed"]


def test_manifest_cannot_relabel_quantization(quantized, tmp_path):
    folder = shutil.copytree(quantized("trt-10.3", "int8"), tmp_path / "relabelled")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["quantization"]["mode"] = "int8-weight-only"
    save_manifest(folder, manifest)  # digest resealed: the manifest alone looks fine
    with pytest.raises(ArtifactError, match="says quantization 'int8-weight-only', but the graphs are int8"):
        open_artifact(folder)


@pytest.mark.parametrize("target", ["trt-10.3", "trt-10.15"])
def test_int8_graphs_pass_check_trt_and_build_with_tensorrt_rtx(quantized, target, tmp_path):
    for mode in ("int8", "int8-weight-only"):
        folder = quantized(target, mode)
        paths = {g: folder / f"{g}.onnx" for g in GRAPHS}
        for each in TrtTarget:
            if int(onnx.load(paths["decoder_step"], load_external_data=False).opset_import[0].version) <= \
                    each.resolve_opset(None):  # fmt: skip
                assert check_graphs(paths, each).ok, (mode, each)
        result = build_engines(folder, tmp_path / f"eng-{mode}", BuildOptions(), verbose=False)
        manifest = json.loads((result.folder / "engines.json").read_text())
        assert manifest["quantization"] == mode
        assert all(e["layers"] > 300 for e in result.engines.values())
        assert sorted(result.engines) == ["decoder", "vision_encoder"]  # Q/DQ nodes merge with their layers
        # the bench's roofline counts a decode step's quantized weights from the engine folder's plan (it holds
        # no graphs): within 1% of the step graph's own count (the plan counts the weights both graphs share)
        contender = BackendContender(mode, TrtModel(open_engines(result.folder)), BenchSettings())
        assert contender.weight_bytes() == manifest["plan"]["decoder_weights"]
        assert contender.weight_bytes() == pytest.approx(graph_weight_bytes(paths["decoder_step"]), rel=0.01)
        assert not contender.backend.attends_to_valid_columns  # no DecodeAttention plugin: the whole buffer
    if target == "trt-10.3" and not torch.cuda.is_available():  # `bench --engines` gets as far as the GPU
        result = run_main("bench", "--engines", str(tmp_path / "eng-int8"), "--no-reference", "--iters", "1",
                          "--warmup", "0", "--new-tokens", "4")  # fmt: skip
        assert result.returncode == 2 and "TensorRT engines run on an NVIDIA GPU and this machine has none" in \
            result.stderr, result.stderr  # fmt: skip


def test_fp16_through_quantize_reexports(export_demo, demo_checkpoint, tmp_path):
    out = tmp_path / "fp16"
    result = run_main("quantize", str(export_demo("trt-10.3")), "--out", str(out), "--precision", "fp16",
                      "--model", str(demo_checkpoint), "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    artifact = open_artifact(out)
    assert artifact.precision.value == "fp16" and artifact.quantization is None and artifact.query_len == 16
    result = run_main("quantize", str(export_demo("trt-10.3")), "--out", str(tmp_path / "x"), "--precision", "fp16")
    assert result.returncode == 2 and "give --model DIR" in result.stderr


def _images(folder, n):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i % 255, 90, 160)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: d.mkdir(), "no images"),
        (
            lambda d: (_images(d, 2), (d / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")),
            "2.png: not a readable image",
        ),
        (lambda d: (_images(d, 3), (d / "questions.txt").write_bytes(b"\xff\xfe\x00q")), "questions.txt: not UTF-8"),
        (lambda d: (_images(d, 3), (d / "questions.txt").write_text("\n  \n")), "questions.txt: no questions"),
        (lambda d: _images(d, 2), "--num-samples 3: the calibration set 'calib' has only 2 images"),
    ],
    ids=["empty", "unreadable-image", "binary-questions", "blank-questions", "too-few"],
)
def test_bad_calibration_input_refused_before_work(export_demo, tmp_path, setup, message):
    calib = tmp_path / "calib"
    setup(calib)
    out = tmp_path / "q"
    result = run_main("quantize", str(export_demo("trt-10.3")), "--out", str(out), "--calib", str(calib),
                      "--num-samples", "3", "--quiet")  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


def test_quantize_refuses_bad_flags_and_sources(quantized, export_demo, tmp_path):
    art = str(export_demo("trt-10.3"))
    result = run_main("quantize", art, "--out", art)
    assert result.returncode == 2 and "--out" in result.stderr
    result = run_main("quantize", str(quantized("trt-10.3", "int8")), "--out", str(tmp_path / "qq"), "--weight-only")
    assert result.returncode == 2 and "starts from an fp32 or fp16 artifact that is not quantized" in result.stderr
    result = run_main("quantize", art, "--out", str(tmp_path / "p"), "--method", "percentile", "--percentile", "100")
    assert result.returncode == 2 and "--percentile 100.0" in result.stderr
    assert not (tmp_path / "qq").exists() and not (tmp_path / "p").exists()


def test_killed_quantize_leaves_nothing(export_demo, tmp_path):
    out = tmp_path / "q"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fusion_export_cli.cli",
            "quantize",
            str(export_demo("trt-10.3")),
            "--out",
            str(out),
            "--num-samples",
            "12",
            "--decode-steps",
            "8",
        ],  # fmt: skip
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q.*.partial/.calibration-*")):  # calibration under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == [], "a partial quantized artifact was left behind"


def test_smoothquant_artifact_within_int8_gates(export_demo, demo_checkpoint, tmp_path):
    out = tmp_path / "sq"
    result = run_main("quantize", str(export_demo("trt-10.3")), "--out", str(out), "--method", "smoothquant",
                      "--num-samples", "3", "--decode-steps", "4", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "smoothquant (alpha 0.5" in open_artifact(out).manifest["quantization"]["activations"]
    smooth = [{t.name for t in onnx.load(out / f"{g}.onnx", load_external_data=False).graph.initializer
               if t.name.endswith(".smooth")} for g in ("decoder_prefill", "decoder_step")]  # fmt: skip
    assert smooth[1] and smooth[1] <= smooth[0]  # one set of smoothing factors for both graphs
    result, report = _validate(out, demo_checkpoint, tmp_path)
    assert result.returncode == 0 and report["passed"], result.stdout


def test_entropy_threshold_clips_outliers_and_keeps_counts():
    from engines.quantization.entropy import Histogram

    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    x[-4:] = 60.0  # a handful of outliers: KL clips them, max calibration would not
    h = Histogram()
    h.add(x[:1000] * 0.1)  # a first call with a small range: later calls double it, merging bins
    h.add(x[1000:])
    assert h.counts.sum() == 200_000 and h.top >= 60
    assert 3.0 < h.threshold() < 8.0


def test_int8_kernels_follow_the_cpu(quantized, monkeypatch):
    """W8A8 on ONNX Runtime's CPU kernels: integer kernels where the CPU multiplies int8 without saturating (VNNI,
    AMX, ARM), float math on the dequantized values on x86 without (auto), either on request; a weight-only
    artifact always keeps its kernels (no u8s8 product)."""
    import engines.onnxruntime.session as ort_runtime
    from engines.onnxruntime.session import OrtModel, cpu_int8_dot
    from reference_model.errors import FusionError

    assert cpu_int8_dot("x86_64", {"avx2", "avx512_vnni"}) and cpu_int8_dot("x86_64", {"avx2", "avx_vnni"})
    assert not cpu_int8_dot("x86_64", {"avx2", "fma"}) and cpu_int8_dot("aarch64", set())
    w8a8, weight_only = (open_artifact(quantized("trt-10.3", mode)) for mode in ("int8", "int8-weight-only"))
    for has_dot in (True, False):
        monkeypatch.setattr(ort_runtime, "cpu_int8_dot", lambda has_dot=has_dot: has_dot)
        auto = OrtModel(w8a8)
        assert auto.int8_kernels == has_dot and ("as float math" in auto.describe()) == (not has_dot)
        assert OrtModel(w8a8, int8_kernels="on").int8_kernels and not OrtModel(w8a8, int8_kernels="off").int8_kernels
        assert OrtModel(weight_only).int8_kernels
    with pytest.raises(FusionError, match="--ort-int8-kernels 'fast'"):
        OrtModel(w8a8, int8_kernels="fast")
