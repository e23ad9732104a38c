"""The FastAPI application: ``create_app(model, settings)``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/images/generations``,
``GET /health``, ``GET /metrics``. Every error is ``{"error": {"message", "type", "param",
"code"}}``; see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

try:
    import prometheus_client as prom
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"mmllm serve needs FastAPI, uvicorn and prometheus-client ({err}); "
                      "install them with: pip install 'mmllm[serve]'") from None

from .batcher import Batcher, Job, QueueFull
from .protocol import (APIError, StopFilter, bad_request, context_length, cut_at_stop, encode_image, media_fields,
                       prompt_tokens, to_conversation)
from .settings import ServeSettings

log = logging.getLogger("mmllm.serve")
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/images/generations", "/health", "/metrics")
DRAW_PROMPT = "Draw a picture of {prompt}"
IMAGE_TEXT_BUDGET = 16  # tokens the LLM may write before the image's signal tokens are forced
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "response_format", "prediction")
PENALTIES = ("presence_penalty", "frequency_penalty")


# --------------------------------------------------------------------------- request bodies


class MediaSettings(BaseModel):
    """The ``mmllm`` extension object (``extra_body={"mmllm": {...}}`` in the openai client)."""

    model_config = ConfigDict(extra="forbid")
    output_modalities: list[Literal["image", "audio", "video"]] | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    num_frames: int | None = Field(None, ge=1, le=256)
    fps: int | None = Field(None, ge=1, le=120)
    audio_length_in_s: float | None = Field(None, gt=0, le=120)
    media_seed: int | None = None
    max_media: int | None = Field(None, ge=0, le=16)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio", "image", "video"]] | None = None
    audio: dict[str, Any] | None = None
    mmllm: MediaSettings | None = None


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    mmllm: MediaSettings | None = None


# --------------------------------------------------------------------------- helpers


class Metrics:
    """Prometheus series, in a registry of this app's own."""

    def __init__(self, batcher: Batcher):
        self.registry = reg = prom.CollectorRegistry()
        self.requests = prom.Counter("mmllm_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=reg)
        self.latency = prom.Histogram("mmllm_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                      registry=reg)
        self.prompt_tokens = prom.Counter("mmllm_prompt_tokens", "prompt tokens read", registry=reg)
        self.tokens = prom.Counter("mmllm_generated_tokens", "tokens generated", registry=reg)
        self.batch_rows = prom.Histogram("mmllm_batch_rows", "rows per model call", buckets=(1, 2, 4, 8, 16, 32, 64),
                                         registry=reg)
        prom.Gauge("mmllm_queue_depth", "requests waiting for the model", registry=reg).set_function(
            lambda: batcher.queue_depth)
        prom.Gauge("mmllm_running_requests", "requests being decoded", registry=reg).set_function(
            lambda: batcher.running)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class Observe:
    """ASGI middleware: the body-size limit (413) and the request metrics."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]
        start = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        too_large = APIError(413, f"the request body is over this server's {self.max_body / 2**20:g} MB limit; send "
                                  "smaller media, or start the server with a larger --max-body-mb",
                             code="request_too_large")
        received = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise HTTPException(413, too_large.message)
            return message

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _error_response(too_large)(scope, receive, send_status)
            else:
                await self.app(scope, limited_receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _param_of(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


# --------------------------------------------------------------------------- the app


def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``model``; the worker thread runs while the app does."""
    settings = settings or ServeSettings()
    batcher = Batcher(model, settings.max_batch_size, settings.batch_wait_s, settings.max_queue)
    metrics = Metrics(batcher)
    batcher.on_batch = metrics.batch_rows.observe
    created = int(time.time())
    outputs = tuple(getattr(model, "output_modalities", ()) or ())
    groups = getattr(model, "signal_groups", {}) or {}

    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mmllm", description="OpenAI-compatible API for an mmllm model", lifespan=lifespan)
    app.state.batcher, app.state.settings, app.state.metrics = batcher, settings, metrics
    app.add_middleware(Observe, metrics=metrics, max_body=settings.max_body_bytes)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = _param_of(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return _error_response(bad_request("the request body is not valid JSON", None, "invalid_json"))
        message = f"{param}: {first.get('msg', 'invalid value')}"
        if len(err.errors()) > 1:
            message += f" (and {len(err.errors()) - 1} more problem(s))"
        return _error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            err.status_code, "invalid_request_error" if err.status_code < 500 else "server_error")
        message = str(err.detail)
        if err.status_code == 404:
            message = f"no route {request.url.path}; this server has {', '.join(ENDPOINTS)}"
        return _error_response(APIError(err.status_code, message, kind))

    @app.exception_handler(QueueFull)
    async def _full(request, err):
        return _error_response(APIError(429, f"the server is busy: {settings.max_queue} requests are already "
                                             "waiting; retry in a moment", "rate_limit_error", None,
                                        "queue_full"))

    @app.exception_handler(ValueError)  # MediaError and mmllm's own checks
    async def _value(request, err: ValueError):
        return _error_response(bad_request(" ".join(str(err).split()) or type(err).__name__))

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        log.error("request failed", exc_info=err)
        return _error_response(APIError(500, f"internal error ({type(err).__name__}); the server log has the "
                                             "details", "server_error"))

    # ------------------------------------------------------------------ shared checks

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                                "(openai client: api_key=...)", "authentication_error", None, "invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise bad_request(f"model {name!r} is not served here; use {settings.model_name!r} (GET /v1/models "
                              "lists it)", "model", "model_not_found")

    def check_n(n: int) -> None:
        if n > settings.max_n:
            raise bad_request(f"n={n} is over this server's limit of {settings.max_n}", "n")

    def media_sampling(ext: MediaSettings | None, required: set[str]) -> dict:
        """The ``mmllm`` extension -> ``generate`` keywords; checks the limits."""
        ext = ext or MediaSettings()
        values = ext.model_dump(exclude_none=True)
        wanted = set(values.pop("output_modalities", [])) | required
        missing = sorted(wanted - set(outputs))
        if missing:
            raise bad_request(f"this model cannot produce {missing}; it produces {list(outputs) or 'text only'}",
                              "mmllm.output_modalities", "unsupported_modality")
        for side in ("height", "width"):
            if values.get(side, 0) > settings.max_image_side or values.get(side, 8) % 8:
                raise bad_request(f"{side} must be a multiple of 8 up to {settings.max_image_side}", f"mmllm.{side}")
        if values.get("num_inference_steps", 0) > settings.max_inference_steps:
            raise bad_request(f"num_inference_steps is over this server's limit of {settings.max_inference_steps}",
                              "mmllm.num_inference_steps")
        if wanted:
            values["output_modalities"] = sorted(wanted)
        return values

    async def prepare(messages: list) -> tuple[dict, int]:
        """Decode the media and count prompt tokens, off the event loop."""
        def work():
            conv = to_conversation(model, messages, settings)
            return conv, prompt_tokens(model, conv)

        return await run_in_threadpool(work)

    def token_budget(asked: int | None, prompt: int, need: int) -> int:
        context = context_length(model)
        room = context - prompt
        if room < 1:
            raise bad_request(f"the prompt is {prompt} tokens (media included), over the model's context of {context};"
                              " shorten the messages", "messages", "context_length_exceeded")
        if asked is None:
            return max(need, min(settings.default_max_tokens, room))
        if asked > settings.max_tokens:
            raise bad_request(f"max_tokens={asked} is over this server's limit of {settings.max_tokens}; lower it",
                              "max_tokens", "max_tokens_exceeded")
        if prompt + asked > context:
            raise bad_request(f"the prompt ({prompt} tokens) plus max_tokens ({asked}) is over the model's context "
                              f"of {context}; ask for at most {room} tokens or shorten the messages", "max_tokens",
                              "context_length_exceeded")
        if asked < need:
            raise bad_request(f"max_tokens={asked} leaves no room for the requested media, which take {need} signal "
                              "tokens; raise it", "max_tokens")
        return asked

    async def wait(job: Job, request: Request):
        """The job's result; cancels the job when the client disconnects."""
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    return job.future.result()
                if await request.is_disconnected():
                    batcher.cancel(job)
                    return None
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise

    def submit(job: Job) -> Job:
        return batcher.submit(job)

    # ------------------------------------------------------------------ routes

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "mmllm"}

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str):
        if name != settings.model_name:
            raise APIError(404, f"model {name!r} is not served here; use {settings.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        check_n(body.n)
        extra = body.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, [], {}) and not (name == "response_format" and
                                                                     extra[name] == {"type": "text"}):
                raise bad_request(f"{name} is not supported by this server; remove it", name, "unsupported_parameter")
        for name in PENALTIES:
            if extra.get(name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported by this server; remove it or send 0", name,
                                  "unsupported_parameter")
        if body.stream and body.n > 1:
            raise bad_request("stream=true takes n=1; send n separate requests", "n")
        if body.audio and body.audio.get("format", "wav") != "wav":
            raise bad_request("audio.format must be 'wav'", "audio.format")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("stop takes up to 4 non-empty strings", "stop")
        required = set(body.modalities or []) - {"text"}
        if body.mmllm and body.mmllm.output_modalities:
            required |= set(body.mmllm.output_modalities)
        sampling = media_sampling(body.mmllm, required)
        sampling.update(temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p)
        conv, n_prompt = await prepare(body.messages)
        need = sum(len(groups[m]) for m in required)
        max_tokens = token_budget(body.max_completion_tokens or body.max_tokens, n_prompt, need)
        job = submit(Job(rows=[conv] * body.n, max_tokens=max_tokens, sampling=sampling, seed=body.seed,
                         required=frozenset(required), stream=body.stream))
        metrics.prompt_tokens.inc(n_prompt * body.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_chat(job, rid, now, stop, n_prompt, max_tokens, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await wait(job, request)
        if results is None:
            return Response(status_code=499)
        choices, completion = [], 0
        for i, result in enumerate(results):
            text, stopped = cut_at_stop(result.text, stop)
            completion += len(result.token_ids)
            metrics.tokens.inc(len(result.token_ids))
            message = {"role": "assistant", "content": text, "refusal": None}
            if not stopped:
                message.update(await run_in_threadpool(media_fields, result, text))
            finish = "stop" if stopped or len(result.token_ids) < max_tokens else "length"
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
                "choices": choices, "system_fingerprint": None,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                          "total_tokens": n_prompt + completion}}

    async def stream_chat(job: Job, rid: str, now: int, stop: list[str], n_prompt: int, max_tokens: int,
                          include_usage: bool):
        def event(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> str:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name,
                     "system_fingerprint": None,
                     "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                           "logprobs": None}]}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        finished = False
        try:
            yield event({"role": "assistant", "content": ""})
            words, result, failure = StopFilter(stop), None, None
            while True:
                item = await job.pieces.get()
                if isinstance(item, BaseException):
                    failure = item
                    break
                if isinstance(item, list):
                    result = item[0]
                    break
                text = words.feed(item)
                if text:
                    yield event({"content": text})
                if words.stopped:
                    job.cancel()
                    break
            finished = True
            if failure is not None:
                err = (bad_request(" ".join(str(failure).split())) if isinstance(failure, ValueError)
                       else APIError(500, f"internal error ({type(failure).__name__}); the server log has the "
                                          "details", "server_error"))
                if not isinstance(failure, ValueError):
                    log.error("streamed request failed", exc_info=failure)
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            rest = words.flush()
            if rest:
                yield event({"content": rest})
            if result is not None:
                completion = len(result.token_ids)
                media = await run_in_threadpool(media_fields, result, result.text)
                if media:
                    yield event(media)
                finish = "stop" if completion < max_tokens else "length"
            else:  # cut at a stop string
                completion = len(model.tokenizer(words.seen, add_special_tokens=False)["input_ids"])
                finish = "stop"
            metrics.tokens.inc(completion)
            yield event({}, finish)
            if include_usage:
                yield event(None, usage={"prompt_tokens": n_prompt, "completion_tokens": completion,
                                         "total_tokens": n_prompt + completion})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                batcher.cancel(job)  # the client went away

    @v1.post("/images/generations")
    async def images_generations(body: ImageRequest, request: Request):
        check_model(body.model)
        check_n(body.n)
        if "image" not in outputs:
            raise bad_request(f"this model has no image decoder (it produces {list(outputs) or 'text only'}); "
                              "serve a model with an image output", "model", "unsupported_modality")
        if body.response_format not in (None, "b64_json"):
            raise bad_request("response_format must be 'b64_json': this server keeps no files to link to, so "
                              "images come back inline", "response_format")
        if body.output_format not in (None, "png"):
            raise bad_request("output_format must be 'png'", "output_format")
        ext = body.mmllm.model_copy() if body.mmllm else MediaSettings()
        if body.size not in (None, "auto"):
            try:
                w, h = (int(v) for v in body.size.lower().split("x"))
            except ValueError:
                raise bad_request(f"size {body.size!r} must look like '256x256' (width x height)", "size") from None
            ext.width, ext.height = w, h
        ext.output_modalities = ["image"]
        sampling = media_sampling(ext, {"image"})
        sampling.update(temperature=0.0, top_p=1.0)  # the LLM's reading of the prompt; the noise varies the images
        conv = {"prompt": DRAW_PROMPT.format(prompt=body.prompt.strip()), "history": []}
        n_prompt = await run_in_threadpool(prompt_tokens, model, conv)
        need = len(groups["image"])
        max_tokens = token_budget(need + IMAGE_TEXT_BUDGET if n_prompt + need + IMAGE_TEXT_BUDGET <=
                                  context_length(model) else need, n_prompt, need)
        job = submit(Job(rows=[conv] * body.n, max_tokens=max_tokens, sampling=sampling,
                         seed=body.mmllm.media_seed if body.mmllm else None, required=frozenset({"image"})))
        metrics.prompt_tokens.inc(n_prompt * body.n)
        results = await wait(job, request)
        if results is None:
            return Response(status_code=499)
        data = []
        for result in results:
            metrics.tokens.inc(len(result.token_ids))
            if not result.images:
                raise APIError(500, "the model produced no image for this prompt", "server_error")
            data.append({"b64_json": await run_in_threadpool(encode_image, result.images[0])})
        return {"created": int(time.time()), "data": data}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue_depth": batcher.queue_depth,
                "running": batcher.running}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    return app
