"""Every difference between the TensorRT flavours this toolkit builds with, in one module.

- `tensorrt` (module `tensorrt`, 10.3 on JetPack 6 up to 10.x and 11.x): strong typing is opt-in in 10.x
  (`STRONGLY_TYPED`) and always on in 11.x; timing caches; builds for the GPU it runs on.
- `tensorrt-rtx` (module `tensorrt_rtx`, 1.x): TensorRT 11's API, always strongly typed; builds ahead of time
  without a GPU for a list of compute capabilities; timing caches are no-ops (deprecated since 1.2).

Sources (docs/tensorrt.md): `NetworkDefinitionCreationFlag.STRONGLY_TYPED` and its renumbering (NvInfer.h at v10.16 /
v11.1); `IProgressMonitor` (10.0+); `IAttention.decomposable` (10.14+, the fix for "Attention operation was not
supported by a dedicated kernel"); `Runtime.get_engine_validity` / `engine_header_size` (TensorRT-RTX bindings);
`BuilderConfig.set_compute_capability` (TensorRT-RTX). What was measured with TensorRT-RTX 1.7.1 on a CPU-only
machine is in docs/tensorrt.md section 3.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from enum import Enum
from functools import cache
from types import ModuleType
from typing import Any

from reference_model.errors import FusionError


class TrtFlavour(str, Enum):
    tensorrt = "tensorrt"
    tensorrt_rtx = "tensorrt-rtx"

    def __str__(self) -> str:
        return self.value

    @property
    def module_name(self) -> str:
        return {TrtFlavour.tensorrt: "tensorrt", TrtFlavour.tensorrt_rtx: "tensorrt_rtx"}[self]

    @property
    def pip_package(self) -> str:
        return {TrtFlavour.tensorrt: "tensorrt-cu12", TrtFlavour.tensorrt_rtx: "tensorrt-rtx-cu12"}[self]


class TrtUnavailableError(FusionError):
    """No usable TensorRT module is installed (or not the one asked for)."""


# The first logger a process creates is the one TensorRT keeps; later ones are ignored with a warning.
_LOGGERS: dict[str, Any] = {}


@dataclass
class Trt:
    """An imported TensorRT flavour and what it supports."""

    flavour: TrtFlavour
    module: ModuleType

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def describe(self) -> str:
        return f"{self.flavour} {self.version}"

    def logger(self) -> Any:
        """The process-wide logger that records messages, so errors can be reported with the build's failure."""
        trt = self.module
        if self.module.__name__ not in _LOGGERS:

            class RecordingLogger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.messages: list[tuple[Any, str]] = []

                def log(self, severity, message) -> None:
                    self.messages.append((severity, message))

                def errors(self) -> list[str]:
                    return [m for s, m in self.messages if s <= trt.ILogger.ERROR]

            _LOGGERS[self.module.__name__] = RecordingLogger()
        return _LOGGERS[self.module.__name__]

    # --- building ------------------------------------------------------------------------------------------

    def network_flags(self) -> int:
        """Strongly typed networks everywhere: precision comes from the ONNX (10.x opts in; 11.x and RTX always
        are, and RTX's enum value for the flag is 0, so the shift is computed, never written as a number)."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    @property
    def has_timing_cache(self) -> bool:
        return self.flavour is TrtFlavour.tensorrt  # TensorRT-RTX: "Timing cache operations are no-ops"

    @property
    def has_progress_monitor(self) -> bool:
        return hasattr(self.module, "IProgressMonitor")

    @property
    def builds_without_gpu(self) -> bool:
        return self.flavour is TrtFlavour.tensorrt_rtx

    def parse(self, onnx_path, plugins: bool = False, model_bytes: bytes | None = None) -> tuple[Any, Any, list[str]]:
        """Parse an ONNX file with this TensorRT's own parser: (builder, network, errors); errors [] when it parses.
        External weights are read from beside the file. `model_bytes`: a model to parse in place of the file's, its
        external weights read from beside `onnx_path` (`IParser.parse(model, path)`: the path is "Only required if
        the model has externally stored weights", the parser's Python docs). `plugins`: our plugins are registered,
        so plugin nodes become plugin layers, not their local functions (10.15+ parsers prefer a local function unless
        ENABLE_PLUGIN_OVERRIDE is set; 10.7-10.14 prefer the plugin anyway), ahead-of-time implementations first."""
        module, logger = self.module, self.logger()
        logger.messages.clear()
        where = "TensorRT builds on the GPU it targets; TensorRT-RTX builds without one"
        try:
            builder = module.Builder(logger)
        except (RuntimeError, TypeError) as e:
            raise FusionError(f"{self.describe()} cannot create a builder here ({e}; {where})") from None
        if builder is None:
            raise FusionError(f"{self.describe()} cannot create a builder here ({where})")
        flags = self.network_flags()
        prefer_aot = getattr(module.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
        if plugins and prefer_aot is not None:
            flags |= 1 << int(prefer_aot)
        network = builder.create_network(flags)
        parser = module.OnnxParser(network, logger)
        override = getattr(getattr(module, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
        if plugins and override is not None:
            parser.set_flag(override)
        path = str(onnx_path.resolve())
        if parser.parse(model_bytes, path) if model_bytes is not None else parser.parse_from_file(path):
            return builder, network, []
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        return builder, network, [f"{e.node_name() or '?'} ({e.node_operator() or '?'}): {e.desc()}" for e in errors]

    def attention_layers(self, network: Any) -> list[Any]:
        """The network's IAttention objects. The parser maps ONNX Attention to a pair of ATTENTION_INPUT /
        ATTENTION_OUTPUT boundary layers; the IAttention is reached through them (the layer's Python class has to
        be set first, as for every layer that `get_layer` returns)."""
        trt = self.module
        kinds = {
            getattr(trt.LayerType, "ATTENTION_INPUT", None): getattr(trt, "IAttentionInputLayer", None),
            getattr(trt.LayerType, "ATTENTION_OUTPUT", None): getattr(trt, "IAttentionOutputLayer", None),
        }
        kinds.pop(None, None)
        found: dict[str, Any] = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            cls = kinds.get(layer.type)
            if cls is not None:
                layer.__class__ = cls
                found.setdefault(layer.attention.name, layer.attention)
        return list(found.values())

    def plugin_layers(self, network: Any) -> dict[str, int]:
        """The parsed network's IPluginV3 layers per plugin name: what the engine will really run as a plugin. A
        parser may still inline a plugin node's local function with a creator registered (10.6-10.9 parsers, or
        no ENABLE_PLUGIN_OVERRIDE), so this, not the registration, says what was built."""
        trt, counts = self.module, {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.PLUGIN_V3:
                layer.__class__ = trt.IPluginV3Layer
                name = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE).plugin_name
                counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def kv_updates_in_place(self, network: Any) -> list[str]:
        """The network inputs its KV-cache update layers write in place (TensorScatter -> IKVCacheUpdateLayer,
        10.15+): "the output performs in-place updates on the cache tensor, so they must share the same device
        memory address" (NvInfer.h). [] where the cache is written by ordinary layers (ScatterElements, ScatterND)."""
        kind = getattr(self.module.LayerType, "KV_CACHE_UPDATE", None)
        layers = (network.get_layer(i) for i in range(network.num_layers))
        return sorted(layer.get_input(0).name for layer in layers
                      if layer.type == kind and layer.get_input(0).is_network_input)  # fmt: skip

    def require_user_allocation(self, config: Any) -> None:
        """TensorRT-RTX: build engines whose contexts never allocate at run time, the condition it documents for
        capturing their enqueue in a CUDA graph (`BuilderFlag.REQUIRE_USER_ALLOCATION`, RTX 1.2+: "ensures that
        inference will support graph capture"). Enterprise TensorRT has no such flag and needs none."""
        flag = getattr(self.module.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)
        if self.flavour is TrtFlavour.tensorrt_rtx and flag is not None:
            config.set_flag(flag)

    def compute_capabilities(self) -> list[str]:
        """Names accepted by --compute-capability (TensorRT-RTX); [] where the builder targets its own GPU."""
        enum = getattr(self.module, "ComputeCapability", None)
        if enum is None:
            return []
        return [name for name in enum.__members__ if name.startswith("SM")]

    def set_compute_capabilities(self, config: Any, names: list[str]) -> None:
        enum = self.module.ComputeCapability
        config.num_compute_capabilities = len(names)
        for index, name in enumerate(names):
            if not config.set_compute_capability(enum.__members__[name], index):
                raise FusionError(f"--compute-capability {name}: refused by {self.describe()}")

    # --- loading -------------------------------------------------------------------------------------------

    def check_plan(self, path) -> dict[str, Any]:
        """What can be checked of a serialized engine file before deserializing it (no GPU needed, 64 bytes read):
        the flavour's header and, for TensorRT-RTX, the plan size it records (a truncated copy is caught) and the
        compute capabilities it was built for. Raises with the file named; returns the header facts."""
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
        if self.flavour is TrtFlavour.tensorrt_rtx:
            return read_rtx_plan_header(head, size, str(path))
        if len(head) < 28 or struct.unpack_from("<I", head, 0)[0] != TRT_PLAN_MAGIC:
            raise FusionError(f"{path}: not a TensorRT engine (its header is not a TensorRT plan's)")
        return {"bytes": size}

    def write_plan(self, builder: Any, network: Any, config: Any, path) -> bool:
        """Build and write the plan to `path` without holding it in memory where the builder can stream it
        (`build_serialized_network_to_stream`, TensorRT 10.x later releases and TensorRT-RTX): a full-size plan
        is as large as its weights. Returns False when the build failed. A write that fails (a full disk) raises its
        OSError here: inside TensorRT's callback it would only show as a truncated plan."""
        if hasattr(builder, "build_serialized_network_to_stream"):
            base = self.module.IStreamWriter
            failed: list[OSError] = []
            with open(path, "wb") as f:

                class FileWriter(base):
                    def __init__(self) -> None:
                        base.__init__(self)

                    def write(self, data) -> int:
                        if failed:
                            return 0
                        try:
                            return f.write(data)
                        except OSError as e:  # raised into TensorRT it would be lost: kept, reported below
                            failed.append(e)
                            return 0  # a short write: TensorRT stops writing

                built = bool(builder.build_serialized_network_to_stream(network, config, FileWriter()))
                if failed:
                    raise failed[0]
                f.flush()  # a full disk at the last buffer is raised here, not hidden behind the header check
            return built
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            return False
        with open(path, "wb") as f:
            f.write(memoryview(plan))  # no bytes() copy of a multi-GB plan
        return True

    def create_context(self, engine: Any) -> Any:
        """An execution context that allocates no scratch memory of its own (`USER_MANAGED`, TensorRT 10.0+, 11 and
        RTX): the runtime gives every context one shared block (`set_context_memory`). The default, STATIC, would
        allocate "the maximum size across all profiles" per context (NvInferRuntime.h)."""
        return engine.create_execution_context(self.module.ExecutionContextAllocationStrategy.USER_MANAGED)

    @staticmethod
    def set_context_memory(context: Any, address: int, size: int) -> None:
        """`IExecutionContext.set_device_memory(memory, size)` (setDeviceMemoryV2, 10.1+; 10.3 on JetPack 6 has it):
        "256-byte aligned device memory", at least the engine's `device_memory_size_v2`; not to be used "for a
        parallel execution context" while an enqueue runs: ours run one at a time on one stream."""
        context.set_device_memory(address, size)

    def engine_validity(self, plan: Any) -> tuple[str, list[str]] | None:
        """The runtime's own validity verdict, where the flavour has the query (TensorRT-RTX): ("VALID" |
        "SUBOPTIMAL" | "INVALID", diagnostics). Needs a GPU to say VALID; None where the query is missing."""
        runtime = self.module.Runtime(self.logger())
        if not hasattr(runtime, "get_engine_validity"):
            return None
        validity, diagnostics = runtime.get_engine_validity(plan)
        flags = self.module.EngineInvalidityDiagnostics
        named = [name for name, value in flags.__members__.items() if int(diagnostics) & int(value)]
        return validity.name, named


