"""`fusion-export build`: an artifact folder -> an engine folder, one TensorRT engine per graph.

Every network is strongly typed (precision comes from the ONNX). Per graph: parse, mark the attention layers
decomposable (so fp32 attention, which has no dedicated kernel for multi-token queries, falls back to MatMul and
Softmax instead of failing the build), one optimization profile from `build_plan`, compute-capability targets
(TensorRT-RTX), the builder optimization level, a timing cache reused across builds (TensorRT 10/11; TensorRT-RTX
has none), TensorRT's progress monitor on the terminal. The folder is built under a temporary name and appears
only when every engine and the manifest are written.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_export.export import EMBEDDINGS_FILE
from fusion_export.manifest import MODEL_SUBDIR, file_entries, open_artifact, save_manifest, tool_versions
from fusion_export.output_files import write_atomically
from fusion_export.progress import Progress
from reference_model.checkpoint import staging_folder
from reference_model.errors import FusionError

from .build_plan import BuildLimits, BuildPlan, DeviceMemory, GraphPlan, plan_build
from .engine_manifest import ENGINE_MANIFEST, ENGINE_SUFFIX, FORMAT, FORMAT_VERSION
from .plugins.tensorrt_plugins import LOCAL_FUNCTION, register_plugins
from .trt_api import Trt, TrtFlavour, load_trt


class EngineBuildError(FusionError):
    """TensorRT refused a graph (parser or builder); its own messages are quoted."""


@dataclass(frozen=True)
class BuildOptions:
    limits: BuildLimits = field(default_factory=BuildLimits)
    device_memory: DeviceMemory | None = None  # refuse plans that do not fit, and report the largest context
    flavour: TrtFlavour | None = None  # None: whichever is installed (enterprise TensorRT first)
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("SM86", "SM89"); (): its defaults
    optimization_level: int = 3  # TensorRT's builder optimization level, 0..5
    timing_cache: Path | None = None  # TensorRT 10/11; None: default_timing_cache()
    workspace_gb: float | None = None  # builder workspace limit; None: TensorRT's default


@dataclass
class BuildResult:
    folder: Path
    plan: BuildPlan
    engines: dict[str, dict[str, Any]]
    trt: str


def default_timing_cache(trt: Trt) -> Path:
    """One timing cache per TensorRT version, shared by every build on this machine."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusion-export"
    return root / f"timing-{trt.flavour}-{trt.version}.cache"


