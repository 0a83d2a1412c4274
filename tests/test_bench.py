"""`fusion-export bench` runs (the demo model: the tiny preset's decoder with a 4-layer tower; 2 rounds, so the
figures mean nothing) and writes a valid report and plot; `bench compare` reads them back. Benchmarks are not
timed tests: nothing here asserts a speed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from .conftest import run_main


def test_bench_writes_report_and_plot(demo_checkpoint, export_demo, tmp_path):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", str(demo_checkpoint), "--artifacts", str(export_demo("trt-10.3")),
            "--peers", "transformers", "--iters", "2", "--warmup", "0", "--new-tokens", "4", "--prompt-len", "860",
            "--query-len", "16", "--sweep", "840,900", "--out", str(report), "--plot", str(plot),
            "--quiet"]  # fmt: skip
    result = run_main(*args)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["format"] == "fusion-export-bench" and data["bandwidth_bytes_per_s"] > 1e8
    labels = [r["label"] for r in data["results"]]
    assert labels[0].startswith("reference") and labels[1].startswith("onnxruntime trt-10.3 fp32")
    assert labels[2] == "transformers Phi-3 sdpa fp32"
    for r in data["results"]:
        assert r["decode_step_s"]["n"] == 2 * 3  # 2 rounds x 3 steps after the prefill's token
        assert r["stages_s"]["ttft"]["median"] > 0 and 0 < r["roofline_fraction"]
    ours = data["results"][1]["stages_s"]
    assert ours["vision_encoder"]["median"] > 0 and ours["decoder_prefill"]["median"] > 0
    assert set(data["sweep"]) == set(labels) and set(data["sweep"][labels[0]]) == {"840", "900"}
    assert "tok/s" in result.stdout and "roofline:" in result.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.text.get("Software") == "fusion-export bench"

    result = run_main("bench", "compare", str(report), str(report))
    assert result.returncode == 0 and result.stdout.count("bench.json") == 6 and "1.00x" in result.stdout
    result = run_main("bench", "compare", str(plot))
    assert result.returncode == 2 and "not a readable benchmark report" in result.stderr
    result = run_main("bench", "--model", str(demo_checkpoint), "--out", str(demo_checkpoint / "x.json"))
    assert result.returncode == 2 and "is a checkpoint folder" in result.stderr


def test_bench_refuses_missing_optional_modules_before_work(demo_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in {"matplotlib",
                        "onnxruntime_genai"} else real(name, *a))  # fmt: skip
    result = run_main("bench", "--model", str(demo_checkpoint), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 2 and "--plot needs the Python module 'matplotlib'" in result.stderr
    result = run_main("bench", "--model", str(demo_checkpoint), "--peers", "genai-int4")
    assert result.returncode == 2 and "'onnxruntime_genai'" in result.stderr and "fusion-export[bench]" in result.stderr
    assert not (tmp_path / "b.png").exists()


def test_ort_profile_breaks_down_every_graph(export_demo, tmp_path, capsys):
    """The profiling tool behind the README's op-type figures: ONNX Runtime's own profiler over real requests."""
    from benchmarks.ort_profile import main
    from fusion_export.manifest import open_artifact

    folder, out = export_demo("trt-10.3"), tmp_path / "ops.json"
    main([str(folder), "--requests", "2", "--new-tokens", "3", "--prompt-len", "860", "--out", str(out)])
    data = json.loads(out.read_text())
    layers = open_artifact(folder).config.decoder.num_layers
    vision, prefill, step = data["vision_encoder"], data["decoder_prefill"], data["decoder_step"]
    assert vision["runs"] == prefill["runs"] == 1 and step["runs"] == 2  # the last request's; its steps
    assert vision["ops"]["MultiHeadAttention"]["count"] > 0 and "Softmax" not in vision["ops"]  # the tower fused
    assert step["ops"]["GroupQueryAttention"]["count"] == layers and step["kernel_ms_per_run"] > 0
    assert "GroupQueryAttention" not in prefill["ops"] and prefill["kernel_ms_per_run"] > 0  # causal query blocks
    assert not {"Range", "Pad", "Where"} & set(step["ops"])  # lengths, bias and RoPE rows come from the host
    assert "decoder_step:" in capsys.readouterr().out


def test_decode_attention_kernels_agree_before_timing():
    """The CPU attention-kernel comparison checks that ONNX Runtime's two forms compute PyTorch's attention over
    the same buffers, on the first and last of the copies it cycles through, before it times them (tiny preset
    shapes, a short context)."""
    from benchmarks.decode_attention_kernels import NATIVE, measure, native_kernel

    result = measure("tiny", context=37, threads=1, iters=2, stream_bytes=600_000)
    native = {NATIVE} if native_kernel(1) is not None else set()  # compiled where a C compiler is found
    onnxruntime = {"onnxruntime GroupQueryAttention", "onnxruntime MatMul form"}
    assert set(result) == onnxruntime | {"torch scaled_dot_product_attention"} | native
    assert all(r["ms"] > 0 and r["kv_mb"] > 0 and r["copies"] >= 2 for r in result.values())


def test_decode_attention_kernels_refuse_a_kernel_that_disagrees(monkeypatch):
    """A GroupQueryAttention built with twice the softmax scale is caught before any timing."""
    import benchmarks.decode_attention_kernels as kernels

    built = kernels._gqa_model

    def wrong_scale(*args):
        model = built(*args)
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "scale":
                    attribute.f *= 2
        return model

    monkeypatch.setattr(kernels, "_gqa_model", wrong_scale)
    with pytest.raises(AssertionError, match="GroupQueryAttention differs from PyTorch"):
        kernels.measure("tiny", context=37, threads=1, iters=2, stream_bytes=0)


def test_decode_attention_kernels_check_the_c_kernel(monkeypatch, tmp_path):
    """The C kernel is held to PyTorch's attention like the others: a copy that halves its output is refused."""
    import benchmarks.decode_attention_kernels as kernels

    if kernels.native_kernel(1) is None:
        pytest.skip("no C compiler with OpenMP here")
    source = kernels._NATIVE_SOURCE.read_text()
    assert "o[i] /= sum;" in source
    halved = tmp_path / "decode_attention.c"
    halved.write_text(source.replace("o[i] /= sum;", "o[i] /= 2.0f * sum;"))
    monkeypatch.setattr(kernels, "_NATIVE_SOURCE", halved)
    with pytest.raises(AssertionError, match="C streaming kernel .* differs from PyTorch"):
        kernels.measure("tiny", context=37, threads=1, iters=2, stream_bytes=0)
