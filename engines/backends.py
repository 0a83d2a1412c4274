"""One place that opens a backend by kind. Each backend is one module, imported only when it is asked for, that
exposes `open_backend(path, options)`; adding a backend means adding a module and a line to `MODULES`.

| kind | opens | module |
| --- | --- | --- |
| `reference` | a checkpoint folder (PyTorch on any torch device) | `engines/reference_backend.py` |
| `onnxruntime` | an artifact folder from `fusion-export export` | `fusion_export/ort_runtime.py` |
| `tensorrt` | an engine folder from `fusion-export build` | `engines/trt_runtime.py` |

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

    def __str__(self) -> str:
        return self.value


MODULES = {
    BackendKind.reference: "engines.reference_backend",
    BackendKind.onnxruntime: "fusion_export.ort_runtime",
    BackendKind.tensorrt: "engines.trt_runtime",
}


@dataclass(frozen=True)
class BackendOptions:
    device: str | None = None  # reference: a torch device (default cpu); tensorrt: a CUDA device (default cuda:0)
    dtype: str | None = None  # reference: weight dtype fp32 | fp16 | bf16 (default fp32)
    provider: Any = None  # onnxruntime: providers.Device (default: cuda when available)
    threads: int | None = None  # onnxruntime: intra-op threads
    ort_weights: str | None = None  # onnxruntime on CPU: auto | shared | packed (OrtModel)
    ort_int8_kernels: str | None = None  # onnxruntime on CPU, W8A8 artifacts: auto | on | off (OrtModel)
    ort_attention: str | None = None  # onnxruntime on CPU: fused | graph (OrtModel)


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


def open_backend(kind: BackendKind | str, path: str | Path, options: BackendOptions | None = None) -> Backend:
    module = importlib.import_module(MODULES[BackendKind(kind)])
    return module.open_backend(Path(path), options or BackendOptions())


def kind_of_folder(path: str | Path) -> BackendKind | None:
    """Which backend a folder is for, from the file that marks it (engine manifest, artifact manifest, checkpoint)."""
    path = Path(path)
    from .engine_manifest import ENGINE_MANIFEST

    if (path / ENGINE_MANIFEST).is_file():
        return BackendKind.tensorrt
    if (path / "manifest.json").is_file():
        return BackendKind.onnxruntime
    if (path / "config.json").is_file():
        return BackendKind.reference
    return None
