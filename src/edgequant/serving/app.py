"""The FastAPI application: OpenAI-compatible completions, chat and embeddings, health, metrics, auth.

Every error answers in OpenAI's error shape; nothing leaks a traceback or a file path. Admission
is decided before any work: a full queue is a 429 at once, never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from edgequant.errors import EdgequantError
from edgequant.progress import note
from edgequant.runner import GenerateParams
from edgequant.serving.chat import render_chat
from edgequant.serving.config import ServeConfig
from edgequant.serving.embeddings import EmbeddingRequest, EmbeddingWorker, texts_of
from edgequant.serving.embeddings import response as embedding_response
from edgequant.serving.errors import ApiError
from edgequant.serving.metrics import LATENCY_BUCKETS, RATE_BUCKETS, TTFT_BUCKETS, Metrics
from edgequant.serving.scheduling import Delta, Job, ModelWorker, QueueFull, declare_worker_metrics
from edgequant.serving.schemas import ChatRequest, CompletionRequest


def create_app(config: ServeConfig, workers: dict[str, ModelWorker] | None = None):
    """Build the app. Workers (loaded runners) are created at start-up unless given."""
    metrics = _make_metrics()
    state: dict[str, ModelWorker] = {}

    @asynccontextmanager
    async def lifespan(app):
        state.update(workers or _load_workers(config, metrics))
        yield
        for worker in _loaded(state):
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="edgequant", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions, chat and embeddings over edgequant artifacts.")
    app.state.metrics, app.state.workers = metrics, state
    metrics.gauge("edgequant_in_flight_requests", "Requests running or queued, per model",
                  lambda: {(("model", w.name),): w.in_flight for w in _loaded(state)})
    metrics.gauge("edgequant_queue_depth", "Requests waiting in the queue, per model",
                  lambda: {(("model", w.name),): w.queue_depth for w in _loaded(state)})
    metrics.gauge("edgequant_batch_slots", "Requests a model decodes together (1: one at a time)",
                  lambda: {(("model", w.name),): w.slots for w in _loaded(state) if hasattr(w, "slots")})
    metrics.gauge("edgequant_cache_use_ratio", "Share of the model's cache reserved by running requests (prompt plus budget)",
                  lambda: {(("model", w.name),): round(w.cache_use, 4) for w in _loaded(state) if hasattr(w, "cache_use")})

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return JSONResponse(ApiError(500, "internal server error", "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(state)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "edgequant"} for n in sorted(state)]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request):
        body = _validate(EmbeddingRequest, await _json(request, config))
        worker = _worker(state, body.model, EmbeddingWorker)
        vectors, tokens = await worker.embed(texts_of(body))
        metrics.inc("edgequant_prompt_tokens_total", tokens, model=worker.name)
        return embedding_response(worker.name, vectors, tokens, body.encoding_format, body.dimensions)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        body = _validate(CompletionRequest, await _json(request, config))
        worker = _worker(state, body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else _single(body.prompt)
        ids = await asyncio.to_thread(worker.runner.prompt_ids, prompt)
        return await _respond(worker, body, ids, config, metrics, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat(request: Request):
        body = _validate(ChatRequest, await _json(request, config))
        worker = _worker(state, body.model)
        prompt = render_chat(worker.runner, [m.model_dump() for m in body.messages])
        ids = await asyncio.to_thread(worker.runner.prompt_ids, prompt)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _respond(worker, body, ids, config, metrics, chat=True)

    async def _respond(worker, body, ids, config, metrics, chat: bool):
        job = _make_job(worker, body, ids, config)
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"model {body.model} is busy: its queue of {config.max_queue} is full; retry later",
                           "rate_limit_error", code="queue_full") from None
        maker = _ChunkMaker(body.model, chat)
        if body.stream:
            return StreamingResponse(_stream(job, maker, config, metrics, body.model), media_type="text/event-stream")
        text, last = await _collect(job, config)
        _record(metrics, body.model, job, last)
        return maker.full(text, last)

    app.add_middleware(_Guard, config=config, metrics=metrics)
    return app


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _json(request, config: ServeConfig) -> dict:
    raw = await request.body()
    if len(raw) > config.max_body_bytes:
        raise ApiError(413, f"request body is larger than {config.max_body_bytes} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _validate(schema, data: dict):
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{field}: {first['msg']}" if field else first["msg"], param=field) from None


def _single(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise ApiError(400, "prompt must be a string or a list of exactly one string", param="prompt")
    return prompts[0]


def _loaded(state: dict) -> list:
    """Each worker once: artifacts sharing one loaded base are several names for one worker."""
    return list({id(w): w for w in state.values()}.values())


def _worker(state: dict, name: str, kind: type = ModelWorker):
    """The worker serving `name`, of the kind the endpoint needs (a generator or an encoder)."""
    worker = state.get(name)
    if worker is None:
        raise ApiError(404, f"model {name!r} is not served here; see GET /v1/models", param="model", code="model_not_found")
    if not isinstance(worker, kind):
        what, use = (("a sentence encoder", "POST /v1/embeddings") if isinstance(worker, EmbeddingWorker)
                     else ("a text generator", "/v1/completions or /v1/chat/completions"))
        raise ApiError(400, f"model {name!r} is {what}: use {use}", param="model", code="wrong_endpoint")
    return worker


def _make_job(worker: ModelWorker, body, ids: list[int], config: ServeConfig) -> Job:
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    room = worker.runner.n_ctx - len(ids)
    if room <= 0:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {worker.runner.n_ctx}", param="prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else min(config.max_tokens_cap, room)
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    if max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's cap of {config.max_tokens_cap}", param="max_tokens")
    params = GenerateParams(max_tokens=min(max_tokens, room), temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed if body.seed is not None else secrets.randbits(31),  # no seed: a fresh draw, as OpenAI's API
                            adapter=body.model if body.model in worker.adapters else None)
    loop = asyncio.get_running_loop()
    return Job(ids, params, body.stop_list(), loop, asyncio.Queue())


async def _next(job: Job, deadline: float) -> Delta:
    if not job.out.empty():  # already here: no timer to arm
        return job.out.get_nowait()
    remaining = deadline - time.monotonic()
    try:
        async with asyncio.timeout(max(remaining, 0.001)):  # no task per token, as wait_for makes
            return await job.out.get()
    except TimeoutError:
        job.cancelled.set()
        raise ApiError(504, "the request timed out", "timeout_error", code="timeout") from None


async def _collect(job: Job, config: ServeConfig) -> tuple[str, Delta]:
    deadline, parts = time.monotonic() + config.request_timeout_s, []
    while True:
        delta = await _next(job, deadline)
        if delta.error:
            raise ApiError(503, delta.error, "server_error")
        parts.append(delta.text)
        if delta.finish_reason:
            return "".join(parts), delta


async def _stream(job: Job, maker: "_ChunkMaker", config: ServeConfig, metrics: Metrics, model: str) -> AsyncIterator[str]:
    """Server-sent events for one job. The deltas that are waiting go out in one write: a client
    that fell behind, or a step's last text with its finish, costs one send, not one each."""
    deadline, ended = time.monotonic() + config.request_timeout_s, False
    try:
        yield _sse(maker.first())
        while not ended:
            try:
                deltas = [await _next(job, deadline)]
            except ApiError as exc:
                yield _sse(exc.body())
                break
            while not job.out.empty():
                deltas.append(job.out.get_nowait())
            events = []
            for delta in deltas:
                events += _events(delta, maker, metrics, model, job)
                if ended := bool(delta.error or delta.finish_reason):
                    break
            if events:
                yield "".join(events)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client gone mid-stream stops its generation at the next token


