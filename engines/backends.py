"""One place that opens a backend by kind. Each backend is one module, imported only when it is asked for, that
exposes `open_backend(path, options)`; adding a backend means adding a module and a line to `MODULES`.

| kind | opens | module |
| --- | --- | --- |
| `reference` | a checkpoint folder (PyTorch on any torch device) | `engines/reference.py` |
| `onnxruntime` | an artifact folder from `fusion-export export` | `engines/onnxruntime/session.py` |
| `tensorrt` | an engine folder from `fusion-export build` | `engines/tensorrt/runtime.py` |
| `torch` | a checkpoint folder (static KV cache, CUDA-graph decode, Triton kernels) | `engines/pytorch/backend.py` |

Every backend gives the same things to its callers (`Backend`): the model config and the folder holding its
tokenizer, what its graphs fix (query_len, KV capacity, precision), and `session(batch, max_new_tokens)`, a
`DecoderSession` that the shared `generate` loop drives. Opening a backend is cheap and checks its folder; the
weights or engines are loaded by the first session, so requests are checked before any heavy work.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol


class BackendKind(str, Enum):
    reference = "reference"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"

    def __str__(self) -> str:
        return self.value


MODULES = {
    BackendKind.reference: "engines.reference",
    BackendKind.onnxruntime: "engines.onnxruntime.session",
    BackendKind.tensorrt: "engines.tensorrt.runtime",
    BackendKind.torch: "engines.pytorch.backend",
}


@dataclass(frozen=True)
class BackendOptions:
    device: str | None = None  # reference, torch: a torch device (default cpu); tensorrt: a CUDA device (cuda:0)
    dtype: str | None = None  # reference, torch: weight dtype fp32 | fp16 | bf16 (default fp32)
    max_context: int | None = None  # torch: the static KV cache's columns (default: the checkpoint's context)
    kernels: str | None = None  # torch: the Triton kernels, auto (on CUDA for fp32/fp16) | on | off
    cuda_graph: str | None = None  # torch: the decode step as a CUDA graph, auto (on CUDA) | on | off
    compiled: bool | None = None  # torch: torch.compile the decode step
    provider: Any = None  # onnxruntime: providers.Device (default: cuda when available)
    threads: int | None = None  # onnxruntime: intra-op threads
    ort_weights: str | None = None  # onnxruntime on CPU: auto | shared | packed (OrtModel)
    ort_int8_kernels: str | None = None  # onnxruntime on CPU, W8A8 artifacts: auto | on | off (OrtModel)
    ort_attention: str | None = None  # onnxruntime on CPU: fused | graph (OrtModel)
    ort_accuracy_level: int | None = None  # onnxruntime on CPU, INT4/INT8 weight-only: 1 | 4 (default; OrtModel)
    ort_prefill_arena: bool | None = None  # onnxruntime on CPU: False = vision and prefill without an arena (serve)


class Backend(Protocol):
    kind: str
    config: Any  # FusionConfig
    model_dir: Path  # config and tokenizer
    query_len: int | None  # fixed by exported graphs; None: any (the reference)
    max_context: int | None  # KV columns fixed by the graphs; None: sized per request
    precision: Any  # Precision of the graphs; None for the reference
    quantization: str | None  # "int8" / "int8-weight-only" for Q/DQ graphs; None otherwise
    kv_int8_scales: list[tuple[float, float]] | None  # an INT8 KV cache's (key, value) scales per layer; None: float
    attends_to_valid_columns: bool  # a decode step reads only the written KV columns (else the whole buffer)

    def describe(self) -> str: ...

    def load(self) -> Backend: ...  # weights or engines, once (the first session does it otherwise)

    def session(self, batch: Any, max_new_tokens: int) -> Any: ...

    # a conversation's later turn: a session that continues `turn` (reference_model.conversation.TurnState, which
    # the first session's `kept_cache(row, length)` filled) with each chunk's prefill, then decode steps
    def follow_up(self, turn: Any, chunks: list[list[int]], max_new_tokens: int) -> Any: ...


def open_backend(kind: BackendKind | str, path: str | Path, options: BackendOptions | None = None) -> Backend:
    module = importlib.import_module(MODULES[BackendKind(kind)])
    return module.open_backend(Path(path), options or BackendOptions())


def kind_of_folder(path: str | Path) -> BackendKind | None:
    """Which backend a folder is for, from the file that marks it (engine manifest, artifact manifest, checkpoint)."""
    path = Path(path)
    from fusion_export.file_names import ENGINE_MANIFEST, MANIFEST

    if (path / ENGINE_MANIFEST).is_file():
        return BackendKind.tensorrt
    if (path / MANIFEST).is_file():
        return BackendKind.onnxruntime
    if (path / "config.json").is_file():
        return BackendKind.reference
    return None


def resolve_query_len(query_len: int | None, config) -> int:
    from reference_model.errors import FusionError

    source = "--query-len" if query_len is not None else "the checkpoint's default query_len (config.json)"
    query_len = config.default_query_len if query_len is None else query_len
    try:
        return config.check_query_len(query_len)
    except FusionError as e:
        raise FusionError(f"{source}: {e}") from None


def backend_query_len(backend, requested: int | None) -> int:
    """The query_len to run: the graphs' own (a different --query-len is refused), or the flag / the default."""
    from reference_model.errors import FusionError

    if backend.query_len is None:
        return resolve_query_len(requested, backend.config)
    if requested is not None and requested != backend.query_len:
        raise FusionError(f"--query-len {requested}: these graphs were exported for query_len {backend.query_len}")
    return backend.query_len
