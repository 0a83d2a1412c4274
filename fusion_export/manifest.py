"""The artifact manifest (`manifest.json`): the one record every later stage reads.

It names the graphs with their files, inputs and outputs (dtypes, symbolic dims), the export settings
(query_len, precision, opset, TensorRT target, KV-cache layout), the source checkpoint's folder name and config
digest, the sha256 and size of every file, tool versions and the export date, and ends with a sha256 of its own
canonical content. Opening an artifact checks all of it: the files against their hashes, the manifest against
its digest, and the graphs' own inputs and outputs against the manifest, from which precision and query_len are
then read. A partial, stale, edited or tampered artifact is never mistaken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from reference_model.config import FusionConfig, load_config
from reference_model.errors import FusionError
from reference_model.input_files import read_json

from .containment import check_folder_contents, check_relative_name, contained_path
from .file_names import GRAPHS, MANIFEST
from .precision import Precision

FORMAT = "fusion-export-onnx-artifact"
FORMAT_VERSION = 2  # 2: manifest digest, precision and query_len checked against the graphs
MODEL_SUBDIR = "model"  # config.json, vision_config.json and tokenizer files copied from the checkpoint
KV_SCALE_SUFFIX = ".kv_scale"  # an INT8 KV cache's scale initializers: past_key_values.{i}.key.kv_scale, ...
# what every reader relies on: section -> keys
REQUIRED = {
    "model": ("config_digest",),
    "export": ("query_len", "precision", "opset", "trt_target"),
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


def graph_io(path: Path | onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a saved (or loaded) graph: name, ONNX dtype name and dims (ints or symbolic names)."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(path, load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_DTYPES[t.elem_type], "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    content = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_entries(
    folder: Path, data_hashes: dict[str, str] | None = None, manifest_name: str = MANIFEST
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in the folder but the manifest (hashes already known are reused)."""
    data_hashes = data_hashes or {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != manifest_name):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": data_hashes.get(rel) or sha256_file(path)}
    return files