# TensorRT 8.6+ plans start with this magic ('ftrt'); trtexec's --getPlanVersionOnly reads it (sampleEngines.cpp).
TRT_PLAN_MAGIC = 0x74727466
RTX_PLAN_MAGIC = b"vtrt"  # TensorRT-RTX 1.x plans, read off 1.7.1 engines (docs/tensorrt.md section 3)
RTX_CC_BITS = {"SM80": 0x02, "SM86": 0x04, "SM89": 0x08, "SM120": 0x10, "SM121": 0x20}


def read_rtx_plan_header(head: bytes, size: int, where: str) -> dict[str, Any]:
    """The TensorRT-RTX plan header (the first 64 bytes of a plan of `size` bytes) as read off 1.7.1 engines
    (undocumented, so only what was confirmed): magic, total size (u64 at 16), version bytes (24..26),
    compute-capability mask (u32 at 32)."""
    if len(head) < 64 or head[:4] != RTX_PLAN_MAGIC:
        raise FusionError(f"{where}: not a TensorRT-RTX engine (wrong header)")
    (total,) = struct.unpack_from("<Q", head, 16)
    if total != size:
        raise FusionError(f"{where}: truncated or padded engine ({size} bytes, its header says {total})")
    (mask,) = struct.unpack_from("<I", head, 32)
    return {
        "bytes": total,
        "version": ".".join(str(b) for b in head[24:27]),
        "compute_capabilities": [name for name, bit in RTX_CC_BITS.items() if mask & bit],
    }


@cache
def _import(flavour: TrtFlavour) -> ModuleType | None:
    try:
        return importlib.import_module(flavour.module_name)
    except ImportError:
        return None


def load_trt(flavour: TrtFlavour | str | None = None) -> Trt:
    """The requested flavour, or the installed one (enterprise TensorRT first: it is what datacenter GPUs and
    Jetsons run); a clear error naming the pip package when none is installed."""
    flavours = [TrtFlavour(flavour)] if flavour else [TrtFlavour.tensorrt, TrtFlavour.tensorrt_rtx]
    for candidate in flavours:
        module = _import(candidate)
        if module is not None:
            return Trt(candidate, module)
    wanted = " or ".join(f"{f} (pip install {f.pip_package})" for f in flavours)
    raise TrtUnavailableError(f"TensorRT is not installed: {wanted}; JetPack ships `tensorrt` with the system")


def installed_flavours() -> list[TrtFlavour]:
    return [f for f in TrtFlavour if _import(f) is not None]
