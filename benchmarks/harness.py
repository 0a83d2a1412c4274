"""Timing one request end to end, stage by stage, on any backend behind the seam and on the text-only peers.

A request is timed as a user sees it:
- `preprocess`: image decode, static_hd crops, tokenization, batching (host);
- `session`: per-request set-up, e.g. allocating the KV cache;
- `vision_encoder`, `decoder_prefill`: the two halves of the prefill, device-synchronised by the backend;
- `ttft` = preprocess + session + vision_encoder + decoder_prefill (time to the first token);
- each decode step: the greedy choice of its token and the step (synchronised, so a GPU step is not credited
  to the next one), as onnxruntime-genai's `generate_next_token` and the transformers peer's loop time theirs;
  and `end_to_end`.
Contenders run round-robin, one request each per round, so a noisy machine slows them alike; the first
`warmup` rounds are dropped.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference_model.errors import FusionError


@dataclass(frozen=True)
class BenchSettings:
    batch: int = 1
    prompt_len: int = 1040  # total positions: image tokens + latents + text
    new_tokens: int = 64
    query_len: int | None = None  # None: the backend's own (graphs) or the checkpoint's default
    warmup: int = 1
    iters: int = 3
    threads: int = 2
    image: Path | None = None  # None: the bundled demo picture


@dataclass
class Sample:
    stages: dict[str, float]
    steps: list[float]

    @property
    def tokens_per_s(self) -> float:
        return len(self.steps) / sum(self.steps) if self.steps else 0.0

    @classmethod
    def of_request(cls, parts: dict[str, float], steps: list[float]) -> Sample:
        """A request's stage times (the parts up to the first token) completed with ttft (their sum), decode and
        end_to_end: every contender totals them the same way."""
        stages = {**parts, "ttft": sum(parts.values()), "decode": sum(steps)}
        stages["end_to_end"] = stages["ttft"] + stages["decode"]
        return cls(stages, steps)


@dataclass
class Stats:
    median: float
    p10: float
    p90: float
    p99: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stats:
        ordered = sorted(values)

        def q(p: float) -> float:
            return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

        return Stats(statistics.median(ordered), q(0.1), q(0.9), q(0.99), len(ordered))


def question_for_positions(target: int, tokenizer, config, query_len: int) -> str:
    """A question whose prompt fills `target` positions (image tokens + latents + text), found by search."""
    from reference_model.prompt import prompt_ids

    def positions(question: str) -> int:
        return len(prompt_ids(question, tokenizer)) - 2 + config.vision.num_patches + query_len

    base, unit = "Describe the picture", " and every detail in it"
    lo, hi = 0, 1
    if positions(base) > target:
        raise FusionError(f"--prompt-len {target}: the shortest prompt already has {positions(base)} positions")
    longest = positions(base) + config.max_question_tokens  # an over-estimate: the search below stays bounded
    if target > longest:
        raise FusionError(
            f"--prompt-len {target}: longer than any prompt this model reads (about {longest} positions: questions "
            f"of at most {config.max_question_tokens} tokens)"
        )
    while positions(base + unit * hi) < target:
        lo, hi = hi, hi * 2
    while lo < hi - 1:  # the longest repetition that stays at or below the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if positions(base + unit * mid) <= target else (lo, mid)
    question = base + unit * lo
    question += " x" * ((target - positions(question)) // 2)  # pad with two-token words (space, letter)
    return question + "." * max(0, target - positions(question + "."))


@dataclass
class BackendContender:
    """One of our backends (reference, onnxruntime, tensorrt) driven request by request."""

    label: str
    backend: Any
    settings: BenchSettings
    query_len: int = 0
    question: str = ""
    load_s: float = 0.0
    rss_after_load: int = 0
    capacity: int | None = None
    text_only: bool = False

    def prepare(self) -> None:
        from engines.backends import backend_query_len
        from reference_model.prompt import load_tokenizer

        from .machine import rss_bytes

        self.query_len = backend_query_len(self.backend, self.settings.query_len)
        self.tokenizer = load_tokenizer(self.backend.model_dir)
        self.question = question_for_positions(
            self.settings.prompt_len, self.tokenizer, self.backend.config, self.query_len
        )
        start = time.perf_counter()
        self.backend.load()
        self.load_s = time.perf_counter() - start
        self.rss_after_load = rss_bytes()[0]

    def run(self, new_tokens: int | None = None) -> Sample:
        from fusion_export.bundled import DEMO_IMAGE
        from reference_model import make_request, prepare_batch
        from reference_model.generation import greedy_tokens

        settings, backend = self.settings, self.backend
        new_tokens = new_tokens or settings.new_tokens
        start = time.perf_counter()
        request = make_request(settings.image or DEMO_IMAGE, self.question, self.tokenizer, backend.config)
        batch = prepare_batch([request] * settings.batch, backend.config, self.query_len)
        preprocess = time.perf_counter() - start
        start = time.perf_counter()
        session = backend.session(batch, new_tokens)
        self.capacity = session.state.capacity if hasattr(session, "state") else None
        session_s = time.perf_counter() - start
        logits = session.prefill()
        stages = {"preprocess": preprocess, "session": session_s, **session.stage_seconds}
        steps = []
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()  # the token's choice included, as in the peers' steps
            tokens = greedy_tokens(logits)
            logits = session.step(tokens)
            session.synchronize()
            steps.append(time.perf_counter() - begin)
        return Sample.of_request(stages, steps)

    @property
    def kind(self) -> str:
        return self.backend.kind

    def precision_name(self) -> str:
        return self.backend.precision.value if self.backend.precision is not None else self.backend.dtype

    def retarget(self, settings: BenchSettings) -> None:
        """Another prompt length (the sweep): a new question, the same loaded backend."""
        self.settings = settings
        self.question = question_for_positions(settings.prompt_len, self.tokenizer, self.backend.config, self.query_len)

    def kv_columns(self, context: int) -> float:
        """KV columns a step reads: the valid ones (on average over the request's steps) for a backend whose
        attention reads only those, else the whole buffer (graphs attending over all of it under a mask)."""
        if self.backend.attends_to_valid_columns:
            return context + self.settings.new_tokens / 2
        return self.capacity or context + self.settings.new_tokens

    def weight_value_bytes(self) -> float:
        return {"fp32": 4, "fp16": 2, "bf16": 2}[self.precision_name()]

    def weight_bytes(self) -> float | None:
        """Quantized weights: the bytes a decode step reads as stored (INT8 layers, float LM head...): the engine
        folder's count (the build plan's, from the graphs it was built from), else the step graph's own."""
        if self.backend.quantization is None:
            return None
        recorded = getattr(self.backend, "step_weight_bytes", None)  # engine folders carry no graphs
        if recorded is not None:
            return recorded
        from .roofline import graph_weight_bytes

        return graph_weight_bytes(self.backend.artifact.graph_path("decoder_step"))

    def kv_value_bytes(self) -> float:
        if self.backend.kv_int8_scales is not None:
            return 1  # an INT8 KV cache
        return self.weight_value_bytes()