def _progress_monitor(trt: Trt, progress: Progress, name: str):
    """TensorRT's progress callbacks, shown as the current phase and step on a terminal."""
    base = trt.module.IProgressMonitor

    class Monitor(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.phases: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            self.phases[phase_name] = num_steps

        def step_complete(self, phase_name, step) -> bool:
            progress.detail(f"{name}: {phase_name} {step + 1}/{self.phases.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            self.phases.pop(phase_name, None)

    return Monitor()


def _io(network) -> dict[str, list[dict[str, Any]]]:
    def describe(tensors) -> list[dict[str, Any]]:
        return [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in tensors]

    return {
        "inputs": describe(network.get_input(i) for i in range(network.num_inputs)),
        "outputs": describe(network.get_output(i) for i in range(network.num_outputs)),
    }


def build_graph(
    trt: Trt,
    onnx_path: Path,
    graph: GraphPlan,
    options: BuildOptions,
    progress: Progress,
    timing_cache: bytes | None,
    engine_path: Path,
    plugins: bool = False,
) -> tuple[dict[str, Any], bytes | None]:
    """Parse and build one graph into `engine_path`: (what to record, the updated timing cache or None).
    `plugins`: our plugins are registered with this TensorRT (plugins/tensorrt_plugins.py)."""
    module, logger = trt.module, trt.logger()
    builder, network, errors = trt.parse(onnx_path, plugins=plugins)
    if errors:
        rejected = f"{onnx_path}: TensorRT's parser ({trt.describe()}) rejected it:\n  "
        raise EngineBuildError(rejected + "\n  ".join(errors))
    attention = trt.attention_layers(network)
    for layer in attention:
        layer.decomposable = True

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gb:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.compute_capabilities:
        trt.set_compute_capabilities(config, list(options.compute_capabilities))
    monitor = None
    if trt.has_progress_monitor:
        monitor = _progress_monitor(trt, progress, graph.name)
        config.progress_monitor = monitor  # kept alive by `monitor` until the build returns
    cache = None
    if trt.has_timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, shapes in graph.profile.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"{onnx_path}: TensorRT refused the optimization profile {graph.profile}")

    started = time.perf_counter()
    built = trt.write_plan(builder, network, config, engine_path)
    seconds = time.perf_counter() - started
    if not built:
        messages = "\n  ".join(logger.errors()[-8:]) or "(no message)"
        raise EngineBuildError(f"{onnx_path}: {trt.describe()} failed to build the engine:\n  {messages}")
    info = {
        "layers": network.num_layers,
        "attention_layers_decomposable": len(attention),
        "build_s": round(seconds, 2),
        "io": _io(network),
        "profile": graph.profile,
    }
    updated = bytes(memoryview(config.get_timing_cache().serialize())) if cache is not None else None
    del monitor, network, builder  # the parsed weights go before the next graph is parsed
    return info, updated


def build_engines(
    artifact_dir: str | Path, out_dir: str | Path, options: BuildOptions, verbose: bool = True
) -> BuildResult:
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    artifact = open_artifact(artifact_dir)
    plan = plan_build(artifact, options.limits, options.device_memory)
    trt = load_trt(options.flavour)
    if options.compute_capabilities:
        known = trt.compute_capabilities()
        unknown = [c for c in options.compute_capabilities if c not in known]
        if unknown:
            choices = ", ".join(known) or "none: this flavour builds for the GPU it runs on"
            raise FusionError(f"--compute-capability {','.join(unknown)}: {trt.describe()} offers {choices}")
    cache_path = options.timing_cache or default_timing_cache(trt)
    timing_cache = cache_path.read_bytes() if trt.has_timing_cache and cache_path.is_file() else None

    plugin_ops = artifact.manifest["export"].get("plugins", [])
    plugin_implementation = register_plugins(trt, plugin_ops)
    registered = any(not how.startswith(LOCAL_FUNCTION) for how in plugin_implementation.values())
    if verbose and plugin_ops:
        print(f"plugins {', '.join(plugin_ops)}: {next(iter(plugin_implementation.values()))}")
    progress = Progress(total_steps=len(plan.graphs) + 1, enabled=verbose)
    engines: dict[str, dict[str, Any]] = {}
    with staging_folder(out_dir) as tmp:
        for graph in plan.graphs:
            progress.step(f"build {graph.name} ({trt.describe()}, {plan.precision})")
            file = f"{graph.name}{ENGINE_SUFFIX}"
            info, timing_cache = build_graph(
                trt, artifact.folder / graph.onnx, graph, options, progress, timing_cache, tmp / file, registered
            )
            header = trt.check_plan(tmp / file)  # what a reader will check, checked once here
            engines[graph.name] = {"file": file, "bytes": header["bytes"], **info, "header": header}
        progress.step("copy model files, write the manifest")
        shutil.copy2(artifact.folder / artifact.manifest["embeddings"]["file"], tmp / EMBEDDINGS_FILE)
        shutil.copytree(artifact.model_dir, tmp / MODEL_SUBDIR)
        first_header = next(iter(engines.values()))["header"]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool_versions": tool_versions(),
            "tensorrt": {
                "flavour": trt.flavour.value,
                "version": trt.version,
                "compute_capabilities": first_header.get("compute_capabilities")
                or list(options.compute_capabilities)
                or "the build GPU",
                "builder_optimization_level": options.optimization_level,
                "strongly_typed": True,
            },
            "source": {
                "artifact": str(artifact_dir),
                "manifest_sha256": artifact.manifest["manifest_sha256"],
                "config_digest": artifact.manifest["model"]["config_digest"],
                "graphs": {g.name: artifact.manifest["files"][g.onnx]["sha256"] for g in plan.graphs},
            },
            "precision": plan.precision,
            "quantization": artifact.quantization,  # INT8 Q/DQ graphs: "int8" or "int8-weight-only"
            "kv_int8_scales": artifact.kv_int8_scales,  # an INT8 KV cache's (key, value) scales per layer, or None
            # plugin nodes in the graphs, and per op how the engines run it: a tensorrt.plugin implementation, or
            # "local function: <why>" (no plugin registered: the parser inlined its standard-op decomposition)
            "plugins": plugin_ops,
            "plugin_implementation": plugin_implementation,
            "query_len": plan.query_len,
            "embeddings": {"file": EMBEDDINGS_FILE, "tensor": artifact.manifest["embeddings"]["tensor"]},
            "engines": engines,
            "plan": plan.to_json(),
            "files": file_entries(tmp, manifest_name=ENGINE_MANIFEST),
        }
        save_manifest(tmp, manifest, ENGINE_MANIFEST)
    if timing_cache is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_path, lambda p: p.write_bytes(timing_cache))
    elapsed = progress.done()
    if verbose:
        print(f"built {out_dir} in {elapsed:.1f} s")
    return BuildResult(folder=out_dir, plan=plan, engines=engines, trt=trt.describe())
