"""Export a FUSION checkpoint to an artifact folder: ONNX graphs, shared weights, embeddings, manifest.

```text
ART/
  manifest.json                      graphs, files (sha256), I/O, settings, versions
  vision_encoder.onnx (+ .onnx.data)  crops + embedded question -> image tokens, init latents, global ctx
  decoder_prefill.onnx                prefill with the interaction layers  } one shared
  decoder_step.onnx                   one (or a few) tokens per step       } decoder.onnx.data
  embed_tokens.safetensors            the token-embedding table, stored once for both graphs' inputs
  model/                              config.json, vision_config.json, tokenizer files
  trt_compat.json                     the static TensorRT check of every graph
```
The folder is built under a temporary name and renamed at the end, so it exists only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from safetensors.torch import save_file

from reference_model import load_model
from reference_model.checkpoint import DTYPES
from reference_model.errors import FusionError
from reference_model.prompt import TOKENIZER_FILES, load_tokenizer, tokenizer_folder
from reference_model.staging import staging_folder

from .containment import copy_data
from .file_names import EMBEDDINGS_FILE
from .graphs.decoder import decoder_prefill_spec, decoder_step_spec
from .graphs.kv_write import TENSOR_SCATTER_OPSET
from .graphs.vision_encoder import vision_encoder_spec
from .manifest import MODEL_SUBDIR, config_digest, graph_io, write_manifest
from .onnx_export import plugin_ops, save_group, total_initializer_bytes, trace
from .precision import Precision
from .progress import Progress
from .trt_rules.operator_check import CompatReport, check_graphs, save_report
from .trt_rules.targets import TrtTarget


class ExportError(FusionError):
    """The export produced graphs that fail a check; nothing is left behind."""


@dataclass(frozen=True)
class ExportOptions:
    query_len: int | None = None  # None: the checkpoint's default
    precision: Precision = Precision.fp32  # bf16: not yet validated on any runtime
    trt_target: TrtTarget = TrtTarget.trt_10_3
    opset: int | None = None  # None: the target's highest
    max_context: int | None = None  # fixed KV capacity; None: the target's default (resolve_max_context)
    plugins: bool = False  # plugin nodes (+ their local functions) for decode attention, interaction, pooling


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    trt_report: CompatReport  # the static TensorRT check of the graphs, for the caller to show


def _copy_model_files(model_dir: Path, dest: Path) -> None:
    """config, vision config and tokenizer files, so the artifact runs without the checkpoint. Copied as data:
    a checkpoint's files may be links (a Hugging Face cache snapshot links into its blobs/), an artifact's never."""
    dest.mkdir()
    for name in ("config.json", "vision_config.json"):
        if (model_dir / name).exists():
            copy_data(model_dir / name, dest / name)
    source = tokenizer_folder(model_dir)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            copy_data(source / name, dest / name)


def check_written_graphs(paths: dict[str, Path], target: TrtTarget, folder: Path, what: str) -> CompatReport:
    """The ONNX checker and the static TensorRT check on graphs just written into a staging `folder` (the check's
    report saved beside them); refuses, naming the graph, what would not load or parse."""
    for name, path in paths.items():
        try:
            onnx.checker.check_model(str(path), full_check=False)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{what} {name}.onnx failed the ONNX checker: {e}") from None
    report = check_graphs(paths, target)
    save_report(report, folder / "trt_compat.json")
    if not report.ok:
        raise ExportError(f"{what} graphs would be rejected by TensorRT:\n{report.table()}")
    return report


def resolve_max_context(requested: int | None, config, opset: int, query_len: int) -> int | None:
    """The decoder graphs' fixed KV capacity, or None for a dynamic one.

    TensorRT's KV-cache update (what TensorScatter maps to, opset >= 24) needs a static cache length, so those
    graphs always get one: by default the longest sequence upstream ran the checkpoint at (`default_context`:
    4096 for FUSION-Phi3.5 and FUSION-LLaMA3.1, 3072 for FUSION-X-LLaMA3.1). ScatterElements graphs (opset <= 23)
    keep a dynamic capacity unless one is asked for."""
    if requested is None:
        return config.default_context if opset >= TENSOR_SCATTER_OPSET else None
    shortest = config.vision.num_patches + query_len + 2  # image tokens, latents, one text token, one new token
    positions = config.decoder.rope.max_position_embeddings
    if not shortest <= requested <= positions:
        raise FusionError(
            f"--max-context {requested}: must hold the image tokens and latents of a prompt and fit the model's "
            f"positions ({shortest}..{positions})"
        )
    return requested


def export_artifact(
    model_dir: str | Path, out_dir: str | Path, options: ExportOptions, verbose: bool = True
) -> ExportResult:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precision = Precision(options.precision)
    opset = options.trt_target.resolve_opset(options.opset)
    progress = Progress(total_steps=7, enabled=verbose)

    progress.step(f"load {model_dir} ({precision})")
    load_tokenizer(model_dir)  # the artifact carries the tokenizer: fail now, not after tracing, if it is unusable
    model = load_model(model_dir, dtype=DTYPES[precision.value])
    config = model.config
    query_len = config.check_query_len(options.query_len or config.default_query_len)
    capacity = resolve_max_context(options.max_context, config, opset, query_len)
    specs = [
        vision_encoder_spec(model, query_len),
        decoder_prefill_spec(model, query_len, capacity, options.plugins),
        decoder_step_spec(model, capacity),
    ]

    with staging_folder(out_dir) as tmp:
        traced = {}
        for spec in specs:
            progress.step(f"trace {spec.name} (opset {opset})")
            traced[spec.name] = trace(spec, opset, options.plugins)
        plugins = sorted({op for model in traced.values() for op in plugin_ops(model)})

        progress.step("write graphs and weights")
        groups: dict[str, dict] = {}
        for spec in specs:
            groups.setdefault(spec.weights_group, {})[spec.name] = traced[spec.name]
        total = total_initializer_bytes(list(traced.values()))
        written = 0

        def on_bytes(n: int) -> None:
            nonlocal written
            written += n
            progress.bytes(written, total)

        data_hashes: dict[str, str] = {}
        for group, models in groups.items():
            data_hashes.update(save_group(models, tmp, f"{group}.onnx.data", on_bytes))
        del traced, groups
        save_file({"embed_tokens": model.embed_tokens.weight.detach().contiguous()}, tmp / EMBEDDINGS_FILE)
        _copy_model_files(model_dir, tmp / MODEL_SUBDIR)

        progress.step("check graphs (ONNX checker, TensorRT compatibility)")
        paths = {spec.name: tmp / f"{spec.name}.onnx" for spec in specs}
        report = check_written_graphs(paths, options.trt_target, tmp, "exported")

        progress.step("write manifest (sha256 of every file)")
        d = config.decoder
        write_manifest(
            tmp,
            {
                # the folder's name, not its path: a shipped artifact does not carry the exporter's disk layout
                "model": {"name": model_dir.resolve().name, "config_digest": config_digest(config)},
                "export": {
                    "query_len": query_len,
                    "precision": precision.value,
                    "opset": opset,
                    "trt_target": options.trt_target.value,
                    "max_context": capacity,  # fixed KV columns, or null: sized per request
                    "plugins": plugins,  # plugin ops in the graphs (--plugins on), each with its local function
                    "kv_cache": {
                        "layout": "fixed-capacity buffer per layer, updated in place at write columns",
                        "shape": ["batch", d.num_kv_heads, capacity or "capacity", d.head_dim],
                        "update_op": "TensorScatter" if opset >= TENSOR_SCATTER_OPSET else "ScatterElements",
                    },
                    "rope": f"rope_cos/rope_sin inputs computed by the runtime ({d.rope.kind}, per forward)",
                },
                "embeddings": {
                    "file": EMBEDDINGS_FILE,
                    "tensor": "embed_tokens",
                    "shape": [d.vocab_size, d.hidden_size],
                },
                "graphs": {
                    spec.name: {
                        "file": f"{spec.name}.onnx",
                        "weights": f"{spec.weights_group}.onnx.data",
                        **graph_io(path),
                    }
                    for spec, path in zip(specs, paths.values())
                },
                "trt_compat": {"target": report.target, "ok": report.ok, "report": "trt_compat.json"},
            },
            data_hashes,
        )
    elapsed = progress.done()
    if verbose:
        print(f"exported {out_dir} in {elapsed:.1f} s")
    return ExportResult(folder=out_dir, trt_report=report)