@dataclass
class Result:
    label: str
    kind: str
    precision: str
    text_only: bool
    samples: list[Sample] = field(default_factory=list)
    load_s: float = 0.0
    rss_after_load: int = 0
    roofline: Any = None

    def stage_stats(self) -> dict[str, Stats]:
        names = self.samples[0].stages if self.samples else {}
        return {name: Stats.of([s.stages[name] for s in self.samples]) for name in names}

    def step_stats(self) -> Stats:
        return Stats.of([t for s in self.samples for t in s.steps])

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(s.tokens_per_s for s in self.samples)


def run_rounds(
    contenders: list[Any], settings: BenchSettings, progress=None, probe=None
) -> tuple[list[Result], list[float]]:
    """Round-robin: every contender runs one request per round; warm-up rounds are dropped. `probe` (e.g. the
    memory-bandwidth measurement) runs at the start of every timed round, so it sees the machine as that round's
    contenders do: (results, the probe's value per timed round)."""
    results = [
        Result(c.label, c.kind, c.precision_name(), c.text_only, load_s=c.load_s, rss_after_load=c.rss_after_load)
        for c in contenders
    ]
    probed: list[float] = []
    total = settings.warmup + settings.iters
    for round_no in range(total):
        if probe is not None and round_no >= settings.warmup:
            probed.append(probe())
        for contender, result in zip(contenders, results):
            sample = contender.run()
            if round_no >= settings.warmup:
                result.samples.append(sample)
            if progress:
                tag = "warm-up" if round_no < settings.warmup else f"round {round_no - settings.warmup + 1}"
                progress(
                    f"[{round_no + 1}/{total}] {contender.label} ({tag}): ttft {sample.stages['ttft'] * 1e3:.0f} ms, "
                    f"{sample.tokens_per_s:.1f} tok/s"
                )
    return results, probed


def sweep_decode(contenders: list[Any], settings: BenchSettings, contexts: list[int], progress=None) -> dict:
    """Median decode-step latency vs context length; a contender whose fixed capacity is too small is skipped."""
    from dataclasses import replace

    out: dict[str, dict[int, float | None]] = {c.label: {} for c in contenders}
    for context in contexts:
        for contender in contenders:
            fitted = replace(settings, prompt_len=context, new_tokens=17)
            try:
                contender.retarget(fitted)
                steps = [t for _ in range(2) for t in contender.run(17).steps]
                out[contender.label][context] = statistics.median(steps)
            except FusionError as e:
                out[contender.label][context] = None
                if progress:
                    progress(f"sweep {contender.label} @ {context}: skipped ({e})")
                continue
            if progress:
                progress(f"sweep {contender.label} @ {context}: {out[contender.label][context] * 1e3:.2f} ms/step")
    return out