def save_manifest(folder: Path, manifest: dict[str, Any], name: str = MANIFEST) -> dict[str, Any]:
    """Seal the manifest with its digest (last key) and write it."""
    manifest = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    (folder / name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_sealed_manifest(path: Path, fmt: str, version: int, error: type[FusionError]) -> dict[str, Any]:
    """A manifest file, checked for format, version and its own digest (an edited manifest is refused)."""
    if not path.exists():
        raise error(f"{path}: not found (not a finished {fmt} folder)")
    manifest = read_json(path, expect=None, error=error)  # bounded in size and depth: read before it is trusted
    if not isinstance(manifest, dict):
        raise error(f"{path}: not a manifest (expected a JSON object)")
    if manifest.get("format") != fmt:
        raise error(f"{path}: format is {manifest.get('format')!r}, expected {fmt!r}")
    if manifest.get("format_version") != version:
        raise error(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported by this fusion-export "
            f"(reads version {version}); rebuild it"
        )
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        raise error(f"{path}: edited after it was written (its {DIGEST_KEY} does not match its content)")
    return manifest


def check_listing(folder: Path, files: Any, manifest_name: str, error: type[FusionError]) -> None:
    """The containment rule (containment.py) for a sealed folder: the `files` table's names stay inside it and
    the folder holds nothing else. Checked before any listed file is opened or hashed."""
    where = f"{folder / manifest_name}: files"
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise error(f"{where}: malformed; every entry needs 'bytes' (an integer) and 'sha256' (a string)")
    for rel in files:
        contained_path(folder, rel, where)
    check_folder_contents(folder, files, manifest_name, str(folder))


def check_named(manifest_path: Path, files: dict[str, Any], named: dict[str, Any], error: type[FusionError]) -> None:
    """Every file the manifest names in another field (a graph, its weights, the embeddings) is one it lists,
    so it passed the containment rule with the others."""
    for field, name in named.items():
        check_relative_name(name, f"{manifest_path}: {field}")
        if name not in files:
            raise error(f"{manifest_path}: {field} {name!r} is not a file listed in 'files'")


def _sparse(tensors) -> Iterator[onnx.TensorProto]:
    for sparse in tensors:
        yield from (sparse.values, sparse.indices)


def _attribute_tensors(attributes) -> Iterator[onnx.TensorProto]:
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield from _sparse([attribute.sparse_tensor])
        yield from _sparse(attribute.sparse_tensors)
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _sparse(graph.sparse_initializer)
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The `location` of every tensor the graph keeps outside its file: initializers (sparse ones' values and
    indices), constants and subgraphs, and local functions' nodes and attribute defaults."""
    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        tensors += _attribute_tensors(function.attribute_proto)
        tensors += [t for node in function.node for t in _attribute_tensors(node.attribute)]
    return {
        next((entry.value for entry in t.external_data if entry.key == "location"), "")
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def check_external_data(folder: Path, graph_file: str, model: onnx.ModelProto, files: dict[str, Any]) -> None:
    """A graph's external weights are files its folder's manifest lists (ONNX resolves them beside the graph):
    a graph cannot read weights from another artifact or anywhere else on the disk."""
    base = PurePosixPath(graph_file).parent
    where = f"{folder / graph_file}: external data"
    for location in sorted(external_data_files(model)):
        rel = (base / check_relative_name(location, where)).as_posix()
        if rel not in files:
            raise ArtifactError(f"{where} {location!r} is not a file listed in {folder / MANIFEST}")


def verify_files(folder: Path, files: dict[str, Any], verify_hashes: bool = True) -> list[str]:
    """Problems with the files a manifest lists (their names already contained by `check_listing`): missing,
    resized, or (by default) changed content."""
    problems = []
    for rel, entry in files.items():
        file = folder / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify_hashes and sha256_file(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed after it was written)")
    return problems


def write_manifest(folder: Path, content: dict[str, Any], data_hashes: dict[str, str]) -> dict[str, Any]:
    """Complete `content` with file hashes and sizes (data files hashed while written) and save it."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        **content,
        "files": file_entries(folder, data_hashes),
    }
    return save_manifest(folder, manifest)


@dataclass
class Artifact:
    """An opened, verified artifact folder. `precision` and `query_len` are read from the graphs."""

    folder: Path
    manifest: dict[str, Any]
    precision: Precision
    query_len: int
    max_context: int | None  # the decoder graphs' fixed KV capacity, or None when it is sized per request
    # "int8" (W8A8), "int8-weight-only" or "int4-weight-only", read from the graphs' Q/DQ nodes
    quantization: str | None = None
    # an INT8 KV cache's per-layer (key, value) scales (the manifest's `kv_cache` record; the graphs' cache inputs
    # are INT8 exactly when it is there), or None for a cache in the model's dtype
    kv_int8_scales: list[tuple[float, float]] | None = None

    @property
    def config(self) -> FusionConfig:
        return load_config(self.model_dir)

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_SUBDIR

    @property
    def model_files(self) -> list[str]:
        """The listed files of `model/` (config, tokenizer), as the manifest names them."""
        return sorted(name for name in self.manifest["files"] if name.startswith(f"{MODEL_SUBDIR}/"))

    def graph_path(self, name: str) -> Path:
        try:
            return self.folder / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise ArtifactError(f"{self.folder / MANIFEST}: no graph '{name}'") from None


def _io_entry(io: dict[str, list[dict[str, Any]]], kind: str, name: str, where: str) -> dict[str, Any]:
    for entry in io[kind]:
        if entry["name"] == name:
            return entry
    raise ArtifactError(f"{where}: the graph has no {kind[:-1]} '{name}'")


def _quantization_of(paths: list[Path]) -> str | None:
    """What the graphs' Q/DQ nodes make them: None, "int4-weight-only" (a DQ of an INT4 weight; other layers may
    be INT8 or float), "int8-weight-only" (DQ only) or "int8" (Q and DQ). An INT8 KV cache's own Q/DQ (their
    scales named `<cache input>` + KV_SCALE_SUFFIX) do not count: it is recorded apart."""
    ops, int4 = set(), False
    for path in paths:
        graph = onnx.load(path, load_external_data=False).graph
        int4_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT4}
        for n in graph.node:
            if not (len(n.input) > 1 and n.input[1].endswith(KV_SCALE_SUFFIX)):
                ops.add(n.op_type)
                int4 |= n.op_type == "DequantizeLinear" and n.input[0] in int4_weights
    if "QuantizeLinear" in ops:
        return "int8"
    if int4:
        return "int4-weight-only"
    return "int8-weight-only" if "DequantizeLinear" in ops else None


def _read_graph_facts(folder: Path, manifest: dict[str, Any]) -> tuple[Precision, int, int | None, str | None]:
    """Compare every graph's real inputs/outputs with the manifest, then read precision, query_len and the KV
    capacity (a number when fixed at export) from them."""
    ios = {}
    for name in GRAPHS:
        path = folder / manifest["graphs"][name]["file"]
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:  # protobuf raises assorted types for a file that is not a graph
            raise ArtifactError(f"{path}: not a readable ONNX graph ({type(e).__name__}: {e})") from None
        check_external_data(folder, manifest["graphs"][name]["file"], model, manifest["files"])
        ios[name] = graph_io(model)
        del model
        recorded = {k: manifest["graphs"][name].get(k) for k in ("inputs", "outputs")}
        if recorded != ios[name]:
            raise ArtifactError(f"{folder / MANIFEST}: graph {name}'s inputs/outputs differ from {path.name}'s")
    embeds = {
        name: _io_entry(ios[name], "inputs", io_name, str(folder / f"{name}.onnx"))["dtype"]
        for name, io_name in (
            ("vision_encoder", "instruct_embeds"),
            ("decoder_prefill", "inputs_embeds"),
            ("decoder_step", "inputs_embeds"),
        )
    }
    if len(set(embeds.values())) != 1:
        raise ArtifactError(f"{folder}: the graphs disagree on their activation type: {embeds}")
    precision = Precision.from_onnx_dtype(embeds["vision_encoder"], str(folder / "vision_encoder.onnx"))
    latents = _io_entry(ios["vision_encoder"], "outputs", "init_latents", str(folder / "vision_encoder.onnx"))
    vision_pos = _io_entry(ios["decoder_prefill"], "inputs", "vision_pos", str(folder / "decoder_prefill.onnx"))
    query_len = latents["shape"][1]
    if not isinstance(query_len, int) or vision_pos["shape"][1] != query_len:
        raise ArtifactError(f"{folder}: the graphs disagree on query_len ({query_len}, {vision_pos['shape'][1]})")
    capacities = {
        _io_entry(ios[name], "inputs", "past_key_values.0.key", str(folder / f"{name}.onnx"))["shape"][2]
        for name in ("decoder_prefill", "decoder_step")
    }
    capacity = capacities.pop() if len(capacities) == 1 else None
    if capacities or not (capacity == "capacity" or isinstance(capacity, int)):
        raise ArtifactError(f"{folder}: the decoder graphs disagree on their KV capacity")
    capacity = capacity if isinstance(capacity, int) else None
    export = manifest["export"]
    recorded = (export["precision"], export["query_len"], export.get("max_context"))
    if recorded != (precision.value, query_len, capacity):
        raise ArtifactError(
            f"{folder / MANIFEST}: says precision {recorded[0]!r}, query_len {recorded[1]!r} and max_context "
            f"{recorded[2]!r}, but the graphs are {precision.value} with query_len {query_len} and max_context "
            f"{capacity!r}"
        )
    quantization = _quantization_of([folder / manifest["graphs"][name]["file"] for name in GRAPHS])
    record = manifest.get("quantization")
    recorded_mode = record.get("mode") if isinstance(record, dict) else None
    if recorded_mode != quantization:
        raise ArtifactError(
            f"{folder / MANIFEST}: says quantization {recorded_mode!r}, "
            f"but the graphs are {quantization or 'unquantized'}"
        )
    return precision, query_len, capacity, quantization


def _kv_cache_of(folder: Path, manifest: dict[str, Any]) -> list[tuple[float, float]] | None:
    """The INT8 KV cache's scales from the manifest's `kv_cache` record, checked against the decoder graphs' cache
    inputs: INT8 with a record, the model's dtype without one."""
    record = manifest.get("kv_cache")
    caches = {
        (name, entry["name"]): entry["dtype"]
        for name in ("decoder_prefill", "decoder_step")
        for entry in manifest["graphs"][name]["inputs"]
        if entry["name"].startswith("past_key_values.")
    }
    int8 = {dtype == "INT8" for dtype in caches.values()}
    where = folder / MANIFEST
    if len(int8) != 1:
        raise ArtifactError(f"{where}: some KV cache inputs are INT8 and some are not")
    if record is None:
        if int8 == {True}:
            raise ArtifactError(f"{where}: the graphs' KV cache is INT8 but the manifest has no kv_cache record")
        return None
    scales = record.get("scales") if isinstance(record, dict) else None
    layers = len(caches) // 4
    if (
        int8 != {True}
        or record.get("dtype") != "int8"
        or not isinstance(scales, list)
        or len(scales) != layers
        or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, float) and s > 0 for s in pair)
            for pair in scales
        )
    ):
        raise ArtifactError(
            f"{where}: kv_cache must be {{'dtype': 'int8', 'scales': {layers} [key, value] positive floats}} "
            f"over INT8 cache inputs (found {record!r:.200} over {sorted(caches.values())[0]} inputs)"
        )
    return [(k, v) for k, v in scales]


