"""The engine folder's manifest (`engines.json`): what `fusion-export build` made, and the checks every reader
runs before it trusts an engine.

```text
ENG/
  engines.json                        TensorRT flavour and version, compute capabilities, per-engine profile,
                                      I/O, layers, build time; sha256 of every file, of the source graphs and of
                                      the artifact manifest; precision, weight quantization (`quantization`: the
                                      mode; `quantization_settings`: mode, block size, method) and KV cache
                                      dtype; the build limits and the memory plan (weights per engine as stored)
  vision_encoder.engine  decoder.engine  one decoder engine for prefill and decode (the decoder held once);
                                      `--plugins on` artifacts: decoder_prefill.engine, decoder_step.engine
  embed_tokens.safetensors, model/     copied from the artifact, so the folder runs on its own
```
Opening checks the manifest's own digest and every file's size and sha256, then the installed TensorRT against
the one that built the engines, then each plan's header (and, where the flavour has it, the runtime's own
validity query). Each refusal says how to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_export.file_names import ENGINE_MANIFEST, GRAPHS
from fusion_export.manifest import MODEL_SUBDIR, check_listing, check_named, read_sealed_manifest, verify_files
from reference_model.config import FusionConfig, load_config
from reference_model.errors import FusionError

FORMAT = "fusion-export-engines"
FORMAT_VERSION = 2  # 2: one decoder engine for prefill and decode (plan.decoder_engines 1), or the two of before
ENGINE_SUFFIX = ".engine"
# the engines of a folder, by how many engines hold the decoder (plan.decoder_engines)
ENGINE_SETS = {1: ("vision_encoder", "decoder"), 2: GRAPHS}


def engine_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The engines a folder's manifest must list: its plan says whether one engine or two hold the decoder."""
    plan = manifest.get("plan")
    return ENGINE_SETS.get(plan.get("decoder_engines") if isinstance(plan, dict) else None, ENGINE_SETS[1])


class EngineError(FusionError):
    """An engine folder that is incomplete, changed, or built for another TensorRT, GPU or export."""


@dataclass
class EngineFolder:
    """An opened, verified engine folder."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_SUBDIR

    @property
    def config(self) -> FusionConfig:
        return load_config(self.model_dir)

    @property
    def engine_names(self) -> tuple[str, ...]:
        return engine_names(self.manifest)

    @property
    def limits(self) -> dict[str, int]:
        return self.manifest["plan"]["limits"]

    def engine_path(self, name: str) -> Path:
        return self.folder / self.manifest["engines"][name]["file"]

    def rebuild_hint(self) -> str:
        source = self.manifest["source"]["artifact"]
        return f"rebuild: fusion-export build {source} --out NEW_FOLDER (on the target, with its TensorRT)"


def open_engines(folder: str | Path, verify_hashes: bool = True) -> EngineFolder:
    """The folder's manifest and files, checked; TensorRT itself is checked by `check_runtime`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError(f"{folder}: engine folder not found")
    manifest = read_sealed_manifest(folder / ENGINE_MANIFEST, FORMAT, FORMAT_VERSION, EngineError)
    path = folder / ENGINE_MANIFEST
    missing = [k for k in ("tensorrt", "source", "engines", "plan", "files", "embeddings") if k not in manifest]
    engines = manifest.get("engines") if isinstance(manifest.get("engines"), dict) else {}
    missing += [f"engines.{g}" for g in engine_names(manifest) if not isinstance(engines.get(g), dict)]
    if not isinstance(manifest.get("embeddings"), dict):
        missing.append("embeddings.file")
    if missing:
        raise EngineError(f"{path}: malformed manifest, missing {', '.join(missing)}")
    check_listing(folder, manifest["files"], ENGINE_MANIFEST, EngineError)
    named = {f"engines.{g}.file": manifest["engines"][g].get("file") for g in engine_names(manifest)}
    check_named(path, manifest["files"], {**named, "embeddings.file": manifest["embeddings"].get("file")}, EngineError)
    problems = verify_files(folder, manifest["files"], verify_hashes)
    if problems:
        raise EngineError(f"{folder}: engine folder does not match its manifest:\n  " + "\n  ".join(problems))
    return EngineFolder(folder=folder, manifest=manifest)


def check_runtime(engines: EngineFolder, trt) -> None:
    """The installed TensorRT (an `engines.tensorrt.flavours.Trt`) must be the flavour and version that built the
    engines, and each plan's header must read as that flavour's: a TensorRT plan only loads in the exact version
    that wrote it."""
    built = engines.manifest["tensorrt"]
    hint = engines.rebuild_hint()
    if built["flavour"] != trt.flavour.value or built["version"] != trt.version:
        raise EngineError(
            f"{engines.folder}: built with {built['flavour']} {built['version']}, this machine has "
            f"{trt.describe()}; TensorRT engines load only in the version that built them; {hint}"
        )
    for name in engines.engine_names:
        path = engines.engine_path(name)
        header = trt.check_plan(path)
        wanted = built.get("compute_capabilities") or []
        got = header.get("compute_capabilities")
        if got is not None and wanted and sorted(got) != sorted(wanted):
            raise EngineError(f"{path}: built for {got}, the manifest says {wanted}; {hint}")


def check_built_from(engines: EngineFolder, artifact) -> None:
    """Engines built from another export (or from graphs changed since) are refused: the graphs' sha256 recorded
    at build time must match the artifact's."""
    recorded = engines.manifest["source"]["graphs"]
    built_into = {source: g["name"] for g in engines.manifest["plan"]["graphs"] for source in g.get("sources", [])}
    for name in GRAPHS:
        onnx = artifact.manifest["graphs"][name]["file"]
        now = artifact.manifest["files"][onnx]["sha256"]
        if recorded.get(name) != now:
            raise EngineError(
                f"{engines.engine_path(built_into.get(name, name))}: built from a different {onnx} than "
                f"{artifact.folder}'s; {engines.rebuild_hint()}"
            )
