"""`POST /v1/ecg/interpret`: an ECG file in, the object `pulse-edge infer --json` prints out.

    multipart/form-data:  file=<the ECG>  | path=<a file under --allow-dir>,  question, max_tokens, temperature,
                          top_p, seed, fs, leads, unit (all optional); a WFDB record is two `file` parts, NAME.hea
                          and NAME.dat
    application/json:     {"path": ..., "question": ..., "max_tokens": ..., ...}   (paths only: no bytes in JSON)

The file goes through the same input decoding as `infer` (content sniffed, never trusted from its name). `fs` (Hz),
`leads` (an NPY file's lead order: "I,II,..." or, in JSON, a list) and `unit` are `infer`'s --fs, --leads and
--unit, for the CSV and NPY recordings that store none of them; the readers check their values as for `infer`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pulse_edge.choices import VOLTAGE_UNITS
from pulse_edge.jsonl import JSON_TEXT_ERRORS
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.server.chat import read_json
from pulse_edge.runtime.server.errors import SHUTTING_DOWN, ApiError
from pulse_edge.runtime.server.model import Upload, answer_json, decode_input
from pulse_edge.runtime.server.openai_api import max_tokens, number_field, sampling_params
from pulse_edge.runtime.server.paths import resolve_allowed
from pulse_edge.runtime.server.state import ServerState
from pulse_edge.runtime.server.waiting import Deadline, settle
from pulse_edge.runtime.text.prompt import check_text, question_or_default

FIELDS = ("file", "path", "question", "max_tokens", "temperature", "top_p", "seed", "fs", "leads", "unit")
NUMERIC_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "fs")
MAX_FIELD_BYTES = 64 * 2**10  # a question, a path or a number; the file part has the body limit only


async def interpret(request: Request) -> Response:
    state: ServerState = request.app.state.server
    deadline = Deadline(state.config.timeout_s)
    params, source, name = await _read(request, deadline, state.config.allow_dir)
    question = params.get("question")
    if question is not None and not isinstance(question, str):  # 0 or [] were the default question before
        raise ApiError("bad_request", "question must be a string", param="question")
    question = question_or_default(question)  # "" or blank as an image-only chat message: the default question
    check_text(question, "question")  # before queueing: a PromptError is the 400 app.py makes of it
    limit, sampling, reading = max_tokens(params), sampling_params(params), recording_options(params)

    def job(should_stop: StopCheck) -> dict[str, Any]:
        # a path is checked again when its turn comes (minutes in the queue, maybe): a folder swapped for a symlink
        # out of --allow-dir meanwhile was read through it
        checked = resolve_allowed(name, state.config.allow_dir) if isinstance(source, Path) else source
        ecg = decode_input(checked, name=name, **reading)
        answer = answer_json(state.model.pipeline, ecg, question, max_new_tokens=limit, sampling=sampling,
                             should_stop=should_stop)
        state.metrics.generation(answer["stop_reason"], answer["timings"])
        return answer

    ticket = state.submit(job)
    answer = await settle(ticket.result, ticket=ticket, receive=request.receive, deadline=deadline)
    if answer["stop_reason"] == "cancelled":
        raise ApiError("unavailable", SHUTTING_DOWN)
    return JSONResponse(answer)


async def _read(request: Request, deadline: Deadline,
                root: Path | None) -> tuple[dict[str, Any], bytes | Path | tuple[Upload, ...], str]:
    """(parameters, the file's bytes, a WFDB record's two files or a checked path, its name for messages) from a
    form or a JSON body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        params, uploads = await _read_form(request, deadline)
    elif kind == "application/json":
        params, uploads = await read_json(request, deadline), []
        if not isinstance(params, Mapping):
            raise ApiError("bad_request", "the request body must be a JSON object")
        if "file" in params:  # answered from `path` before, the file dropped in silence
            raise ApiError("bad_request", "a JSON body names a `path` on the server; send a file as a "
                           "multipart/form-data upload in `file`", param="file")
    else:
        raise ApiError("unsupported_media_type", "send multipart/form-data (a `file` or a `path` field) or "
                       "application/json (a `path`)")
    unknown = sorted(set(params) - set(FIELDS))
    if unknown:
        raise ApiError("bad_request", f"unknown fields {unknown}; accepted: {', '.join(FIELDS)}")
    path = params.get("path")
    if bool(uploads) == (path is not None):
        raise ApiError("bad_request", "send exactly one ECG: a `file` upload or a `path`", param="file")
    if len(uploads) == 1:
        return dict(params), await uploads[0].read(), uploads[0].filename or "the uploaded file"
    if uploads:
        parts = tuple([Upload(u.filename or "", await u.read()) for u in uploads])
        return dict(params), parts, " + ".join(p.name for p in parts)
    if not isinstance(path, str):
        raise ApiError("bad_request", "path must be a string", param="path")
    return dict(params), resolve_allowed(path, root), path