def named_files(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Every file an artifact manifest names outside its `files` table, by field."""
    named = {"embeddings.file": manifest["embeddings"]["file"]}
    for name, graph in manifest["graphs"].items():
        if not isinstance(graph, dict):
            raise ArtifactError(f"{path}: graphs.{name} is not an object")
        named[f"graphs.{name}.file"] = graph.get("file")
        if "weights" in graph:
            named[f"graphs.{name}.weights"] = graph["weights"]
    report = manifest.get("trt_compat", {}).get("report") if isinstance(manifest.get("trt_compat"), dict) else None
    if report is not None:
        named["trt_compat.report"] = report
    return named


def open_artifact(folder: str | Path, verify_hashes: bool = True) -> Artifact:
    """Read manifest.json and check format, version, digest, presence, size and (by default) sha256 of every
    file, and the graphs' inputs and outputs against it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found")
    path = folder / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path}: not found (not an exported artifact, or an export that did not finish)")
    manifest = read_sealed_manifest(path, FORMAT, FORMAT_VERSION, ArtifactError)
    missing = [f"{section}.{key}" for section, keys in REQUIRED.items() for key in keys
               if not isinstance(manifest.get(section), dict) or key not in manifest[section]]  # fmt: skip
    if missing:
        raise ArtifactError(f"{path}: malformed manifest, missing {', '.join(missing)}")
    check_listing(folder, manifest["files"], MANIFEST, ArtifactError)
    check_named(path, manifest["files"], named_files(manifest, path), ArtifactError)
    problems = verify_files(folder, manifest["files"], verify_hashes)
    if problems:
        raise ArtifactError(f"{folder}: artifact does not match its manifest:\n  " + "\n  ".join(problems))
    precision, query_len, max_context, quantization = _read_graph_facts(folder, manifest)
    return Artifact(folder=folder, manifest=manifest, precision=precision, query_len=query_len,
                    max_context=max_context, quantization=quantization,
                    kv_int8_scales=_kv_cache_of(folder, manifest))  # fmt: skip
