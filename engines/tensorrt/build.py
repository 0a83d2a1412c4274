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
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from fusion_export.containment import contained_path, copy_data, copy_listed, staged_path
from fusion_export.decoder_merge import merge_decoder
from fusion_export.file_names import EMBEDDINGS_FILE
from fusion_export.graph_inputs import past_names
from fusion_export.manifest import MANIFEST, file_entries, open_artifact, save_manifest, tool_versions
from fusion_export.output_files import check_timing_cache_file, write_atomically
from fusion_export.progress import Progress
from reference_model.errors import FusionError
from reference_model.staging import staging_folder

from ..plugins.kernel_table import LOCAL_FUNCTION
from ..plugins.tensorrt_plugins import register_plugins
from .device_memory import kv_buffers
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


def build_gpu() -> str:
    """The GPU a TensorRT build times its tactics on, as a file-name part: compute capability and name, e.g.
    "sm87-orin" or "sm90-nvidia-h100-80gb-hbm3" ("no-gpu" where torch sees none)."""
    import torch

    if not torch.cuda.is_available():
        return "no-gpu"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    return f"sm{props.major}{props.minor}-{name}"


def default_timing_cache(trt: Trt, gpu: str | None = None) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every build on this machine: its timings are
    measured on one device, and set_timing_cache refuses a cache whose "CUDA device property" differs (docs/tensorrt.md
    section 4), so each GPU keeps its own."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusion-export"
    return root / f"timing-{trt.flavour}-{trt.version}-{gpu or build_gpu()}.cache"


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


def use_timing_cache(trt: Trt, config: Any, timing_cache: bytes | None, explicit: Path | None) -> None:
    """Give the builder `timing_cache` (or a fresh one). `set_timing_cache(cache, ignore_mismatch=False)` returns
    False for a cache made on another GPU or TensorRT version and leaves the config without one (docs/tensorrt.md
    section 4): --timing-cache (`explicit`) is then refused, naming it; the default cache restarts, said so."""
    if timing_cache:
        cache = config.create_timing_cache(timing_cache)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        if explicit is not None:
            raise EngineBuildError(
                f"--timing-cache {explicit}: {trt.describe()} cannot use it (made by another TensorRT version or "
                "GPU, or not a timing cache); remove it or give another path"
            )
        print("note: the default timing cache does not fit this TensorRT or GPU; starting anew", file=sys.stderr)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineBuildError(f"{trt.describe()} refused an empty timing cache")


def timing_cache_bytes(config: Any) -> bytes | None:
    """The builder's timing cache after a build, or None where it holds none (nothing is saved then)."""
    cache = config.get_timing_cache()
    return None if cache is None else bytes(memoryview(cache.serialize()))


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
    trt.require_user_allocation(config)  # TensorRT-RTX: decode steps can be captured in a CUDA graph
    if options.workspace_gb:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.compute_capabilities:
        trt.set_compute_capabilities(config, list(options.compute_capabilities))
    monitor = None
    if trt.has_progress_monitor:
        monitor = _progress_monitor(trt, progress, graph.name)
        config.progress_monitor = monitor  # kept alive by `monitor` until the build returns
    if trt.has_timing_cache:
        use_timing_cache(trt, config, timing_cache, timing_cache_path)
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
        "plugin_layers": trt.plugin_layers(network),  # per plugin op: layers the engine runs as that plugin
        "kv_updated_in_place": trt.kv_updates_in_place(network),  # cache inputs its output aliases (kv_buffers.py)
        "build_s": round(seconds, 2),
        "io": _io(network),
        "profile": graph.profile,
    }
    updated = timing_cache_bytes(config) if trt.has_timing_cache else None
    del monitor, network, builder  # the parsed weights go before the next graph is parsed
    return info, updated


def _as_built(implementation: dict[str, str], engines: dict[str, dict[str, Any]]) -> dict[str, str]:
    """How each plugin op runs in the built engines: its registered implementation where some engine holds its
    plugin layers, else the local function the parser inlined (counted after parsing, Trt.plugin_layers)."""
    built = {op for info in engines.values() for op in info["plugin_layers"]}
    return {op: how if op in built or how.startswith(LOCAL_FUNCTION) else
            f"{LOCAL_FUNCTION}: the parser inlined it although a plugin was registered"
            for op, how in implementation.items()}  # fmt: skip


def _check_kv_plan(plan: BuildPlan, engines: dict[str, dict[str, Any]], num_layers: int) -> None:
    """The plan counted the KV cache by the ONNX ops that write it (one buffer per tensor for TensorScatter, two
    otherwise); the parsed networks say what TensorRT made of them. Where they disagree, the plan's figure is
    corrected to what the runtime will allocate (it follows the engine), and said so."""
    caches = set(past_names(num_layers))
    decoders = [info for info in engines.values() if caches & {t["name"] for t in info["io"]["inputs"]}]
    in_place = all(set(info["kv_updated_in_place"]) == caches for info in decoders)
    if in_place == plan.kv_in_place:
        return
    buffers = kv_buffers(in_place)
    print(f"note: TensorRT {'updates' if in_place else 'does not update'} the KV cache in place here (the plan "
          f"assumed otherwise from the {', '.join(plan.kv_write_ops)} writes): planned with {buffers} buffer(s) "
          "per cache tensor", file=sys.stderr)  # fmt: skip
    kv = plan.memory["kv_cache"] // plan.kv_buffers * buffers
    plan.memory["total"] += kv - plan.memory["kv_cache"]
    plan.memory["kv_cache"], plan.kv_in_place, plan.kv_buffers = kv, in_place, buffers


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
    cache_path, timing_cache = None, None
    if trt.has_timing_cache:
        cache_path = options.timing_cache or default_timing_cache(trt)
        timing_cache = _read_timing_cache(cache_path, options.timing_cache is not None)

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
        plugin_implementation = _as_built(plugin_implementation, engines)
        _check_kv_plan(plan, engines, artifact.config.decoder.num_layers)
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
        if cache_path is not None and timing_cache is not None:
            # before publishing: a --timing-cache that cannot be written fails the build
            _save_timing_cache(cache_path, timing_cache, options.timing_cache is not None)
    elapsed = progress.done()
    if verbose:
        print(f"built {out_dir} in {elapsed:.1f} s")
    return BuildResult(folder=out_dir, plan=plan, engines=engines, trt=trt.describe())
