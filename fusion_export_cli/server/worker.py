"""The one thread that runs the model: requests queue, and those waiting when a batch starts share its prefill and
every decode step, up to the folder's batch limit (the graphs and engines take left-padded batches).

Each row samples from its own seeded generator and ends on its own (its end-of-turn token, its max_tokens, a stop
string, or its client gone), so a request gets the tokens it gets alone (`reference_model.generation.generate`
with one config per row). Results reach the event loop through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engines.pipeline import Pipeline, TextPieces
from reference_model.errors import FusionError

from .chat import ApiError, ChatJob

_STOP = object()


@dataclass
class Event:
    kind: str  # "text" (a piece), "done" (finish_reason, usage), "error" (ApiError)
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    error: ApiError | None = None


class Job:
    """A request on its way through the worker: its events, and whether its client is still there."""

    def __init__(self, chat: ChatJob, request: Any, loop: asyncio.AbstractEventLoop):
        self.chat, self.request, self.loop = chat, request, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.queued_at = time.perf_counter()
        self.first_token_at: float | None = None

    def emit(self, event: Event) -> None:  # from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    def __init__(self, pipeline: Pipeline, max_queue: int, metrics: Any, batch_window_s: float = 0.05):
        """`batch_window_s`: how long a batch waits for more requests after its first (clients that each send
        their next request as their last is answered arrive a few ms apart; without the wait they would run alone)."""
        self.pipeline, self.max_queue, self.metrics = pipeline, max_queue, metrics
        self.batch_window_s = batch_window_s
        self.queue: queue.Queue = queue.Queue()
        self.waiting = 0  # jobs queued, not yet in a batch
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="fusion-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """No new batch; jobs still waiting are told the server is going away."""
        self.queue.put(_STOP)
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
            self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        self.queue.put(job)

    def _take(self) -> list[Job] | None:
        first = self.queue.get()
        batch = [first]
        deadline = time.perf_counter() + self.batch_window_s
        while batch[-1] is not _STOP and len(batch) < self.pipeline.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
            except queue.Empty:
                break
        stop = _STOP in batch
        jobs = [j for j in batch if j is not _STOP]
        with self.lock:
            self.waiting -= len(jobs)
        self.metrics.queue_depth.set(self.waiting)
        if stop:
            for job in jobs:
                job.emit(Event("error", error=ApiError(503, "the server is shutting down", code="shutting_down")))
            return None
        return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                self._batch(jobs)

    def _batch(self, jobs: list[Job]) -> None:
        from reference_model import generate

        p = self.pipeline
        texts = [TextPieces(p.tokenizer) for _ in jobs]
        scanners = [StopScanner(j.chat.stops) for j in jobs]
        try:
            configs = [p.generation_config(j.chat.sampling) for j in jobs]
            batch, session = p.open_session([j.request for j in jobs], max(c.max_new_tokens for c in configs))
        except FusionError as e:  # a limit of this folder (prompt, KV capacity): the request's fault
            for job in jobs:
                job.emit(Event("error", error=ApiError(400, str(e), code="request_too_large")))
            return
        stopped = [False] * len(jobs)

        def on_token(row: int, token: int) -> None:
            job = jobs[row]
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                self.metrics.ttft.observe(job.first_token_at - job.queued_at)
            if stopped[row]:
                return
            piece, stopped[row] = scanners[row].feed(texts[row].add(token))
            if piece:
                job.emit(Event("text", text=piece))

        def cancelled(row: int) -> bool:
            return stopped[row] or jobs[row].cancelled

        started = time.perf_counter()
        try:
            out = generate(session, configs, on_token=on_token, cancelled=cancelled)
        except FusionError as e:
            for job in jobs:
                job.emit(Event("error", error=ApiError(500, f"generation failed: {e}", code="generation_failed")))
            self.metrics.errors.labels("generation").inc()
            return
        seconds = time.perf_counter() - started
        generated = sum(len(ids) for ids in out.token_ids)
        self.metrics.tokens.inc(generated)
        self.metrics.batch_rows.observe(len(jobs))
        self.metrics.decode_tokens.inc(sum(max(0, len(ids) - 1) for ids in out.token_ids))
        self.metrics.decode_seconds.inc(out.timings["decode_s"])
        if seconds > 0:
            self.metrics.tokens_per_s.observe(generated / seconds)
        for row, job in enumerate(jobs):
            if not stopped[row]:
                piece, stopped[row] = scanners[row].feed(texts[row].rest())
                if piece := piece + ("" if stopped[row] else scanners[row].rest()):
                    job.emit(Event("text", text=piece))
            ids, reason = out.token_ids[row], out.finish_reasons[row]
            reason = "stop" if stopped[row] or reason == "stop" else reason
            usage = {"prompt_tokens": int(batch.layout.lengths[row]), "completion_tokens": len(ids),
                     "total_tokens": int(batch.layout.lengths[row]) + len(ids)}  # fmt: skip
            job.emit(Event("done", finish_reason=reason, usage=usage))


class StopScanner:
    """A row's text against its stop strings: text that could still be the start of a stop string is held back, so
    a stop string split over tokens is never half sent; on a hit, the text before it, and the row ends."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def rest(self) -> str:
        """At the end: what was held back (no stop string came)."""
        text, self.pending = self.pending, ""
        return text
