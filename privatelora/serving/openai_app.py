"""The OpenAI-compatible HTTP API of a device (FastAPI): what local LLM servers speak, so
apps written against the OpenAI client work unchanged, and their prompts and outputs stay
on the device.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streaming as server-sent events ending in ``data: [DONE]``), ``GET /health``. ``model``
names the base model or one of the user's adapters. Honoured: ``max_tokens`` (chat:
also ``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``stream``, ``stream_options.include_usage``, ``echo`` (completions), several prompts in
one completion request. Parameters that would change the output and are not
implemented (``logprobs``, penalties, ``logit_bias``, tools, ...) are refused with a 400
rather than ignored. Errors have OpenAI's shape: ``{"error": {"message", "type",
"param", "code"}}`` with the matching status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from privatelora.runtime.prompts import PromptError
from privatelora.serving.device_service import CloudFailed, DeviceService, ModelNotFound, Request

log = logging.getLogger(__name__)
MAX_STOP = 4          # as OpenAI
MAX_CHOICES = 16      # n x prompts in one request: each is one cloud session


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")       # unknown fields are ignored, as OpenAI's API does
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatBody(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None


def _unsupported(body: _Common, extra: dict) -> None:
    checks = {"presence_penalty": body.presence_penalty != 0, "frequency_penalty": body.frequency_penalty != 0,
              "logit_bias": bool(body.logit_bias), **extra}
    for param, bad in checks.items():
        if bad:
            raise APIError(400, f"{param} is not supported by this server", param=param, code="unsupported_parameter")


def _stops(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} sequences", param="stop")
    return tuple(s for s in stops if s)


def _usage(prompt_tokens: int, completions) -> dict:
    out = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream_error(e: Exception) -> APIError:
    if isinstance(e, CloudFailed):
        return APIError(503, str(e), "server_error", code=e.code)
    if isinstance(e, PromptError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error")


def create_app(service: DeviceService, *, api_key: str | None = None, manage: bool = True) -> FastAPI:
    """The app serving ``service``. With ``manage``, the app starts and stops the service
    with its own lifespan (the CLI); tests that start it themselves pass False."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if manage:
            await service.start()
        try:
            yield
        finally:
            if manage:
                await service.stop()

    app = FastAPI(title="privatelora device API", lifespan=lifespan,
                  description="OpenAI-compatible API of a PrivateLoRA device: prompts and outputs stay here.")
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def on_api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid" or not loc:
            return error_response(APIError(400, f"the request body is not valid JSON for this endpoint: {msg}"))
        return error_response(APIError(400, f"{'.'.join(loc)}: {msg}", param=loc[0]))

    @app.exception_handler(Exception)
    async def on_bug(_request, e: Exception):
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error",
                                       code="internal_error"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    def _model(name: str) -> None:
        try:
            service.part(name)
        except ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "privatelora",
                 "root": service.base_name, "parent": None if name == service.base_name else service.base_name}
                for name in service.parts]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _model(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "privatelora"}

    def _requests(body: _Common, prompts: list[list[int]], max_default) -> list[Request]:
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"n x prompts is {len(prompts) * body.n}; at most {MAX_CHOICES} per request",
                           param="n")
        stops, out = _stops(body.stop), []
        for ids in prompts:
            if not ids:
                raise APIError(400, "a prompt is empty", param="prompt")
            max_tokens = body.max_tokens or max_default(ids)
            if max_tokens < 1:
                raise APIError(400, f"the prompt ({len(ids)} tokens) leaves no room in the model's "
                               f"{service.max_positions} positions", param="messages", code="context_length_exceeded")
            try:
                service.check(ids, max_tokens)
            except PromptError as e:
                code = "context_length_exceeded" if "positions" in str(e) else None
                raise APIError(400, str(e), param="max_tokens" if code else "prompt", code=code)
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                out.append(Request(body.model, ids, max_tokens, body.temperature, body.top_p, seed, stops))
        return out

    async def _run_all(reqs: list[Request]):
        """Every choice at once; the first failure cancels the others (no session outlives it)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(service.generate(r)) for r in reqs]
        except* CloudFailed as eg:
            e = eg.exceptions[0]
            raise APIError(503, str(e), "server_error", code=e.code)
        except* PromptError as eg:
            raise APIError(400, str(eg.exceptions[0]))
        return [t.result() for t in tasks]

    def _stream(reqs: list[Request], make_chunk, first_chunk, include_usage: bool, prompt_tokens: int):
        """Server-sent events: every choice's text as it comes, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def one(i: int, r: Request):
            try:
                c = await service.generate(r, on_text=lambda piece: queue.put_nowait((i, piece, None)))
                queue.put_nowait((i, None, c))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported to the client as an error event
                if not isinstance(e, (CloudFailed, PromptError)):
                    log.exception("streamed generation failed")
                queue.put_nowait((i, None, e))

        async def events():
            tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(reqs)]
            done, results = 0, []
            try:
                if first_chunk is not None:
                    for i in range(len(reqs)):
                        yield _sse(first_chunk(i))
                while done < len(tasks):
                    i, piece, end = await queue.get()
                    if piece is not None:
                        yield _sse(make_chunk(i, piece, None))
                        continue
                    done += 1
                    if isinstance(end, Exception):
                        yield _sse(_stream_error(end).body())
                        continue
                    results.append(end)
                    yield _sse(make_chunk(i, None, end.finish_reason))
                if include_usage:
                    yield _sse(make_chunk(None, None, None) | {"choices": [], "usage": _usage(prompt_tokens, results)})
                yield "data: [DONE]\n\n"
            finally:       # the client went away, or all is done: no session outlives its request
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        _model(body.model)
        _unsupported(body, {"logprobs": body.logprobs is not None, "best_of": (body.best_of or 1) > 1,
                            "suffix": bool(body.suffix)})
        raw = body.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts = []
        for p in raw:
            try:
                prompts.append(service.encode_text(p) if isinstance(p, str) else list(p))
            except PromptError as e:
                raise APIError(400, str(e), param="prompt")
        reqs = _requests(body, prompts, lambda ids: 16)            # OpenAI's default for completions
        echo = [service.decode(r.prompt) if body.echo else "" for r in reqs]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        base = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
        if body.stream:
            def chunk(i, piece, finish):
                if i is None:
                    return dict(base)
                return base | {"choices": [{"index": i, "text": piece or "", "logprobs": None,
                                            "finish_reason": finish}]}
            first = (lambda i: chunk(i, echo[i], None)) if body.echo else None
            return _stream(reqs, chunk, first, bool((body.stream_options or {}).get("include_usage")),
                           prompt_tokens)
        done = await _run_all(reqs)
        return base | {"choices": [{"index": i, "text": echo[i] + c.text, "logprobs": None,
                                    "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                       "usage": _usage(prompt_tokens, done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        _model(body.model)
        fmt = (body.response_format or {}).get("type", "text")
        _unsupported(body, {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs is not None,
                            "tools": bool(body.tools), "tool_choice": body.tool_choice not in (None, "none"),
                            "response_format": fmt != "text"})
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        try:
            ids = service.encode_chat(body.messages)
        except PromptError as e:
            raise APIError(400, str(e), param="messages")
        reqs = _requests(body, [ids], service.room)                 # default: up to the model's context
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": body.model}
        if body.stream:
            sbase = base | {"object": "chat.completion.chunk"}

            def chunk(i, piece, finish):
                if i is None:
                    return dict(sbase)
                delta = {} if piece is None else {"content": piece}
                return sbase | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            def first(i):
                return sbase | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}
            return _stream(reqs, chunk, first, bool((body.stream_options or {}).get("include_usage")), len(ids))
        done = await _run_all(reqs)
        return base | {"choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": None, "finish_reason": c.finish_reason}
                                   for i, c in enumerate(done)],
                       "usage": _usage(len(ids), done)}

    return app
