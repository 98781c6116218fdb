"""The HTTP server: OpenAI's chat-completions API, the model list, a health check and the chat page.

The app never runs the model itself: requests go to the engine's thread (engine.py), and its progress
comes back to the event loop through an asyncio queue per HTTP request. Errors always take OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the matching status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .config import ServeConfig
from .engine import Completion, EngineBusy, GenerationEngine, PromptError, Request, RequestTimeout
from .images import ImageRefused, read_image
from .protocol import (BadRequest, ChatCompletionRequest, chunk_body, completion_body, completion_id, conversation,
                       error_body, usage, validation_message)

log = logging.getLogger("bridgevlm.serve")


class BodyTooLarge(Exception):
    pass


DISCARD_FACTOR = 4  # a refused body is read and dropped up to this many times the limit, then the connection closes


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it all, whether
    or not the client declared its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._discard_rest(receive, 0)
            return await _send_json(send, 413, self._message())
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._discard_rest(receive, seen)
                await _send_json(send, 413, self._message())

    async def _discard_rest(self, receive, seen: int) -> None:
        """Read and drop the rest of a refused body, up to a few times the limit: a client still sending
        when the 413 comes and the connection closes would see a broken pipe instead of the reason."""
        more = True
        while more and seen <= DISCARD_FACTOR * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    def _message(self) -> dict:
        return error_body(413, f"the request body is larger than {self.limit} bytes (this server's limit); send "
                               f"smaller images", code="request_too_large")


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _failure(error: Exception) -> JSONResponse:
    if isinstance(error, PromptError):
        return _error(400, str(error), "messages")
    if isinstance(error, EngineBusy):
        return _error(503, str(error), code="overloaded")
    if isinstance(error, RequestTimeout):
        return _error(504, str(error), code="timeout")
    log.error("request failed: %s: %s", type(error).__name__, error)
    return _error(500, f"the model failed on this request ({type(error).__name__}); see the server log")


class _Relay:
    """An engine listener that hands events to the event loop: (choice, kind, payload) on one queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, choice: int):
        self.loop, self.queue, self.choice = loop, queue, choice

    def _put(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.choice, kind, payload))

    def piece(self, text: str) -> None:
        self._put("piece", text)

    def done(self, completion: Completion) -> None:
        self._put("done", completion)

    def failed(self, error: Exception) -> None:
        self._put("error", error)


def chat_page() -> str:
    return resources.files("bridgevlm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def create_app(engine: GenerationEngine, cfg: ServeConfig, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`; the engine's thread starts and stops
    with the app."""
    cfg.check()

    @asynccontextmanager
    async def lifespan(_):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="bridgevlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    created = int(time.time())

    @app.exception_handler(HTTPException)
    async def _http_error(_, error: HTTPException):
        return _error(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "bridgevlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"the request body is not valid JSON: {error}")
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as error:
            message, param = validation_message(error)
            return _error(400, message, param)
        if request.model != model_name:
            return _error(404, f"the model {request.model!r} does not exist; this server serves {model_name!r}",
                          "model", "model_not_found")
        if request.n > cfg.max_choices:
            return _error(400, f"n must be at most {cfg.max_choices} on this server", "n")
        try:
            messages, urls, system = conversation(request)
            if len(urls) > cfg.max_images:
                raise BadRequest(f"the messages hold {len(urls)} images; this server takes at most {cfg.max_images}",
                                 "messages")
            images = [await asyncio.to_thread(read_image, url, where, cfg) for url, where in urls]
        except BadRequest as error:
            return _error(error.status, str(error), error.param)
        except ImageRefused as error:
            return _error(error.status, str(error), "messages", "invalid_image")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = [Request(messages, images, request.generation(cfg, choice), _Relay(loop, events, choice),
                        system=system, timeout_s=cfg.request_timeout_s) for choice in range(request.n)]
        try:
            engine.check(jobs[0])  # the choices share their prompt and differ only in their seed
        except (PromptError, ValueError) as error:
            return _error(400, str(error), "messages")
        for job in jobs[1:]:
            job.prompt_tokens = jobs[0].prompt_tokens
        try:
            for job in jobs:
                engine.submit(job)
        except EngineBusy as error:
            for job in jobs:
                job.cancel()
            return _failure(error)
        log.info("request: %d message(s), %d image(s), %d prompt tokens, n=%d, stream=%s", len(messages),
                 len(images), jobs[0].prompt_tokens, request.n, request.stream)
        if request.stream:
            return StreamingResponse(_stream(request, jobs, events, model_name, cfg), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(jobs, events, model_name, cfg)

    return app


async def _next_event(events: asyncio.Queue, cfg: ServeConfig):
    # The engine enforces the deadline; this only guards against an engine that stopped answering.
    return await asyncio.wait_for(events.get(), timeout=cfg.request_timeout_s + 30)


async def _complete(jobs: list[Request], events: asyncio.Queue, model_name: str, cfg: ServeConfig) -> JSONResponse:
    finished: dict[int, Completion] = {}
    try:
        while len(finished) < len(jobs):
            choice, kind, payload = await _next_event(events, cfg)
            if kind == "error":
                return _failure(payload)
            if kind == "done":
                finished[choice] = payload
    except asyncio.TimeoutError:
        return _failure(RequestTimeout("the engine did not answer in time"))
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished ones; frees the slots of the rest
    choices = [{"index": i, "message": {"role": "assistant", "content": finished[i].text}, "logprobs": None,
                "finish_reason": finished[i].finish_reason} for i in range(len(jobs))]
    return JSONResponse(completion_body(completion_id(), model_name, choices,
                                        usage(jobs[0].prompt_tokens, sum(c.completion_tokens for c in finished.values()))))


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _stream(request: ChatCompletionRequest, jobs: list[Request], events: asyncio.Queue, model_name: str,
                  cfg: ServeConfig):
    id_, created = completion_id(), int(time.time())

    def chunk(choice: int, delta: dict, finish: str | None = None) -> str:
        return _sse(chunk_body(id_, model_name, created,
                               [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    generated, open_choices = 0, set(range(len(jobs)))
    try:
        for choice in range(len(jobs)):
            yield chunk(choice, {"role": "assistant", "content": ""})
        while open_choices:
            try:
                choice, kind, payload = await _next_event(events, cfg)
            except asyncio.TimeoutError:
                choice, kind, payload = 0, "error", RequestTimeout("the engine did not answer in time")
            if kind == "piece":
                yield chunk(choice, {"content": payload})
            elif kind == "done":
                generated += payload.completion_tokens
                open_choices.discard(choice)
                yield chunk(choice, {}, payload.finish_reason)
            else:  # the status line has gone out: the error travels as an event, as other servers send it
                failure = _failure(payload)
                yield _sse(json.loads(failure.body))
                break
        if request.stream_options is not None and request.stream_options.include_usage:
            yield _sse(chunk_body(id_, model_name, created, [], usage(jobs[0].prompt_tokens, generated)))
        yield "data: [DONE]\n\n"
    finally:  # also when the client goes away mid-stream
        for job in jobs:
            job.cancel()

