"""`fusion-export build`: an artifact folder -> an engine folder: the vision encoder's engine and one decoder engine
for prefill and decode, whose graph fusion_export/decoder_merge.py makes of the artifact's two decoder graphs in
memory (the decoder's weights held once; `--plugins on` artifacts: a prefill and a step engine, engines/tensorrt/plan).

Every network is strongly typed (precision comes from the ONNX). Per engine: parse, mark the attention layers
decomposable (so fp32 attention, which has no dedicated kernel for multi-token queries, falls back to MatMul and
Softmax instead of failing the build), one optimization profile from `build_plan`, compute-capability targets
(TensorRT-RTX), the builder optimization level, a timing cache reused across builds (TensorRT 10/11; TensorRT-RTX
has none), TensorRT's progress monitor on the terminal. The folder is built under a temporary name and appears
only when every engine and the manifest are written.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from fusion_export.containment import contained_path, copy_data, copy_listed, staged_path
from fusion_export.decoder_merge import merge_decoder
from fusion_export.file_names import EMBEDDINGS_FILE
from fusion_export.manifest import MANIFEST, file_entries, open_artifact, save_manifest, tool_versions
from fusion_export.output_files import check_timing_cache_file, write_atomically
from fusion_export.progress import Progress
from reference_model.errors import FusionError
from reference_model.staging import staging_folder

from ..plugins.kernel_table import LOCAL_FUNCTION
from ..plugins.tensorrt_plugins import register_plugins
from .engine_manifest import ENGINE_MANIFEST, ENGINE_SUFFIX, FORMAT, FORMAT_VERSION
from .flavours import Trt, TrtFlavour, load_trt
from .plan import BuildLimits, BuildPlan, DeviceMemory, GraphPlan, check_flavour_flags, plan_build


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


def _read_timing_cache(path: Path, explicit: bool) -> bytes | None:
    """The cache's bytes, or None where there is none yet. --timing-cache was checked up front and fails loudly;
    the default cache is a convenience: one that cannot be read is said so and the build starts without it."""
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError as e:
        if explicit:
            raise FusionError(f"--timing-cache {path}: cannot be read ({e.strerror})") from None
        print(f"note: timing cache {path} not read ({e.strerror}); building without it", file=sys.stderr)
        return None


def _save_timing_cache(path: Path, cache: bytes, explicit: bool) -> None:
    """Replace the cache atomically. --timing-cache: any failure fails the build (nothing is published); the
    default cache: a failure is said so, the engines are still good."""
    try:
        write_atomically(path, lambda p: p.write_bytes(cache))
    except (OSError, FusionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if explicit and isinstance(e, FusionError):  # a full disk, named by write_atomically
            raise
        if explicit:
            raise FusionError(f"--timing-cache {path}: cannot write it ({reason}); the engines were not kept") from None
        print(f"note: timing cache {path} not saved ({reason})", file=sys.stderr)


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


def merged_decoder_bytes(artifact, graph: GraphPlan) -> bytes:
    """The decoder engine's ONNX model (no weights: they stay in the artifact's external data)."""
    prefill, step = (onnx.load(artifact.graph_path(name), load_external_data=False) for name in graph.sources)
    return merge_decoder(prefill, step).SerializeToString()


def build_graph(
    trt: Trt,
    onnx_path: Path,
    graph: GraphPlan,
    options: BuildOptions,
    progress: Progress,
    timing_cache: bytes | None,
    engine_path: Path,
    plugins: bool = False,
    timing_cache_path: Path | None = None,
    model_bytes: bytes | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """Parse and build one graph into `engine_path`: (what to record, the updated timing cache or None).
    `plugins`: our plugins are registered with this TensorRT (plugins/tensorrt_plugins.py). `timing_cache_path`:
    where `timing_cache` came from, named if this TensorRT cannot use it. `model_bytes`: the model to parse in
    place of the file's (the merged decoder), its external weights read from beside `onnx_path`."""
    module, logger = trt.module, trt.logger()
    builder, network, errors = trt.parse(onnx_path, plugins=plugins, model_bytes=model_bytes)
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
        cache = config.create_timing_cache(timing_cache) if timing_cache else None
        # set_timing_cache says False for a cache from another GPU (ignore_mismatch=False), which would then be
        # replaced by a fresh one: --timing-cache is refused instead, the default cache restarts (said so)
        if timing_cache and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
            if timing_cache_path is not None:
                raise EngineBuildError(
                    f"--timing-cache {timing_cache_path}: {trt.describe()} cannot use it (made by another TensorRT "
                    "version or GPU, or not a timing cache); remove it or give another path"
                )
            print("note: the default timing cache does not fit this TensorRT or GPU; starting anew", file=sys.stderr)
            cache = None
        if cache is None:
            cache = config.create_timing_cache(b"")
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
    trt = load_trt(options.flavour)
    # flags this flavour would reject or ignore, refused before the artifact is read (the dry run makes the same
    # checks against build_plan's static table)
    check_flavour_flags(trt.describe(), trt.compute_capabilities(), trt.has_timing_cache,
                        options.compute_capabilities, options.timing_cache)  # fmt: skip
    if options.timing_cache is not None:
        check_timing_cache_file(options.timing_cache, "--timing-cache", [artifact_dir], out_dir)
    artifact = open_artifact(artifact_dir)
    plan = plan_build(artifact, options.limits, options.device_memory)
    cache_path = options.timing_cache or default_timing_cache(trt)
    timing_cache = _read_timing_cache(cache_path, options.timing_cache is not None) if trt.has_timing_cache else None

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
            model_bytes = merged_decoder_bytes(artifact, graph) if len(graph.sources) > 1 else None
            onnx_path = artifact.graph_path(graph.sources[-1])
            info, timing_cache = build_graph(trt, onnx_path, graph, options, progress, timing_cache, tmp / file,
                                             registered, options.timing_cache, model_bytes)  # fmt: skip
            del model_bytes
            header = trt.check_plan(tmp / file)  # what a reader will check, checked once here
            engines[graph.name] = {"file": file, "bytes": header["bytes"], "graphs": graph.sources, **info,
                                   "header": header}  # fmt: skip
        progress.step("copy model files, write the manifest")
        # as data, each source inside the artifact and each destination inside the staging folder (containment.py)
        where = f"{artifact.folder / MANIFEST}: files"
        embeddings = contained_path(artifact.folder, artifact.manifest["embeddings"]["file"], where)
        copy_data(embeddings, staged_path(tmp, EMBEDDINGS_FILE, where))
        copy_listed(artifact.folder, artifact.model_files, tmp, where)
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
                "graphs": {
                    name: artifact.manifest["files"][artifact.manifest["graphs"][name]["file"]]["sha256"]
                    for g in plan.graphs
                    for name in g.sources
                },  # fmt: skip
            },
            "precision": plan.precision,
            # the graphs' weight quantization as read from their Q/DQ nodes ("int8", "int8-weight-only",
            # "int4-weight-only"; None: float), what the runtimes read; then with its block size and method
            "quantization": artifact.quantization,
            "quantization_settings": plan.quantization,
            "kv_cache_dtype": plan.kv_cache_dtype,  # int8, or the activations' fp16 / fp32
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
        if timing_cache is not None:  # before publishing: a --timing-cache that cannot be written fails the build
            _save_timing_cache(cache_path, timing_cache, options.timing_cache is not None)
    elapsed = progress.done()
    if verbose:
        print(f"built {out_dir} in {elapsed:.1f} s")
    return BuildResult(folder=out_dir, plan=plan, engines=engines, trt=trt.describe())
