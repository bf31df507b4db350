"""Waiting for the model thread from a request: deadlines, client disconnects, streamed text.

    handler --settle(awaitable)--> the value
                 |-- client disconnected (ASGI http.disconnect) --> ticket.cancel(), ClientGone
                 `-- deadline passed                            --> ticket.cancel(), ApiError timeout (504)

`TextPipe` carries text pieces from the model thread to the event loop, then one END once the job is over
(its result or error is then on the ticket).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.types import Receive

from pulse_edge.runtime.server.errors import SHUTTING_DOWN, ApiError, ClientGone
from pulse_edge.runtime.server.worker import Ticket

T = TypeVar("T")
END = object()  # TextPipe's last item


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._at - time.monotonic())

    def error(self) -> ApiError:
        return ApiError("timeout", f"the request took longer than the server's limit of {self.seconds:g} s; "
                        "it was cancelled")

    def body_error(self) -> ApiError:
        """The client's body did not arrive in time: a slow client (408), not a slow server (504)."""
        return ApiError("request_timeout", f"the request body did not arrive within the server's limit of "
                        f"{self.seconds:g} s")


async def wait_disconnect(receive: Receive) -> None:
    """Returns once the client has gone (call only after the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def settle(awaitable: Awaitable[T], *, ticket: Ticket, receive: Receive, deadline: Deadline) -> T:
    """`awaitable`'s value, unless the client leaves or the deadline passes first: then the job is cancelled."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=deadline.remaining(),
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (server shutting down)
        ticket.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        if task.cancelled():  # a waiting job the closing worker dropped (ModelWorker.close)
            raise ApiError("unavailable", SHUTTING_DOWN)
        return task.result()
    task.cancel()
    ticket.cancel()
    if watcher in done:
        raise ClientGone()
    raise deadline.error()


async def job_result(ticket: Ticket[T]) -> T:
    """The job's value, once it has ended; a job the server's shutdown cancelled before it started is the 503 a
    stopped one gets, not a CancelledError (a traceback and a bare 500)."""
    assert ticket.result is not None
    try:
        return await asyncio.shield(ticket.result)
    except asyncio.CancelledError:
        if ticket.result.cancelled():  # the job's, not this handler's: the worker closed before it ran
            raise ApiError("unavailable", SHUTTING_DOWN) from None
        raise


class TextPipe:
    """Text pieces from the model thread to the event loop, in order, then END."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, piece: str) -> None:
        """Called on the model thread."""
        self._send(piece)

    def end(self, *_: Any) -> None:
        """A done-callback of the job: after its last piece (same thread, same order), or at once if never run."""
        self._send(END)

    def _send(self, item: Any) -> None:
        # a closed loop: the server stopped (Ctrl-C) while this answer ran, and no one reads it; raised here, it
        # printed "Event loop is closed" tracebacks from the model thread
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Any:
        return await self._queue.get()
