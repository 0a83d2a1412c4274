"""Activation ranges for the linear layers, measured by running calibration requests through the artifact's own
graphs on ONNX Runtime: the vision encoder, the prefill with its interaction layers and decode steps.

Each graph is re-saved in a scratch folder inside the output's staging folder (weights hard-linked, copied across
file systems) with the left operand of every linear layer as an extra output; a session subclass runs the normal
pipeline on those graphs and hands the extra outputs to a `RangeObserver`, keyed by the weight the activation
meets, so prefill and step ranges merge.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from fusion_export.containment import contained_path, copy_data, staged_path
from fusion_export.graph_inputs import LOGITS
from fusion_export.manifest import GRAPHS, MANIFEST, Artifact
from reference_model import make_request, prepare_batch
from reference_model.generation import GenerationConfig, generate
from reference_model.limits import DEFAULT_MAX_IMAGE_PIXELS
from reference_model.prompt import load_tokenizer

from ..onnxruntime.session import OrtModel, OrtSession
from .calibration_set import CalibrationSet
from .entropy import Histogram
from .kv_cache import WRITE_UPDATE
from .qdq import MIN_SCALE, QMAX, is_linear_weight

METHODS = ("percentile", "max", "entropy", "smoothquant")


@dataclass
class RangeObserver:
    """Per weight, what its input reached: the largest |activation| (max, smoothquant), the largest per-call
    percentile of |activation| (percentile), a histogram of |activation| (entropy); and always the largest
    |activation| per input channel (smoothquant's statistic)."""

    method: str = "max"
    percentile: float = 99.99
    absmax: dict[str, float] = field(default_factory=dict)
    channel_max: dict[str, np.ndarray] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def observe(self, weights: list[str], activation: np.ndarray) -> None:
        a = np.abs(activation.astype(np.float32, copy=False))
        value = float(np.percentile(a, self.percentile) if self.method == "percentile" else a.max())
        channels = a.reshape(-1, a.shape[-1]).max(axis=0)
        for w in weights:
            self.absmax[w] = max(self.absmax.get(w, 0.0), value)
            self.channel_max[w] = np.maximum(self.channel_max.get(w, channels), channels)
            if self.method == "entropy":
                self.histograms.setdefault(w, Histogram()).add(a)
            self.calls[w] = self.calls.get(w, 0) + 1

    def scales(self) -> dict[str, float]:
        """Per-tensor INT8 scales (smoothquant's come from qdq, after smoothing)."""
        if self.method == "entropy":
            return {w: max(h.threshold() / QMAX, MIN_SCALE) for w, h in self.histograms.items()}
        return {w: max(v / QMAX, MIN_SCALE) for w, v in self.absmax.items()}


def _linear_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """activation tensor -> the weights it multiplies (qdq.linear_layers' rule, on the proto)."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
            weight = inits[node.input[1]]
            if is_linear_weight(weight.name, len(weight.dims)):
                out.setdefault(node.input[0], []).append(weight.name)
    return out


def _kv_updates(model: onnx.ModelProto) -> dict[str, list[str]]:
    """new keys/values tensor -> [the cache input it is written into] (kv_cache.WRITE_UPDATE's rule, on the proto)."""
    pasts = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in WRITE_UPDATE and node.input[0] in pasts:
            out.setdefault(node.input[WRITE_UPDATE[node.op_type]], []).append(node.input[0])
    return out


class _Observed:
    """An InferenceSession that returns only the graph's own outputs and gives the extra ones to the observers:
    `watched` is a list of (tensor -> keys, observer)."""

    def __init__(self, session, n_outputs: int, watched: list[tuple[dict[str, list[str]], RangeObserver]]):
        self.session, self.n, self.watched = session, n_outputs, watched
        self.names = [o.name for o in session.get_outputs()]

    def _observe(self, name: str, value: np.ndarray) -> None:
        for tensors, observer in self.watched:
            if name in tensors:
                observer.observe(tensors[name], value)

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.session.run(None, feeds)
        for name, value in zip(self.names[self.n :], outputs[self.n :]):
            self._observe(name, value)
        for name, value in feeds.items():  # an activation that is a graph input
            self._observe(name, value)
        return outputs[: self.n]


class _CalibrationSession(OrtSession):
    """The ONNX Runtime session's pipeline with plain `run` calls (the extra outputs cannot be IO-bound)."""

    def _run(self, session: _Observed, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import onnxruntime as ort

        feeds = {**inputs, **{p: v.numpy() for p, v in zip(self.past_names, self.cache)}}
        outputs = dict(zip(session.names, session.run(None, feeds)))
        self.cache = [ort.OrtValue.ortvalue_from_numpy(outputs[p]) for p in self.present_names]
        return outputs[LOGITS]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(self.model.step_session, self.feeds.advance(tokens)).copy())


def _instrumented_copy(
    artifact: Artifact, scratch: Path
) -> tuple[Artifact, dict[str, dict[str, list[str]]], dict[str, dict[str, list[str]]]]:
    """The artifact's files linked into `scratch`, its graphs replaced by copies with the extra outputs: the
    linear layers' inputs and the KV cache writes' updates (the two `watched` maps returned)."""
    where = f"{artifact.folder / MANIFEST}: files"
    graph_files = {artifact.manifest["graphs"][name]["file"] for name in GRAPHS}
    for listed in artifact.manifest["files"]:  # only what the manifest lists, each path contained (containment.py)
        if listed in graph_files:
            continue
        source, target = contained_path(artifact.folder, listed, where), staged_path(scratch, listed, where)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # ONNX Runtime refuses weights behind a symlink that leaves the model's folder; a hard link is in it
            os.link(source.resolve(), target)
        except OSError:  # another file system
            copy_data(source, target)
    watched, kv_watched = {}, {}
    for name in GRAPHS:
        path = artifact.graph_path(name)
        model = onnx.load(path, load_external_data=False)
        watched[name], kv_watched[name] = _linear_inputs(model), _kv_updates(model)
        inputs = {i.name for i in model.graph.input}  # those are observed from the feeds
        extra = [t for t in {**watched[name], **kv_watched[name]} if t not in inputs]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in extra)
        onnx.save(model, staged_path(scratch, artifact.manifest["graphs"][name]["file"], where))
    return replace(artifact, folder=scratch), watched, kv_watched


def calibrate(
    artifact: Artifact,
    calibration: CalibrationSet,
    observer: RangeObserver,
    decode_steps: int = 8,
    threads: int | None = None,
    on_sample: Callable[[int], None] | None = None,
    scratch_parent: Path | None = None,
    kv_observer: RangeObserver | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> RangeObserver:
    """Run every calibration request (prefill + `decode_steps` greedy steps) and record activation ranges; with
    `kv_observer`, also the ranges of the keys and values written into each cache buffer (keyed by its input)."""
    config = artifact.config
    tokenizer = load_tokenizer(artifact.model_dir)
    scratch = Path(tempfile.mkdtemp(prefix=".calibration-", dir=scratch_parent))
    try:
        instrumented, watched, kv_watched = _instrumented_copy(artifact, scratch)
        # attention as exported: the watched activations are the graphs' own tensors, which a fused rewrite removes
        model = OrtModel(instrumented, threads=threads, weights="shared", attention="graph").load()
        counts = {n: len(artifact.manifest["graphs"][n]["outputs"]) for n in GRAPHS}

        def observed(session, name: str) -> _Observed:
            pairs = [(watched[name], observer)] + ([(kv_watched[name], kv_observer)] if kv_observer else [])
            return _Observed(session, counts[name], pairs)

        model.vision = observed(model.vision, "vision_encoder")
        model.prefill_session = observed(model.prefill_session, "decoder_prefill")
        model.step_session = observed(model.step_session, "decoder_step")
        for i, (image, question) in enumerate(calibration.samples()):
            request = make_request(image, question, tokenizer, config, max_image_pixels)  # quantize's flag
            batch = prepare_batch([request], config, artifact.query_len)
            generate(_CalibrationSession(model, batch, decode_steps), GenerationConfig(max_new_tokens=decode_steps))
            if on_sample:
                on_sample(i + 1)
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return observer
