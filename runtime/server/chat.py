"""`POST /v1/chat/completions`: one ECG and a question, answered whole or streamed as server-sent events.

    body -> ChatRequest -> queue -> model thread: decode the image, ask -> GenerationResult -> JSON
                                        | on_text pieces --TextPipe--> "data: {chunk}\\n\\n" ... "data: [DONE]\\n\\n"

A stream's headers are sent with its first piece of text, so that every error found before the answer
starts (a bad image, a prompt too long for the context, a full queue) is still a plain HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pulse_edge.errors import PulseEdgeError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.server.errors import ApiError, from_runtime
from pulse_edge.runtime.server.model import decode_input
from pulse_edge.runtime.server.openai_api import ChatRequest, Reply, finish_reason, parse_chat_request
from pulse_edge.runtime.server.state import ServerState
from pulse_edge.runtime.server.waiting import END, Deadline, TextPipe, job_result, settle
from pulse_edge.runtime.server.worker import Ticket

log = logging.getLogger("pulse_edge.server")
OUTCOME = "pulse_edge.outcome"  # scope key: how a request ended, when its status code does not say it
IMAGE_NAME = "the image_url data URI"


async def read_json(request: Request, deadline: Deadline) -> Any:
    try:
        body = await asyncio.wait_for(request.body(), deadline.remaining())
    except asyncio.TimeoutError:
        raise deadline.body_error() from None
    try:
        return json.loads(body)
    except JSON_TEXT_ERRORS as e:
        raise ApiError("bad_request", f"the request body is not valid JSON ({json_error_reason(e)})") from e


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    deadline = Deadline(state.config.timeout_s)
    chat = parse_chat_request(await read_json(request, deadline), state.model.model_id)
    reply = Reply.new(state.model.model_id, f"pulse-edge-{state.model.bundle_id[:16]}")
    if not chat.stream:
        ticket = state.submit(_job(state, chat, on_text=None))
        answer = await settle(ticket.result, ticket=ticket, receive=request.receive, deadline=deadline)
        finish_reason(answer.result)  # refuses a generation the server's shutdown cut short
        return JSONResponse(reply.completion(answer.result, token_ids=chat.return_token_ids, notes=answer.notes))
    pipe = TextPipe(asyncio.get_running_loop())
    ticket = state.submit(_job(state, chat, on_text=pipe.put))
    ticket.add_done_callback(pipe.end)
    first = await settle(pipe.get(), ticket=ticket, receive=request.receive, deadline=deadline)
    if first is END:
        await job_result(ticket)  # the job failed before any text (its error becomes the response) or said nothing
    events = _events(first, pipe, ticket, reply, chat, deadline, request)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ChatAnswer(NamedTuple):
    result: GenerationResult
    notes: tuple[str, ...]  # what was done to the input on its way to the model (a recording's, as infer says)


def _job(state: ServerState, chat: ChatRequest,
         on_text: Callable[[str], None] | None) -> Callable[[StopCheck], ChatAnswer]:
    def job(should_stop: StopCheck) -> ChatAnswer:
        ecg = decode_input(chat.image, name=IMAGE_NAME)
        result = state.model.pipeline.chat(system=chat.system).ask(
            chat.question, ecg.image, history=chat.history, max_new_tokens=chat.max_tokens,
            sampling=chat.sampling, on_text=on_text, should_stop=should_stop)
        state.metrics.generation(result.stop_reason, asdict(result.timings))
        return ChatAnswer(result, ecg.notes)

    return job


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(first: Any, pipe: TextPipe, ticket: Ticket[ChatAnswer], reply: Reply, chat: ChatRequest,
                  deadline: Deadline, request: Request) -> AsyncIterator[str]:
    """The chunks of one streamed answer; a client that goes away cancels the generation (finally)."""
    try:
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
        piece = first
        while piece is not END:
            yield sse(reply.chunk({"content": piece}))
            piece = await asyncio.wait_for(pipe.get(), deadline.remaining())
        answer = await job_result(ticket)
        finish = finish_reason(answer.result)
    except asyncio.CancelledError:
        request.scope[OUTCOME] = "cancelled"
        raise
    except asyncio.TimeoutError:
        yield _failed(request, deadline.error())
        return
    except ApiError as e:
        yield _failed(request, e)
        return
    except (PulseEdgeError, MemoryError) as e:
        yield _failed(request, from_runtime(e))
        return
    except Exception:
        log.exception("a streamed generation failed")
        yield _failed(request, ApiError("error", "internal server error; see the server's log"))
        return
    finally:
        ticket.cancel()  # a no-op once the job is over; otherwise it stops the model at its next step
    yield sse(reply.chunk({}, finish_reason=finish, notes=answer.notes,
                          token_ids=answer.result.token_ids if chat.return_token_ids else None))
    if chat.include_usage:
        yield sse(reply.usage_chunk(answer.result))
    yield "data: [DONE]\n\n"


def _failed(request: Request, error: ApiError) -> str:
    """An error after the stream started: OpenAI's clients raise on a data event holding "error"."""
    request.scope[OUTCOME] = error.kind
    return sse(error.body())
