"""Artifacts open only when complete and untouched; failed exports leave nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from fusion_export.export import ExportOptions, export_artifact
from fusion_export.manifest import ArtifactError, open_artifact

from .test_cli_golden import run_cli


@pytest.fixture
def artifact_copy(export_oracle, tmp_path):
    return shutil.copytree(export_oracle(16), tmp_path / "art")


def test_manifest_content(artifact_copy, oracle_model):
    d = oracle_model.config.decoder
    manifest = open_artifact(artifact_copy).manifest
    assert set(manifest["graphs"]) == {"vision_encoder", "decoder_prefill", "decoder_step"}
    step = manifest["graphs"]["decoder_step"]
    inputs = {i["name"]: i for i in step["inputs"]}
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", d.num_kv_heads, "capacity", d.head_dim]
    assert inputs["write_indices"] == {"name": "write_indices", "dtype": "INT64", "shape": ["batch"]}
    outputs = {o["name"]: o for o in step["outputs"]}
    last = f"present.{d.num_layers - 1}.value"
    assert outputs["logits"]["dtype"] == "FLOAT" and outputs[last]["shape"][2] == "capacity"
    vision = {i["name"]: i["shape"] for i in manifest["graphs"]["vision_encoder"]["inputs"]}
    assert vision["instruct_embeds"] == ["batch", "instruct_len", d.hidden_size]
    assert len(manifest["model"]["config_digest"]) == 64
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["tool_versions"])
    for rel, entry in manifest["files"].items():
        assert (artifact_copy / rel).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert "model/tokenizer.json" in manifest["files"] and "model/config.json" in manifest["files"]


def test_changed_bytes(artifact_copy):
    data = artifact_copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"decoder\.onnx\.data: sha256 differs"):
        open_artifact(artifact_copy)


def test_truncated_and_missing_files(artifact_copy):
    with open(artifact_copy / "vision_encoder.onnx.data", "r+b") as f:
        f.truncate(100)
    (artifact_copy / "decoder_step.onnx").unlink()
    with pytest.raises(ArtifactError) as err:
        open_artifact(artifact_copy)
    assert "vision_encoder.onnx.data: 100 bytes, manifest says" in str(err.value)
    assert "decoder_step.onnx: missing" in str(err.value)


def test_wrong_manifest_version(artifact_copy):
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        open_artifact(artifact_copy)
    path.unlink()
    with pytest.raises(ArtifactError, match="manifest.json: not found"):
        open_artifact(artifact_copy)


def test_cli_reports_tampering(artifact_copy, oracle_dir):
    (artifact_copy / "embed_tokens.safetensors").write_bytes(b"garbage")
    proc = run_cli("generate", "--artifacts", str(artifact_copy), "--image", "x.png", "--question", "q")
    assert proc.returncode == 2
    assert "embed_tokens.safetensors" in proc.stderr and "manifest says" in proc.stderr


def test_failed_export_leaves_nothing(oracle_dir, tmp_path, monkeypatch):
    import fusion_export.export as export_module

    def broken_trace(spec, opset):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(export_module, "trace", broken_trace)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="simulated"):
        export_artifact(oracle_dir, out, ExportOptions(query_len=16), verbose=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_existing_folder_and_bad_flags(oracle_dir, tmp_path):
    (tmp_path / "art").mkdir()
    proc = run_cli("export", "--model", str(oracle_dir), "--out", str(tmp_path / "art"))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli(
        "export", "--model", str(oracle_dir), "--out", str(tmp_path / "b"), "--trt-target", "trt-10.3", "--opset", "24"
    )
    assert proc.returncode == 2 and "--opset 24 is outside what trt-10.3 parses" in proc.stderr
    proc = run_cli("export", "--model", str(oracle_dir), "--out", str(tmp_path / "c"), "--query-len", "20")
    assert proc.returncode == 2 and "--query-len" in proc.stderr and "not a perfect square" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_unavailable_provider_is_a_clear_error(export_oracle, oracle_dir, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the fallback error cannot be provoked")
    folder = export_oracle(16)
    proc = run_cli(
        "validate", str(folder), "--model", str(oracle_dir), "--provider", "cuda", "--json", str(tmp_path / "v.json")
    )
    assert proc.returncode == 2 and "--provider cuda: ONNX Runtime here offers only" in proc.stderr
    proc = run_cli("generate", "--artifacts", str(folder), "--image", "x.png", "--question", "q", "--device", "cuda")
    assert proc.returncode == 2 and "--device does not apply to --backend onnxruntime" in proc.stderr
