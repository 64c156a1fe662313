"""The Starlette app: OpenAI's routes over one `ModelHost`.

    GET  /health                 200 {"status": "ready", ...} or 503 {"status": "loading", "stage": ...}
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> a reply, whole or as server-sent events
    POST /v1/completions         a plain prompt -> its continuation

Every error is OpenAI's shape with its status; nothing of a traceback reaches the client. The
header `x-runner-reused-prompt-tokens` (and usage.prompt_tokens_details.cached_tokens) says how
many prompt tokens came from the KV cache the session kept from the previous request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runner.server.addresses import is_loopback, url_host
from runner.server.api import ApiError, GenerationRequest, Reply, parse_chat, parse_completion
from runner.server.worker import Failed, Finished, Job, ModelHost, Started, Text

BODY_LIMIT = 4 * 1024 * 1024
REUSED_HEADER = "x-runner-reused-prompt-tokens"


def build_app(host: ModelHost, *, model: str, aliases: set[str], api_key: str | None, loopback: bool,
              stopping: asyncio.Event, log: Callable[[str], None], body_limit: int = BODY_LIMIT) -> Starlette:
    """`model` is the name /v1/models lists; a request may name it or one of `aliases`. `loopback`:
    the server listens on a loopback address only. `stopping`: set when the server stops."""
    routes = OpenAiRoutes(host, model, aliases, log, body_limit, stopping)
    app = Starlette(
        routes=[
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{name:path}", routes.one_model, methods=["GET"]),
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: routes.api_error, HTTPException: routes.http_error,
                            Exception: routes.internal_error},
    )
    if api_key:
        app.add_middleware(RequireKey, key=api_key, on_refused=log)
    app.add_middleware(SameMachineOnly, check_host=loopback, on_refused=log)
    return app


class OpenAiRoutes:
    """The endpoints and error handlers over one `ModelHost`, serving one model under its names."""

    def __init__(self, host: ModelHost, model: str, aliases: set[str], log: Callable[[str], None],
                 body_limit: int, stopping: asyncio.Event) -> None:
        self.host = host
        self.model = model
        self.served = (model, *sorted(aliases - {model}))
        self.created = int(time.time())
        self.log = log
        self.body_limit = body_limit
        self.stopping = stopping

    # ---- the routes ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        host = self.host
        if host.state != "ready":
            return JSONResponse({"status": host.state, "stage": host.stage}, status_code=503,
                                headers={"Retry-After": "2"})
        return JSONResponse({"status": "ready", "model": self.model, "busy": host.busy, "queued": host.queued})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.served:
            raise ApiError(404, f"the model '{name[:200]}' is not served here; this server has {self.model}",
                           code="model_not_found")
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: Request) -> Response:
        return await self.answer(request, parse_chat(await self.body(request), self.served))

    async def completions(self, request: Request) -> Response:
        return await self.answer(request, parse_completion(await self.body(request), self.served))

    async def body(self, request: Request) -> dict:
        """The request's body as a JSON object (read_json), or 503 at once if the server stops while
        it is still arriving (uvicorn would wait out its grace period for the rest, then cancel the
        request: a traceback)."""
        reading = asyncio.ensure_future(read_json(request, self.body_limit))
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait((reading, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()   # no effect once it is done
            stopped.cancel()
        if reading in done:
            return reading.result()
        raise ApiError(503, "the server is stopping: the request's body had not all arrived", type="server_error",
                       code="shutting_down")

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "runner"}

    # ---- a generation: queued, then answered whole or streamed -----------------------------------

    async def answer(self, request: Request, generation: GenerationRequest) -> Response:
        job = Job(generation, asyncio.get_running_loop())
        self.host.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        streaming = False
        try:
            first = await job.events.get()
            if isinstance(first, Failed):
                raise first.error
            if not isinstance(first, Started):   # cancelled before it began: the client left, or the server stops
                raise ApiError(503, "the request was cancelled before it started", type="server_error")
            reply = Reply(generation.chat, self.model)
            headers = {REUSED_HEADER: str(first.reused_tokens)}
            if generation.stream:
                streaming = True   # the stream owns the job and the watcher from here on
                return StreamingResponse(self.events(job, watcher, reply, generation.include_usage), headers=headers,
                                         media_type="text/event-stream")
            return await self.whole(job, reply, headers)
        finally:
            if not streaming:
                job.cancel.set()    # no effect on a finished job; stops one whose request was cut short
                watcher.cancel()

    async def whole(self, job: Job, reply: Reply, headers: dict[str, str]) -> Response:
        text = []
        while True:
            event = await job.events.get()
            if isinstance(event, Text):
                text.append(event.text)
            elif isinstance(event, Finished):
                return JSONResponse(reply.whole("".join(text), event.finish_reason, event.usage), headers=headers)
            elif isinstance(event, Failed):
                raise event.error

    async def events(self, job: Job, watcher: asyncio.Task, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a first chunk (the role), text chunks, the finish reason, the usage
        if asked for, then [DONE]. A failure after the first chunk is an error event."""
        try:
            if reply.chat:
                yield sse(reply.chunk(first=True))
            while True:
                event = await job.events.get()
                if isinstance(event, Text):
                    yield sse(reply.chunk(event.text))
                elif isinstance(event, Finished):
                    yield sse(reply.chunk(finish_reason=event.finish_reason))
                    if include_usage:
                        yield sse(reply.usage_chunk(event.usage))
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, Failed):
                    self.log(f"{event.error.status} (in a stream) {event.error.message}")
                    yield sse(event.error.body())
                    return
        finally:
            job.cancel.set()
            watcher.cancel()

    # ---- errors, in OpenAI's shape -------------------------------------------------------------

    async def api_error(self, request: Request, error: ApiError) -> Response:
        return self.error_response(request, error)

    async def http_error(self, request: Request, error: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return self.error_response(request, ApiError(error.status_code, message, code=kind))

    async def internal_error(self, request: Request, error: Exception) -> Response:
        message = f"internal error ({type(error).__name__}); the server goes on"
        return self.error_response(request, ApiError(500, message, type="server_error"))

    def error_response(self, request: Request, error: ApiError) -> JSONResponse:
        self.log(f"{error.status} {request.method} {request.url.path} · {error.message}")
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes (counted as they arrive, whatever
    Content-Length says), 400 if it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    except ClientDisconnect:   # an ApiError, not the 500 of an unexpected exception and its traceback in the log
        raise ApiError(400, "the client went away before its request body arrived", code="client_disconnected") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:   # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({str(error)[:200]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away, whether it is waiting in the queue, generating,
    or streaming."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


async def refuse(scope, receive, send, error: ApiError, on_refused: Callable[[str], None]) -> None:
    on_refused(f"{error.status} {scope['method']} {scope['path']} · {error.message}")
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


class SameMachineOnly:
    """ASGI middleware. Any web page the user opens may send requests to 127.0.0.1: refuse one
    from a page of another origin (an Origin header that is not loopback), and, when the server
    listens on loopback only, one whose Host is not a loopback name (DNS rebinding: a page's own
    name made to resolve to 127.0.0.1). Clients that are not browsers send no Origin."""

    def __init__(self, app, check_host: bool, on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.check_host = check_host
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and not is_loopback(url_host(origin)):
                error = f"requests from web pages of other origins are refused (Origin: {origin[:100]})"
            elif self.check_host and host and not is_loopback(url_host(f"//{host}")):
                error = f"this server answers to loopback names only, not Host: {host[:100]}"
            else:
                error = None
            if error:
                await refuse(scope, receive, send, ApiError(403, error, code="forbidden"), self.on_refused)
                return
        await self.app(scope, receive, send)


class RequireKey:
    """ASGI middleware: every request needs `Authorization: Bearer <key>`, compared in constant time."""

    def __init__(self, app, key: str, on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.key = key.encode()
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await refuse(scope, receive, send, error, self.on_refused)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"
