"""Start the server: load the model, bind the socket, run uvicorn until SIGINT/SIGTERM.

The model is loaded before the socket is bound, so a bad bundle fails as one line and nothing ever listens
without a model. The socket is bound here (not by uvicorn) so that `--port 0` works: the line announcing the
server names the port the system picked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.server.app import create_app
from pulse_edge.runtime.server.model import open_model
from pulse_edge.runtime.server.state import ServerConfig, ServerState

BACKLOG = 64
# Connections uvicorn admits at once: a backstop against a flood (file descriptors), far past the model's slots.
# uvicorn counts open connections, idle ones too, and past the limit answers a bare text 503 to everything,
# /health included: with room for only 33, a cart's connection pool alone shut the probe out. The app's own
# queue refuses requests past the model's slots with the JSON 503 and its Retry-After.
CONNECTION_LIMIT = 1024
FD_MARGIN = 64  # descriptors kept for the model's files, logs and the listening socket
GRACEFUL_SHUTDOWN_S = 5  # then open streams are cut, which cancels their generations
HEAD_DEADLINE_S = 10.0  # a connection that has not sent a whole request head by then is closed


def connection_limit(max_queue: int) -> int:
    """CONNECTION_LIMIT, within the open files this process may have: past that, accept() fails with EMFILE, and
    uvicorn logs it in a loop while /health goes unanswered (systemd's default soft limit is 1024). The soft limit
    is raised to what the limit needs (within the hard one) first, where the system allows it."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return max(256, max_queue + 1)  # no limits to read: a modest backstop
    wanted = CONNECTION_LIMIT + FD_MARGIN  # no higher: children inherit it, and select() breaks past 1024
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # the system said no (a sandbox, macOS's own cap): stay within what there is
    room = CONNECTION_LIMIT if soft == resource.RLIM_INFINITY else soft - FD_MARGIN
    return max(min(CONNECTION_LIMIT, room), max_queue + 1)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address[:2], family=family, backlog=BACKLOG)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host or --port") from e
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(config: ServerConfig, say: Callable[[str], None]) -> None:
    """Blocks until the server is stopped; `say` prints one line for the operator."""
    model = open_model(config.bundle, config.session)
    state = ServerState.create(config, model)
    sock = bind(config.host, config.port)
    if not is_loopback(sock):
        say(f"warning: listening on {sock.getsockname()[0]}, reachable from other machines"
            + ("" if config.api_key else " with no --api-key: anyone who can reach it can use the model"))
    say(f"serving {model.model_id} ({model.pipeline.manifest.precision}, {config.session.provider}) at "
        f"{url_of(sock)} (max queue {config.max_queue}, timeout {config.timeout_s:g} s"
        + (f", files under {config.allow_dir}" if config.allow_dir else "") + ")")
    ClosingServer(uvicorn_settings(config, create_app(state)), state.worker.close).run(sockets=[sock])


def uvicorn_settings(config: ServerConfig, app: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`: a line per request (its access log) unless `pulse-edge -q` (a cart's /health
    probe every 10 s is 8,600 lines a day)."""
    return uvicorn.Config(app, lifespan="on", log_level="warning" if config.quiet else "info",
                          access_log=not config.quiet, server_header=False, proxy_headers=False,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                          limit_concurrency=connection_limit(config.max_queue), http=HeadDeadline)


class HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head. uvicorn times a connection out only
    after a response (its keep-alive), so one that never sent a request, or stopped half-way through its headers,
    stayed open for good: a thousand of them (a cart's leaking pool, a slow client) filled the connection limit,
    and /health answered 503. A body that stalls is the request's own deadline's (--timeout, a 408)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Armed while a head is awaited (on a new connection; after a response, once part of the next head came:
        until then uvicorn's keep-alive timer runs, and the data cancelled it), stopped once the head is in."""
        if self.conn.their_state is not h11.IDLE:
            self._stop_watching()
        elif self._head_deadline is None:
            self._head_deadline = self.loop.call_later(HEAD_DEADLINE_S, self._head_overdue)

    def _stop_watching(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class ClosingServer(uvicorn.Server):
    """uvicorn waits GRACEFUL_SHUTDOWN_S for open requests, then cancels their handlers (a bare 500 and a traceback
    each), and only then runs the app's lifespan shutdown. Closing the model worker first instead answers every
    waiting request with the JSON 503 at once and stops a running generation at its next step (its 503 too)."""

    def __init__(self, config: uvicorn.Config, close_worker: Callable[[], None]) -> None:
        super().__init__(config)
        self.close_worker = close_worker

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.close_worker()
        await super().shutdown(sockets=sockets)
