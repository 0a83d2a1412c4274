"""The OpenAI-compatible HTTP server (`fusion-export serve`): FastAPI on uvicorn.

    POST /v1/chat/completions   a question about one image (data: URL, or a file under --allow-images-from);
                                `stream: true` answers with server-sent events in OpenAI's chunk format, [DONE] last
    GET  /v1/models             the one model this server holds
    GET  /health, /ready        the process is up / the model is loaded and requests are taken
    GET  /metrics               Prometheus: requests by status, queue depth, time to first token, tokens/s, errors

Every error is OpenAI's JSON shape with a status that says whose fault it is (4xx: the request, naming the field
or limit; 429 with Retry-After: the queue is full; 5xx: ours). A client that goes away frees its row at the
model's next step. An API key, when set, is required on every /v1 route (Authorization: Bearer KEY).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from engines.pipeline import Pipeline
from reference_model.errors import FusionError

from .chat import ApiError, ChatRequest, Limits, read_chat
from .worker import Job, Worker


@dataclass
class ServerSettings:
    model_id: str
    limits: Limits
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 30_000_000
    request_timeout_s: float = 600.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fusion_requests", "chat requests answered, by HTTP status", ["status"], registry=r)
        self.queue_depth = Gauge("fusion_queue_depth", "requests waiting for a batch", registry=r)
        self.ttft = Histogram("fusion_time_to_first_token_seconds", "from queueing to the first token", registry=r)
        self.tokens = Counter("fusion_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Histogram("fusion_batch_tokens_per_second", "generated tokens per second, per batch",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)  # fmt: skip
        self.errors = Counter("fusion_errors", "errors by kind", ["kind"], registry=r)


def create_app(pipeline: Pipeline, settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    worker = Worker(pipeline, settings.max_queue, metrics)
    state = {"ready": False}

    async def lifespan(app: FastAPI):
        worker.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await run_in_threadpool(worker.stop, 30.0)

    app = FastAPI(title="fusion-export", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics = worker, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size first (a Content-Length over the limit is refused unread; a chunked body is counted as it
        comes), then the API key on /v1 routes."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            too_large = f"the request body is over {settings.max_body_bytes} bytes (--max-body-bytes)"
            return _error(ApiError(413, too_large, code="body_too_large"))
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return _error(ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                       code="invalid_api_key"))  # fmt: skip
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        metrics.requests.labels("400").inc()
        return _error(ApiError(400, f"{where}: {first.get('msg')}", where or None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        metrics.requests.labels(str(error.status)).inc()
        return _error(error)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "model": settings.model_id}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                            "owned_by": "fusion-export"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if body.model != settings.model_id:
            raise ApiError(404, f"model {body.model!r}: this server holds {settings.model_id!r}", "model",
                           "model_not_found")  # fmt: skip
        if not state["ready"]:
            raise ApiError(503, "the server is not ready", code="not_ready")
        job_spec = read_chat(body, settings.limits)
        try:  # tokenizing and decoding the image: off the event loop, before the request queues
            prepared = await run_in_threadpool(pipeline.prepare, job_spec.image, job_spec.question)
        except FusionError as e:
            raise ApiError(400, str(e), "messages") from None
        job = Job(job_spec, prepared, asyncio.get_running_loop())
        worker.submit(job)
        reply = Reply(settings.model_id)
        if job_spec.stream:
            return StreamingResponse(_stream(job, reply, request, settings, metrics), media_type="text/event-stream")
        return await _complete(job, reply, request, settings, metrics)

    return app


class Reply:
    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage is not None and not delta and finish_reason is None else [
            {"index": 0, "delta": delta, "finish_reason": finish_reason}]  # fmt: skip
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _next(job: Job, request: Request, deadline: float):
    """The job's next event, watching for the client leaving and the request's deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancelled = True
            raise ApiError(504, "the request took longer than the server's --request-timeout", code="timeout")
        try:
            return await asyncio.wait_for(job.events.get(), timeout=min(0.5, remaining))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise asyncio.CancelledError from None


async def _complete(job: Job, reply: Reply, request: Request, settings: ServerSettings, metrics: Metrics):
    deadline, text = time.monotonic() + settings.request_timeout_s, []
    try:
        while True:
            event = await _next(job, request, deadline)
            if event.kind == "text":
                text.append(event.text)
            elif event.kind == "error":
                raise event.error
            else:
                break
    except asyncio.CancelledError:
        metrics.requests.labels("499").inc()  # the client went away: nobody to answer
        raise
    metrics.requests.labels("200").inc()
    return {"id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": event.finish_reason}],
            "usage": event.usage}  # fmt: skip


async def _stream(job: Job, reply: Reply, request: Request, settings: ServerSettings, metrics: Metrics):
    deadline = time.monotonic() + settings.request_timeout_s
    status = "200"
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await _next(job, request, deadline)
            if event.kind == "text":
                yield reply.chunk({"content": event.text})
            elif event.kind == "error":
                status = str(event.error.status)
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            else:
                yield reply.chunk({}, event.finish_reason)
                if job.chat.include_usage:
                    yield reply.chunk({}, usage=event.usage)
                break
        yield "data: [DONE]\n\n"
    except ApiError as e:
        status = str(e.status)
        yield f"data: {json.dumps(e.body())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        job.cancelled = True
        raise
    finally:
        job.cancelled = True  # nothing more is read: the worker drops the row at its next step
        metrics.requests.labels(status).inc()


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
