"""Errors as OpenAI's API writes them, `{"error": {"message", "type", "param", "code"}}`; never a traceback.

An `ApiError` names its kind (also the `outcome` label of the request counter); the kind fixes the HTTP status
and OpenAI's error type, so clients built for OpenAI raise the matching exception (400 BadRequestError, 401
AuthenticationError, 503 InternalServerError...).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pulse_edge.errors import BundleError, EngineRunError, GenerationStopped, ModelOutputError, PulseEdgeError

log = logging.getLogger("pulse_edge.server")

# kind -> (HTTP status, OpenAI error type)
ERROR_KINDS: Mapping[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "unauthorized": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_timeout": (408, "invalid_request_error"),  # the client's body did not arrive in time
    "too_large": (413, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "cancelled": (499, "invalid_request_error"),  # the client went away; nobody reads this one
    "error": (500, "server_error"),
    "queue_full": (503, "server_error"),
    "unavailable": (503, "server_error"),  # shutting down, or out of memory
    "timeout": (504, "server_error"),
}
SHUTTING_DOWN = "the server is shutting down: the request was not answered; send it again once the server is back"
# Statuses Starlette raises itself (unknown route, wrong method) -> our kind; the first kind of a status wins.
KIND_OF_STATUS: Mapping[int, str] = {status: kind for kind, (status, _) in reversed(ERROR_KINDS.items())}


class ApiError(Exception):
    """A request the server answers with an error status; `message` is one line for the client."""

    def __init__(self, kind: str, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind, self.message, self.param = kind, message, param
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return ERROR_KINDS[self.kind][0]

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_KINDS[self.kind][1], "param": self.param,
                          "code": self.kind}}


def from_runtime(exc: PulseEdgeError | MemoryError) -> ApiError:
    """A runtime refusal as the client reads it: its one line; a 400 (the request's file or prompt), a 500 when
    the model computed no usable answer (not the client's doing), or a 503 when the host's or the GPU's memory ran
    out (the machine's state, which may pass: OpenAI's clients retry a 503), logged for the operator."""
    if isinstance(exc, GenerationStopped):  # what reaches a client only when the worker closed mid-prompt
        return ApiError("unavailable", SHUTTING_DOWN)
    if isinstance(exc, MemoryError):
        what = str(exc).rstrip(".") or "out of memory"
        log.warning("a request ran out of memory: %s", what)
        return ApiError("unavailable", f"{what}: the server ran out of memory; retry later")
    # a bundle refused mid-service was written over since the load (runtime/bundle/loaded.py): the server's
    return ApiError("error" if isinstance(exc, ModelOutputError | EngineRunError | BundleError) else "bad_request",
                    str(exc))


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was cancelled."""