def _events(delta: Delta, maker: "_ChunkMaker", metrics: Metrics, model: str, job: Job) -> list[str]:
    """The server-sent events of one delta: its text, its finish (recorded in the metrics), or its error."""
    if delta.error:
        return [_sse(ApiError(503, delta.error, "server_error").body())]
    events = [_sse(maker.chunk(delta.text))] if delta.text else []
    if delta.finish_reason:
        _record(metrics, model, job, delta)
        events.append(_sse(maker.chunk("", delta.finish_reason, delta)))
    return events


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _record(metrics: Metrics, model: str, job: Job, last: Delta) -> None:
    metrics.inc("edgequant_prompt_tokens_total", last.prompt_tokens, model=model)
    if job.first_token_at is not None:
        metrics.observe("edgequant_time_to_first_token_seconds", job.first_token_at - job.enqueued, model=model)
        decode_s = time.perf_counter() - job.first_token_at
        if last.completion_tokens > 1 and decode_s > 0:
            metrics.observe("edgequant_tokens_per_second", (last.completion_tokens - 1) / decode_s, model=model)


class _ChunkMaker:
    """Builds OpenAI response objects for one request: full responses and stream chunks."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def _usage(last: Delta) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}

    def full(self, text: str, last: Delta) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}
            return self._envelope("chat.completion", choice, self._usage(last))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return self._envelope("text_completion", choice, self._usage(last))

    def first(self) -> dict:
        if self.chat:
            return self._envelope("chat.completion.chunk",
                                  {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        return self.chunk("")

    def chunk(self, text: str, finish: str | None = None, last: Delta | None = None) -> dict:
        usage = self._usage(last) if last is not None else None
        if self.chat:
            delta = {"content": text} if text else {}
            return self._envelope("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": finish}, usage)
        return self._envelope("text_completion", {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}, usage)


def _make_metrics() -> Metrics:
    m = Metrics()
    m.counter("edgequant_requests_total", "HTTP requests by path and status code")
    m.histogram("edgequant_request_latency_seconds", "Time from request to the last response byte", LATENCY_BUCKETS)
    m.histogram("edgequant_time_to_first_token_seconds", "Time from admission to the first generated token", TTFT_BUCKETS)
    m.counter("edgequant_prompt_tokens_total", "Prompt tokens processed")
    m.histogram("edgequant_tokens_per_second", "Decode rate of each request", RATE_BUCKETS)
    declare_worker_metrics(m)
    return m


def _load_workers(config: ServeConfig, metrics: Metrics) -> dict:
    """A worker per model, or per base model where artifacts share one (`registry.serving_groups`):
    that worker answers each of their names, decoding with the adapter the name stands for."""
    from edgequant.registry import model_task, open_runner, open_shared_runner, open_task_runner, serving_groups
    from edgequant.sources.tasks import SENTENCE_EMBEDDING, TEXT_GENERATION

    workers = {}
    served = config.served_names()
    for group in serving_groups(config.models):
        names = {served[i]: config.models[i] for i in group}
        name, path = "+".join(names), config.models[group[0]]
        task = model_task(path)
        if task == TEXT_GENERATION:
            runner = (open_runner(path, n_ctx=config.n_ctx, need_logits=False, threads=config.threads) if len(group) == 1
                      else open_shared_runner(names, n_ctx=config.n_ctx, threads=config.threads))
            worker = ModelWorker(name, runner, config.max_queue, metrics, batch=config.batch, batch_ctx=config.cache_tokens,
                                 adapters=tuple(names) if len(group) > 1 else ())
            note(worker.describe())
        elif task == SENTENCE_EMBEDDING:
            worker = EmbeddingWorker(name, open_task_runner(path, threads=config.threads), config.max_queue)
        else:
            raise EdgequantError(f"{path} is a {task} model; the server answers completions, chat and embeddings",
                                 "serve a causal LM or a sentence encoder; run an image classifier with `edgequant eval`")
        workers.update(dict.fromkeys(names, worker))
    return workers


class _Guard:
    """ASGI middleware: API key check, body size cap, and per-request count and latency."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path = time.perf_counter(), _metric_path(scope["path"])
        status = {"code": 500, "counted": False}

        def count(code: str) -> None:
            status["counted"] = True
            self.metrics.inc("edgequant_requests_total", path=path, status=code)
            self.metrics.observe("edgequant_request_latency_seconds", time.perf_counter() - started, path=path)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(str(status["code"]))
            await send(message)

        refusal = self._refuse(scope)
        if refusal is not None:
            return await _send_error(counting_send, refusal)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not status["counted"]:  # the client went away before the last byte (nginx's 499)
                count("499")

    def _refuse(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self._key is not None and scope["path"] not in self.OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + self._key
            if not hmac.compare_digest(given, expected):  # constant time, whatever was sent
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return ApiError(413, f"request body is larger than {self.config.max_body_bytes} bytes")
        return None


def _metric_path(path: str) -> str:
    known = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")
    return path if path in known else "other"  # bounded label values, whatever clients request


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


KEEP_ALIVE_S = 30


def serve(config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests get a grace period, then are cancelled."""
    import uvicorn

    app = create_app(config)
    # An idle kept-alive connection is closed after 30 s, not uvicorn's 5: httpx (the openai
    # client's transport) also drops idle connections after 5 s, and with equal timeouts a client
    # may reuse a connection the server is closing. A longer server timeout leaves the client to
    # close first. (2 of 3103 soak requests failed at once with a connection error on 2026-12-06,
    # the likely cause; a client reusing a connection after 4.95-5.04 s did not reproduce it.)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=10,
                timeout_keep_alive=KEEP_ALIVE_S)
