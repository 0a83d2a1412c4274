"""The plugins as Python IPluginV3 classes, for TensorRT-RTX, whose 1.7.1 wheel has no `tensorrt_rtx.plugin`.

TensorRT-RTX's ONNX parser imports a node whose op is a registered plugin through an `IPluginCreatorV3One` creator,
looked up by op type, version "1" and the node's `plugin_namespace` attribute, "" without one: unlike TensorRT
10.10+, the 1.7.1 parser does not take the node's domain as the namespace (its verbose log: "Checking if node can be
treated as plugin: InteractionAttention, plugin_version: 1, plugin_namespace: "), so the creators and plugins live
in the default namespace. `ENABLE_PLUGIN_OVERRIDE` makes the parser prefer the plugin over the local function.

One class serves the three ops: the output shape and type rules are the op's (`tensorrt_plugins.TYPE_COMBINATIONS`
is the one statement of the types each kernel takes), and `enqueue` launches the same Triton kernel as
`tensorrt.plugin`'s JIT `impl`, through torch on TensorRT's stream, so the engines need Python, torch and triton
where they run.

The builder needs no GPU for these plugins (ahead of time, as for the rest of the network): the parser calls
`create_plugin`, the builder the shape, type and format callbacks; only `enqueue` needs one.

Found here (tests/test_rtx_plugins.py): the 1.7.1 parser opens the unversioned `libtensorrt_rtx.so` to import a V3
plugin, the wheel ships only `libtensorrt_rtx.so.1`, and the failed open ends the process (std::terminate, no
message beyond "terminate called without an active exception"). `parser_can_import_plugins` links the name beside
the parser library (which searches its own folder, RPATH $ORIGIN) before any plugin is registered.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fusion_export.plugin_ops.onnx_forms import WINDOW_MAX_POOL
from reference_model.errors import FusionError

from .kernel_table import ATTRIBUTES, TYPE_COMBINATIONS, run_kernel

VERSION = "1"
NAMESPACE = ""  # what the parser searches (above); a serialized plugin is found again under the same one
IMPLEMENTATION = "IPluginV3 (Python, Triton JIT)"
_PARSER = "libtensorrt_onnxparser_rtx.so"
_LIBRARY = "libtensorrt_rtx.so"


def loaded_library_folder(name: str) -> Path | None:
    """The folder of a shared library this process has mapped (its name without the version suffix)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if Path(path).name.startswith(name):
                    return Path(path).parent
    except OSError:
        pass
    return None


def parser_can_import_plugins(folder: Path | None = None) -> str:
    """Empty when TensorRT-RTX's parser can open `libtensorrt_rtx.so` from its own folder (default: where this process
    loaded it from), linking it to the shipped `.so.1` there if needed; else why not, with the command that fixes
    it."""
    folder = folder or loaded_library_folder(_PARSER)
    if folder is None:
        return f"{_PARSER} is not loaded in this process"
    link, versioned = folder / _LIBRARY, folder / f"{_LIBRARY}.1"
    if link.exists():
        return ""
    if not versioned.exists():
        return f"neither {link} nor {versioned} exists"
    staged = folder / f".{_LIBRARY}.{os.getpid()}.tmp"
    try:
        staged.unlink(missing_ok=True)
        staged.symlink_to(versioned.name)
        staged.replace(link)  # atomic: another process linking at the same time sees one or the other, both valid
    except OSError as e:
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)
        return (f"TensorRT-RTX's parser opens {_LIBRARY} to import plugins and the wheel ships only {versioned.name}; "
                f"linking it failed ({e}): run `ln -s {versioned.name} {link}`")  # fmt: skip
    print(f"linked {link} -> {versioned.name} (TensorRT-RTX's parser opens it to import plugins)", file=sys.stderr)
    return ""


def allowed_types(trt: Any, op: str) -> list[tuple[Any, ...]]:
    """Every type combination (inputs, then the output) the op's kernel takes, from TYPE_COMBINATIONS."""
    names = {"FP32": trt.float32, "FP16": trt.float16, "INT8": trt.int8, "INT32": trt.int32, "INT64": trt.int64}
    positions = [choice.strip().split("|") for choice in TYPE_COMBINATIONS[op].split(",")]
    width = max(len(p) for p in positions)
    return [tuple(names[p[i] if len(p) > 1 else p[0]] for p in positions) for i in range(width)]


