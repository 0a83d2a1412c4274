"""Artifacts open only when complete and untouched; failed exports leave nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from fusion_export.export import ExportOptions, export_artifact
from fusion_export.manifest import ArtifactError, file_entries, manifest_digest, open_artifact, save_manifest

from .conftest import ORACLE_DIR, run_main, sha256
from .test_cli_golden import run_cli


def oracle_model_dir():
    return ORACLE_DIR.resolve().parent


def edit_manifest(folder, change, reseal: bool):
    """Edit manifest.json like a careless user (reseal=False) or a deliberate one who also recomputes every
    file hash and the manifest's own digest (reseal=True)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:
        manifest["files"] = file_entries(folder)
        save_manifest(folder, manifest)
    else:
        path.write_text(json.dumps(manifest, indent=2))


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
    assert manifest["model"]["name"] == "fusion-phi-tiny"  # the folder's name; no exporter path is recorded
    assert str(oracle_model_dir()) not in (artifact_copy / "manifest.json").read_text()
    assert manifest["export"]["precision"] == "fp32" and manifest["manifest_sha256"] == manifest_digest(manifest)
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

    def broken_trace(spec, opset, plugins=False):
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


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("precision", "fp16", "says precision 'fp16', query_len 16 and max_context None, but the graphs are fp32"),
        (
            "query_len",
            36,
            "says precision 'fp32', query_len 36 and max_context None, but the graphs are fp32 with query_len 16",
        ),
        ("max_context", 4096, "max_context 4096, but the graphs are fp32 with query_len 16 and max_context None"),
    ],
)
def test_edited_manifest_is_refused(artifact_copy, field, value, message):
    def change(manifest):
        manifest["export"][field] = value

    edit_manifest(artifact_copy, change, reseal=False)
    with pytest.raises(ArtifactError, match="edited after it was written"):
        open_artifact(artifact_copy)
    edit_manifest(artifact_copy, change, reseal=True)  # digest consistent: the graphs themselves decide
    with pytest.raises(ArtifactError, match=message):
        open_artifact(artifact_copy)
    proc = run_main("validate", str(artifact_copy), "--model", str(ORACLE_DIR))
    assert proc.returncode == 2 and message in proc.stderr


def test_edited_graph_io_is_refused(artifact_copy):
    def change(manifest):
        manifest["graphs"]["decoder_step"]["inputs"][0]["shape"][2] = 64

    edit_manifest(artifact_copy, change, reseal=True)
    with pytest.raises(ArtifactError, match="graph decoder_step's inputs/outputs differ from decoder_step.onnx's"):
        open_artifact(artifact_copy)


def perturb_weight(folder, name: str, delta: float) -> None:
    """Add `delta` to every element of an external weight in place (the hashes are resealed by the caller)."""
    import numpy as np
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    info = ExternalDataInfo(tensor)
    with open(folder / info.location, "r+b") as f:
        f.seek(info.offset)
        values = np.frombuffer(f.read(info.length), dtype=np.float32) + np.float32(delta)
        f.seek(info.offset)
        f.write(values.tobytes())


def test_validate_fails_a_perturbed_weight(artifact_copy, tmp_path):
    """A real negative: one decoder weight moved by +0.01, every hash and the manifest digest updated, so the
    artifact opens cleanly; only the numbers can tell, and validate must say FAILED (exit 1)."""
    perturb_weight(artifact_copy, "model.layers.3.mlp.down_proj.weight.T", 0.01)
    edit_manifest(artifact_copy, lambda m: None, reseal=True)
    open_artifact(artifact_copy)
    report = tmp_path / "report.json"
    proc = run_main(
        "validate", str(artifact_copy), "--model", str(ORACLE_DIR), "--inputs", str(ORACLE_DIR / "inputs.safetensors"),
        "--max-new-tokens", "3", "--json", str(report),
    )  # fmt: skip
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["image_tokens"]["passed"]  # the vision graph is untouched
    assert not stages["prefill logits"]["passed"] and stages["prefill logits"]["max_abs"] > 1e-3
    assert data["format"] == "fusion-export-validation-report" and not data["passed"]


def test_validate_never_writes_into_the_artifact(artifact_copy, tmp_path, monkeypatch):
    before = sha256(artifact_copy / "manifest.json")
    proc = run_main(
        "validate", str(artifact_copy), "--model", str(ORACLE_DIR), "--json", str(artifact_copy / "manifest.json")
    )
    assert proc.returncode == 2 and "is an artifact folder; outputs never go into one" in proc.stderr
    assert sha256(artifact_copy / "manifest.json") == before
    open_artifact(artifact_copy)

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    proc = run_main("validate", str(artifact_copy), "--model", str(ORACLE_DIR), "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(work.iterdir()) == []  # no report unless --json asks for one
