"""The one thread that runs the model: requests queue, and those waiting when a batch starts share its prefill and
every decode step, up to the folder's batch limit (the graphs and engines take left-padded batches).

Each row samples from its own seeded generator and ends on its own (its end-of-turn token, its max_tokens, a stop
string, or its client gone), so a request gets the tokens it gets alone (`reference_model.generation.generate`
with one config per row). Results reach the event loop through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines.pipeline import Pipeline, TextPieces
from reference_model.errors import FusionError
from reference_model.generation import GenerationError, NonFiniteError

from .chat import ApiError, ChatJob
from .kept_conversations import KeptConversations

_STOP = object()


def _heap_trimmer():
    """glibc's malloc_trim, or None (another C library): hands the free pages of every malloc arena back to the OS."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


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
    def __init__(self, pipeline: Pipeline, max_queue: int, metrics: Any, batch_window_s: float = 0.05,
                 conversation_bytes: int = 512 << 20):  # fmt: skip
        """`batch_window_s`: how long a batch waits for more requests after its first (clients that each send
        their next request as their last is answered arrive a few ms apart; without the wait they would run alone).
        `conversation_bytes`: the KV columns kept for conversations to continue (0: none kept)."""
        self.pipeline, self.max_queue, self.metrics = pipeline, max_queue, metrics
        self.batch_window_s = batch_window_s
        self.kept = KeptConversations(conversation_bytes)
        self.queue: queue.Queue = queue.Queue()
        self.waiting = 0  # jobs queued, not yet in a batch
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="fusion-worker", daemon=True)
        self.trim_heap = _heap_trimmer()

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
            self.metrics.busy.set(1 if jobs else 0)
            first_turns = [j for j in jobs if not j.chat.history]
            if first_turns:
                self._guarded(self._batch, first_turns)
            for job in jobs:  # a later turn continues its own kept state: a batch of one
                if job.chat.history and not job.cancelled:
                    self._guarded(self._follow_up, [job])
            self.metrics.kept_bytes.set(self.kept.used)
            if jobs and self.trim_heap is not None:
                # A batch's buffers (its KV cache, the vision and prefill sessions' activations, sized by its rows
                # and prompts) are freed into the worker's malloc arenas, which keep the pages: without the trim a
                # soak's resident memory crept up with the mix of batch shapes (about 800 MB of free pages held)
                self.trim_heap(0)
            self.metrics.busy.set(0)

    def _guarded(self, work: Callable[[list[Job]], None], jobs: list[Job]) -> None:
        """Run a batch; whatever it raises is answered to its jobs and the worker goes on with the next one."""
        try:
            work(jobs)
        except FusionError as e:  # a request's or a folder's limit, or a stage that produced NaN
            self._fail(jobs, e)
        except Exception as e:  # a fault of ours or of a runtime: the request gets a 500, the server stays up
            traceback.print_exc(file=sys.stderr)
            self._fail(jobs, e)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        if isinstance(error, NonFiniteError) or not isinstance(error, FusionError):
            self.metrics.errors.labels("generation" if isinstance(error, NonFiniteError) else "internal").inc()
            code = "generation_failed" if isinstance(error, NonFiniteError) else "internal_error"
            api = ApiError(500, f"generation failed: {error}", code=code)
        else:
            code = "request_too_large" if isinstance(error, GenerationError) else "invalid_request"
            api = ApiError(400, str(error), "messages", code=code)
        for job in jobs:
            job.emit(Event("error", error=api))

    def _follow_up(self, jobs: list[Job]) -> None:
        (job,) = jobs
        chat = job.chat
        kept = self.kept.get(chat.image_digest, chat.history)
        conversation = self.pipeline.conversation(chat.image, chat.history)
        conversation.state = kept
        self.metrics.turns.labels("kept" if kept is not None else "recomputed").inc()
        row = _Row(job, self.pipeline, self.metrics)
        started = time.perf_counter()
        answer = conversation.ask(chat.question, chat.sampling, on_token=lambda _, token: row.token(token),
                                  cancelled=lambda _: row.ended or job.cancelled,
                                  keep=self.kept.budget > 0)  # fmt: skip
        self._count([answer.token_ids], answer.timings, time.perf_counter() - started, 1)
        row.finish(answer.token_ids, answer.finish_reason, answer.prompt_positions)
        if row.keeps(answer.finish_reason):
            # the turn before is a prefix of this one: one conversation holds one state, its latest
            self.kept.replace(chat.image_digest, chat.history, [*chat.history, (chat.question, answer.text)],
                              conversation.state)  # fmt: skip

    def _count(self, token_ids: list[list[int]], timings: dict[str, float], seconds: float, rows: int) -> None:
        generated = sum(len(ids) for ids in token_ids)
        self.metrics.tokens.inc(generated)
        self.metrics.batch_rows.observe(rows)
        self.metrics.decode_tokens.inc(sum(max(0, len(ids) - 1) for ids in token_ids))
        self.metrics.decode_seconds.inc(timings["decode_s"])
        if seconds > 0:
            self.metrics.tokens_per_s.observe(generated / seconds)

    def _batch(self, jobs: list[Job]) -> None:
        from reference_model import generate
        from reference_model.conversation import turn_state

        p = self.pipeline
        rows = [_Row(job, p, self.metrics) for job in jobs]
        configs = [p.generation_config(j.chat.sampling) for j in jobs]
        # a limit of this folder (prompt, KV capacity) is the requests' fault: 400 (_fail)
        batch, session = p.open_session([j.request for j in jobs], max(c.max_new_tokens for c in configs))
        started = time.perf_counter()
        out = generate(session, configs, on_token=lambda row, token: rows[row].token(token),
                       cancelled=lambda row: rows[row].ended or jobs[row].cancelled)  # fmt: skip
        self._count(out.token_ids, out.timings, time.perf_counter() - started, len(jobs))
        for index, (row, job) in enumerate(zip(rows, jobs)):
            ids, reason = out.token_ids[index], out.finish_reasons[index]
            row.finish(ids, reason, int(batch.layout.lengths[index]))
            if self.kept.budget and row.keeps(reason):
                state = turn_state(session, index, ids)
                self.kept.replace(job.chat.image_digest, None, [(job.chat.question, row.text.text)], state)


class _Row:
    """One request's tokens on their way to its client: text pieces, stop strings, the first token's time."""

    def __init__(self, job: Job, pipeline: Pipeline, metrics: Any):
        self.job, self.metrics = job, metrics
        self.text, self.scanner = TextPieces(pipeline.tokenizer), StopScanner(job.chat.stops)
        self.ended = False  # a stop string was hit

    def token(self, token: int) -> None:
        job = self.job
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(job.first_token_at - job.queued_at)
        if self.ended:
            return
        piece, self.ended = self.scanner.feed(self.text.add(token))
        if piece:
            job.emit(Event("text", text=piece))

    def finish(self, ids: list[int], reason: str, prompt_tokens: int) -> None:
        if not self.ended:
            piece, self.ended = self.scanner.feed(self.text.rest())
            if piece := piece + ("" if self.ended else self.scanner.rest()):
                self.job.emit(Event("text", text=piece))
        reason = "stop" if self.ended or reason == "stop" else reason
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                 "total_tokens": prompt_tokens + len(ids)}  # fmt: skip
        self.job.emit(Event("done", finish_reason=reason, usage=usage))

    def keeps(self, reason: str) -> bool:
        """Whether the turn can be continued: the client got the whole answer (no stop string cut its text, which
        the kept ids would then not match) and it was not cancelled."""
        return not self.ended and reason != "cancelled" and not self.job.cancelled


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
