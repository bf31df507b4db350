"""The ASGI application: routes, the key and size checks, per-request metrics, errors as JSON.

    uvicorn -> Observe (metrics) -> Guard (bearer key, body size) -> routes
       GET  /health                 model, backend, precision, bundle id   (open: no key, for probes)
       GET  /metrics                Prometheus text
       GET  /v1/models[/{id}]       the one model
       POST /v1/chat/completions    OpenAI-compatible, `stream: true` as server-sent events
       POST /v1/ecg/interpret       an ECG file -> the `infer --json` object

Every error reaches the client as OpenAI's JSON error object; tracebacks go to the server's log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pulse_edge.errors import PulseEdgeError
from pulse_edge.runtime.server.chat import OUTCOME, chat_completions
from pulse_edge.runtime.server.errors import KIND_OF_STATUS, ApiError, ClientGone, from_runtime
from pulse_edge.runtime.server.interpret import interpret
from pulse_edge.runtime.server.metrics import CONTENT_TYPE, Metrics
from pulse_edge.runtime.server.state import ServerState

log = logging.getLogger("pulse_edge.server")
OPEN_PATHS = frozenset({"/health"})
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; never seen by the client
DRAIN_BYTES = 64 * 2**20  # past this much of a refused body, the connection is just closed
# A client that sends nothing of a refused body for this long is answered now: one that declared a large body and
# waited (no Expect: 100-continue) waited the whole --timeout, 600 s by default.
DRAIN_IDLE_S = 2.0
# Once it has begun, a refused body may pause this long between pieces (a slow link) before the connection is
# answered and closed (one byte and then silence held it to the whole --timeout)
DRAIN_STALL_S = 30.0


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    model = state.model.health()
    return JSONResponse({**model, "queue": {"waiting": state.worker.waiting, "max_queue": state.worker.max_queue,
                                            "generating": state.worker.busy}},
                        status_code=200 if model["status"] == "ok" else 503)  # a monitor restarts it


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(state: ServerState) -> dict[str, Any]:
    created = int((state.model.pipeline.bundle / "manifest.json").stat().st_mtime)
    return {"id": state.model.model_id, "object": "model", "created": created, "owned_by": "pulse-edge"}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.server)]})


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if request.path_params["model_id"] != state.model.model_id:
        raise ApiError("not_found", f"model {request.path_params['model_id']!r} is not served here; this server "
                       f"serves {state.model.model_id!r}", param="model")
    return JSONResponse(_model_card(state))


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    request.scope[OUTCOME] = exc.kind  # the metrics' outcome: a status may mean more than one kind (503)
    return error_response(exc)


async def _runtime_error(request: Request, exc: Exception) -> Response:
    """A refusal of the runtime's (a bad file or prompt, a failed model) or a full memory: its one line, with the
    status errors.from_runtime gives it, never the traceback of _bug."""
    assert isinstance(exc, PulseEdgeError | MemoryError)
    error = from_runtime(exc)
    request.scope[OUTCOME] = error.kind
    return error_response(error)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own: unknown route, wrong method, a malformed multipart body."""
    assert isinstance(exc, HTTPException)
    kind = KIND_OF_STATUS.get(exc.status_code, "bad_request")
    return error_response(ApiError(kind, str(exc.detail), headers=exc.headers))  # a 405's Allow (RFC 9110)


async def _client_gone(request: Request, exc: Exception) -> Response:
    request.scope[OUTCOME] = "cancelled"
    return Response(status_code=CLIENT_CLOSED)


async def _bug(request: Request, exc: Exception) -> Response:
    return error_response(ApiError("error", "internal server error; see the server's log"))


class Observe:
    """Counts every request by endpoint and outcome and times it (streamed ones until their last byte)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if nothing is sent at all

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, observed)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            outcome = scope.get(OUTCOME) or ("ok" if status < 400 else KIND_OF_STATUS.get(status, "error"))
            self.metrics.requests.labels(endpoint, outcome).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)


async def drain(receive: Receive, idle_s: float | None = None) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES), so that the client, still sending, can
    read the error: closing a socket with unread data resets it, and the reset discards the response. `idle_s`:
    give up (asyncio.TimeoutError) when nothing of the body arrives for that long; once some has, a slow client is
    read on (it is sending, and will read the refusal) unless it pauses longer than DRAIN_STALL_S."""
    drained = 0
    while drained <= DRAIN_BYTES:
        message = await asyncio.wait_for(receive(), idle_s if drained == 0 or idle_s is None
                                         else max(idle_s, DRAIN_STALL_S))
        drained += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class Guard:
    """The bearer key (constant-time compare) on every path but /health, and the request body limit (413)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, timeout_s: float) -> None:
        self.app, self.max_body_bytes, self.timeout_s = app, max_body_bytes, timeout_s
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # lower-cased names; a repeated header keeps its last value
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            error = ApiError("unauthorized", "a valid API key is required: send the header "
                             "'Authorization: Bearer KEY'", headers={"WWW-Authenticate": "Bearer"})
            await error_response(error)(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            # a client that waits for 100 Continue is told at once (uvicorn sends it at the first receive); one
            # that stalls mid-body is not waited for past the server's timeout; either way the connection closes
            if headers.get(b"expect", b"").lower() != b"100-continue":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(drain(receive, DRAIN_IDLE_S), self.timeout_s)
            await error_response(self._too_large(close=True))(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.key is not None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # the scheme is case-insensitive (RFC 9110: "bearer" is Bearer); the key is compared in constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self, close: bool = False) -> ApiError:
        return ApiError("too_large", f"the request body is larger than the server's limit of "
                        f"{self.max_body_bytes / 2**20:g} MiB", headers={"Connection": "close"} if close else None)

    def _limited(self, receive: Receive) -> Receive:
        """A chunked body has no Content-Length: count what arrives instead."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                if message.get("more_body", False):
                    await drain(receive)
                raise self._too_large()
            return message

        return limited


ROUTES = (
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/ecg/interpret", interpret, methods=["POST"]),
)


def create_app(state: ServerState) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.worker.close()  # stops a running generation at its next step; waiting ones never start

    endpoints = frozenset(r.path for r in ROUTES if "{" not in r.path)
    app = Starlette(routes=list(ROUTES), lifespan=lifespan, middleware=[
        Middleware(Observe, metrics=state.metrics, endpoints=endpoints),
        Middleware(Guard, api_key=state.config.api_key, max_body_bytes=state.config.max_body_bytes,
                   timeout_s=state.config.timeout_s),
    ], exception_handlers={ApiError: _api_error, ClientGone: _client_gone, ClientDisconnect: _client_gone,
                           PulseEdgeError: _runtime_error,
                           MemoryError: _runtime_error,
                           HTTPException: _http_error, Exception: _bug})
    app.state.server = state
    return app