async def _read_form(request: Request, deadline: Deadline) -> tuple[dict[str, Any], list[UploadFile]]:
    try:  # two files at most: a WFDB record's header and signal file
        # the raw body first (Guard bounds it; the form is parsed from it): Starlette decodes a text field that is
        # not UTF-8 as Latin-1, and only the raw bytes tell that apart (_check_utf8)
        body = await asyncio.wait_for(request.body(), deadline.remaining())
        form = await asyncio.wait_for(request.form(max_files=2, max_fields=len(FIELDS),
                                                   max_part_size=MAX_FIELD_BYTES), deadline.remaining())
    except asyncio.TimeoutError:
        raise deadline.body_error() from None
    params: dict[str, Any] = {}
    uploads: list[UploadFile] = []
    for key, value in form.multi_items():
        if key in params:
            raise ApiError("bad_request", f"the field {key!r} is given twice", param=key)
        if isinstance(value, UploadFile):
            if key != "file":
                raise ApiError("bad_request", f"the field {key!r} must not be a file (the ECG goes in `file`)",
                               param=key)
            uploads.append(value)
        elif key == "file":
            raise ApiError("bad_request", "the field 'file' must be a file upload", param="file")
        else:
            params[key] = _form_value(key, _check_utf8(key, value, body))
    return params, uploads


def recording_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """`fs`, `leads` and `unit` as load_input takes them; their types checked here (a 400 naming the field), their
    values by the readers (an InputError, the 400 `infer` prints as one line)."""
    fs = number_field(params, "fs", None, "a finite number: the sampling rate in Hz")
    unit, leads = params.get("unit"), params.get("leads")
    if unit is not None and unit not in VOLTAGE_UNITS:  # None: not given (millivolts where it is read)
        raise ApiError("bad_request", f"unit must be one of {', '.join(VOLTAGE_UNITS)}", param="unit")
    if isinstance(leads, str):  # a form's text: "I,II,..." or a JSON list written as text
        leads = _json_list(leads) if leads.lstrip().startswith("[") else [name.strip() for name in leads.split(",")]
    if leads is not None and (not isinstance(leads, list) or not leads
                              or not all(isinstance(n, str) and n.strip() for n in leads)):
        raise ApiError("bad_request", "leads must name the leads in order: \"I,II,III,...\" or a list of names",
                       param="leads")
    return {"fs": fs, "unit": unit, "leads": tuple(leads) if leads is not None else None}


def _json_list(text: str) -> Any:
    try:
        return json.loads(text)
    except JSON_TEXT_ERRORS:
        return text  # not a list: refused by the caller, naming the field


def _check_utf8(key: str, value: str, body: bytes) -> str:
    """A form field as sent: where its bytes were not UTF-8, Starlette decoded them as Latin-1 ("\\xff\\xfe" became
    "ÿþ") and the model would have been asked garbled text. Read as UTF-8, a non-ASCII value's UTF-8 bytes are
    in the body as they were sent; read as Latin-1, they are not."""
    if not value.isascii() and value.encode("utf-8") not in body:
        raise ApiError("bad_request", f"the field {key!r} is not UTF-8 text; send form fields as UTF-8", param=key)
    return value


def _form_value(key: str, value: str) -> Any:
    """Form fields are text; the numeric ones are read as JSON numbers so the JSON checks apply."""
    if key not in NUMERIC_FIELDS:
        return value
    try:
        return json.loads(value)
    except JSON_TEXT_ERRORS:  # a field may be 64 KiB: the message quotes its start
        raise ApiError("bad_request", f"{key} must be a number, got {value[:40]!r}", param=key) from None