def register(trt: Any, ops: list[str]) -> dict[str, str]:
    """Register one creator per op with TensorRT-RTX's plugin registry; per op how engines run it."""
    registry = trt.get_plugin_registry()
    classes = _classes(trt)
    for op in ops:
        if registry.get_creator(op, VERSION, NAMESPACE) is None:
            creator = classes.creator(op)
            _ALIVE.append(creator)  # the registry keeps a pointer, not a reference
            if not registry.register_creator(creator, NAMESPACE):
                raise FusionError(f"TensorRT-RTX refused the plugin creator {op} (registry: {registry})")
    return dict.fromkeys(ops, IMPLEMENTATION)


_ALIVE: list[Any] = []


def buffer_tensor(pointer: int, desc: Any, trt: Any, device: str = "cuda") -> Any:
    """A torch view (no copy) of a buffer TensorRT owns, through the CUDA array interface; `device` "cpu" reads a
    host buffer through numpy's (how the tests drive `enqueue` in Triton's interpreter)."""
    import torch

    types = {trt.float32: "<f4", trt.float16: "<f2", trt.int8: "|i1", trt.int32: "<i4", trt.int64: "<i8"}
    interface = {"shape": tuple(desc.dims), "typestr": types[desc.type], "data": (pointer, False), "version": 3,
                 "strides": None}  # fmt: skip
    if device == "cpu":
        return torch.from_numpy(np.asarray(type("Host", (), {"__array_interface__": interface})()))
    return torch.as_tensor(type("Device", (), {"__cuda_array_interface__": interface})(), device=device)


def plugin_field(trt: Any, name: str, value: float | None) -> Any:
    """A float attribute as a plugin field: FLOAT32, as TensorRT's ONNX parser passes a node's float attribute
    (None: the creator's empty declaration of the field)."""
    data = np.array([] if value is None else [value], dtype=np.float32)
    return trt.PluginField(name, data, trt.PluginFieldType.FLOAT32)


@functools.cache
def _classes(trt: Any) -> Any:
    """The plugin and creator classes, derived from this TensorRT module's bindings (made once per module)."""

    class FusionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: str, attributes: dict[str, float]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.attributes, self.num_outputs = op, attributes, 1
            self.plugin_name, self.plugin_namespace, self.plugin_version = op, NAMESPACE, VERSION
            self.combinations = allowed_types(trt, op)
            self.device = "cuda"  # "cpu": host buffers, Triton's interpreter (tests)

        def get_capability_interface(self, kind: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], exprs: Any) -> list[Any]:
            if self.op != WINDOW_MAX_POOL:
                return [inputs[0]]
            grid, side = inputs[0], inputs[1][0]  # [B, H, W, D], the index table's length
            out = trt.DimsExprs(3)
            out[0], out[2] = grid[0], grid[3]
            out[1] = exprs.operation(trt.DimensionOperation.PROD, side, side)
            return [out]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            chosen = [io.desc.type for io in in_out[: pos + 1]]
            return any(list(types[: pos + 1]) == chosen for types in self.combinations)

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:  # noqa: ANN001
            import torch

            tensors = [buffer_tensor(p, d, trt, self.device) for p, d in zip(inputs, input_desc)]
            out = buffer_tensor(outputs[0], output_desc[0], trt, self.device)
            on_stream = torch.cuda.stream(torch.cuda.ExternalStream(stream)) if self.device == "cuda" else None
            with on_stream or contextlib.nullcontext():
                run_kernel(self.op, tensors, out, self.attributes)

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def set_tactic(self, tactic: int) -> None:
            pass

        def get_fields_to_serialize(self) -> Any:
            # sizes are carried by the shapes; what the engine keeps is the float attributes (an int8 cache's scales)
            fields = [plugin_field(trt, name, value) for name, value in self.attributes.items()]
            return trt.PluginFieldCollection(fields)

        def clone(self) -> Any:
            twin = FusionPlugin(self.op, dict(self.attributes))
            twin.device = self.device
            return twin

    class FusionPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, op: str) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = op, NAMESPACE, VERSION
            self.field_names = trt.PluginFieldCollection([plugin_field(trt, name, None) for name in ATTRIBUTES[op]])

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
            """The node's attributes (the parser passes those the node has: FLOAT32 fields), defaults for the rest."""
            given = {f.name: float(np.asarray(f.data).reshape(-1)[0]) for f in fields}
            unknown = set(given) - set(ATTRIBUTES[self.name])
            if unknown:
                raise ValueError(f"{self.name}: unknown attributes {sorted(unknown)}")
            return FusionPlugin(self.name, {**ATTRIBUTES[self.name], **given})

    class Classes:
        plugin, creator = FusionPlugin, FusionPluginCreator

    return Classes
