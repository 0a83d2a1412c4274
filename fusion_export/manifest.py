"""The artifact manifest (`manifest.json`): the one record every later stage reads.

It names the graphs with their files, inputs and outputs (dtypes, symbolic dims), the export settings
(query_len, dtype, opset, TensorRT target, KV-cache layout), a digest of the model config, the sha256 and size
of every file, tool versions and the export date. Opening an artifact checks all of it, so a partial, stale or
tampered artifact is never mistaken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from reference_model.config import FusionConfig, config_from_dicts
from reference_model.errors import FusionError

MANIFEST = "manifest.json"
FORMAT = "fusion-export-onnx-artifact"
FORMAT_VERSION = 1
MODEL_SUBDIR = "model"  # config.json, vision_config.json and tokenizer files copied from the checkpoint
GRAPHS = ("vision_encoder", "decoder_prefill", "decoder_step")
# what every reader relies on: section -> keys
REQUIRED = {
    "model": ("config_digest",),
    "export": ("query_len", "dtype", "opset", "trt_target"),
    "embeddings": ("file", "tensor"),
    "graphs": GRAPHS,
    "files": (),
}


class ArtifactError(FusionError):
    """An artifact folder is missing, incomplete, tampered with or of another format version."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_digest(config: FusionConfig) -> str:
    canonical = json.dumps(config.digest_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("fusion-export", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


_ONNX_DTYPES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a saved graph: name, ONNX dtype name and dims (ints or symbolic names)."""
    model = onnx.load(path, load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_DTYPES[t.elem_type], "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def write_manifest(folder: Path, content: dict[str, Any], data_hashes: dict[str, str]) -> dict[str, Any]:
    """Complete `content` with file hashes and sizes (data files hashed while written) and save it."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": data_hashes.get(rel) or sha256_file(path)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        **content,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class Artifact:
    """An opened, verified artifact folder."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def config(self) -> FusionConfig:
        model_dir = self.folder / MODEL_SUBDIR
        vision = model_dir / "vision_config.json"
        return config_from_dicts(
            json.loads((model_dir / "config.json").read_text()),
            json.loads(vision.read_text()) if vision.exists() else None,
            source=str(model_dir / "config.json"),
        )

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_SUBDIR

    @property
    def query_len(self) -> int:
        return int(self.manifest["export"]["query_len"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["export"]["dtype"])

    def graph_path(self, name: str) -> Path:
        try:
            return self.folder / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise ArtifactError(f"{self.folder / MANIFEST}: no graph '{name}'") from None


def open_artifact(folder: str | Path, verify_hashes: bool = True) -> Artifact:
    """Read manifest.json and check format, version, presence, size and (by default) sha256 of every file."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found")
    if not path.exists():
        raise ArtifactError(f"{path}: not found (not an exported artifact, or an export that did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported by this fusion-export "
            f"(reads version {FORMAT_VERSION}); re-export the model"
        )
    missing = [f"{section}.{key}" for section, keys in REQUIRED.items() for key in keys
               if not isinstance(manifest.get(section), dict) or key not in manifest[section]]  # fmt: skip
    if missing:
        raise ArtifactError(f"{path}: malformed manifest, missing {', '.join(missing)}")
    if not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e) for e in manifest["files"].values()):
        raise ArtifactError(f"{path}: malformed manifest, every 'files' entry needs 'bytes' and 'sha256'")
    problems = []
    for rel, entry in manifest.get("files", {}).items():
        file = folder / rel
        if not file.exists():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify_hashes and sha256_file(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed after export)")
    for name, graph in manifest.get("graphs", {}).items():
        if graph.get("file") not in manifest.get("files", {}):
            problems.append(f"graph {name}: file {graph.get('file')!r} is not listed in the manifest")
    if problems:
        raise ArtifactError(f"{folder}: artifact does not match its manifest:\n  " + "\n  ".join(problems))
    return Artifact(folder=folder, manifest=manifest)
