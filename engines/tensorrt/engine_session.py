"""One TensorRT engine and its execution context: named torch CUDA tensors in and out; nothing about FUSION.

Thin on purpose, in the manner of TensorRT-LLM's generic engine session (`tensorrt_llm/runtime/session.py`); every
call is TensorRT's documented Python API (docs/tensorrt.md section 7.1 quotes the documentation each follows):
- the plan is deserialized from a read-only memory map of its file (`Runtime.deserialize_cuda_engine` takes any
  buffer), never copied whole into a Python bytes: on a Jetson host and device memory are one memory;
- the context is created `USER_MANAGED` and given scratch memory by its owner (`attach_scratch`): the backend shares
  one block among its contexts, which run one at a time on one stream (`device_memory.shared_scratch_bytes`);
- inputs are device tensors bound by address (`set_input_shape`, `set_tensor_address`; 256-byte aligned, which
  torch's allocator guarantees), never shape-inference I/O, which would need host memory;
- `execute_async_v3(stream)` on the backend's own stream, never the default one.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from reference_model.generation import GenerationError

from .device_memory import shared_scratch_bytes
from .engine_manifest import EngineError
from .flavours import Trt

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}  # fmt: skip


def read_plan(trt: Trt, path: Path, rebuild_hint: str):
    """The engine deserialized from a memory map of `path` (pages read on demand, dropped by the kernel when
    memory is short), after the runtime's own validity verdict where the flavour has one (TensorRT-RTX)."""
    runtime = trt.module.Runtime(trt.logger())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
        verdict = trt.engine_validity(plan)
        if verdict is not None and verdict[0] == "INVALID":
            raise EngineError(f"{path}: invalid on this GPU ({', '.join(verdict[1]) or 'no diagnostics'}); "
                              f"{rebuild_hint}")  # fmt: skip
        if verdict is not None and verdict[0] == "SUBOPTIMAL":
            warnings.warn(f"{path}: runs, but was not built for this GPU ({verdict[1]})", stacklevel=3)
        engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        messages = "; ".join(trt.logger().errors()[-3:])
        raise EngineError(f"{path}: {trt.describe()} could not deserialize it ({messages})")
    return runtime, engine


class EngineSession:
    """One deserialized engine and its execution context."""

    def __init__(self, trt: Trt, runtime, engine, path: Path):
        self.trt, self.path = trt, path
        self.runtime, self.engine = runtime, engine  # the runtime outlives the engines it made
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.module.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        # a tensor read or written by shape inference lives in host memory; every input here is bound to device
        # memory by address, so an engine that has one was not built from our graphs
        host = [n for n in names if engine.is_shape_inference_io(n)]
        if host:
            raise EngineError(f"{path}: tensors {host} are shape-inference I/O (host memory); these engines bind "
                              "device memory only: rebuild it with fusion-export build")  # fmt: skip
        self.dtypes = {n: TORCH_DTYPES[engine.get_tensor_dtype(n).name] for n in names}
        # output -> the input it must share memory with (TensorRT's KV-cache update layer, 10.15+); None: not aliased
        # ("None should be returned", the query's documentation); TensorRT before 10.15 aliases nothing
        alias = getattr(engine, "get_aliased_input_tensor", lambda name: None)
        self.aliases = {n: alias(n) for n in self.outputs}
        self.scratch_bytes = int(engine.device_memory_size_v2)  # every profile, every shape it accepts
        self.context = trt.create_context(engine)
        self.empty: torch.Tensor | None = None  # an address for empty inputs (a decode step's latents)

    def attach_scratch(self, block: torch.Tensor) -> None:
        """Give the context its scratch memory: `block` (bytes on the device) is shared with the other contexts of
        the backend, which never run at the same time; it must outlive every enqueue and captured graph."""
        if block.numel() < self.scratch_bytes:
            raise EngineError(f"{self.path}: needs {self.scratch_bytes} bytes of scratch, given {block.numel()}")
        self.trt.set_context_memory(self.context, block.data_ptr(), block.numel())

    def aliased(self, output: str, input_name: str) -> bool:
        return self.aliases.get(output) == input_name

    def set_inputs(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise GenerationError(f"{self.path}: input {name} of shape {list(tensor.shape)} is outside the profile")
            address = tensor.data_ptr()
            if tensor.numel() == 0:  # torch gives an empty tensor no address: bind a real, aligned one, never read
                if self.empty is None:
                    self.empty = torch.zeros(256, dtype=torch.uint8, device=tensor.device)
                address = self.empty.data_ptr()
            self.context.set_tensor_address(name, address)

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def bind_outputs(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GenerationError(f"{self.path}: TensorRT refused to enqueue the engine")

    def capturable(self, stream: torch.cuda.Stream) -> bool:
        """Whether an enqueue on `stream` may be captured into a CUDA graph: TensorRT-RTX says so itself
        (`IExecutionContext.is_stream_capturable`, RTX 1.2+); enterprise TensorRT has no query, and an enqueue it
        cannot capture returns False or fails the capture (trtexec's sampleInference.cpp), caught by the caller."""
        query = getattr(self.context, "is_stream_capturable", None)
        return True if query is None else bool(query(stream.cuda_stream))


def share_scratch(sessions: Iterable[EngineSession], allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """One scratch block for every context, of the size the build planner counts by (`shared_scratch_bytes` of
    each engine's `device_memory_size_v2`), attached to each; kept alive by the caller as long as the contexts."""
    sessions = list(sessions)
    block = allocate(max(shared_scratch_bytes(s.scratch_bytes for s in sessions), 1))
    for session in sessions:
        session.attach_scratch(block)
    return block
