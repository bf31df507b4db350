"""The server's parts without a model: the decode loop's stop hook, request parsing, allowed paths, the queue.

The server end to end (a subprocess, the official openai client) is tests/runtime/test_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

from pulse_edge.cli.serve import API_KEY_ENV, resolve_api_key
from pulse_edge.errors import ConfigError, GenerationStopped
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.generation.decode import decode_loop
from pulse_edge.runtime.generation.sampling import Sampler, SamplingParams
from pulse_edge.runtime.server.errors import ApiError, ClientGone
from pulse_edge.runtime.server.openai_api import parse_chat_request
from pulse_edge.runtime.server.paths import resolve_allowed
from pulse_edge.runtime.server.waiting import Deadline, settle
from pulse_edge.runtime.server.worker import ModelWorker, QueueFull
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION, Turn

# ---- the decode loop's cancellation hook -------------------------------------------------------------------


def _loop(should_stop: Any, max_new_tokens: int = 50) -> tuple[list[int], str, int]:
    steps = []

    def step(token: int) -> np.ndarray:
        steps.append(token)
        logits = np.zeros(8, dtype=np.float32)
        logits[(token + 1) % 7] = 1.0  # never 7, the EOS id here
        return logits

    first = np.eye(8, dtype=np.float32)[1]
    out = decode_loop(first, step, sampler=Sampler(SamplingParams()), eos_id=7, max_new_tokens=max_new_tokens,
                      room=1000, should_stop=should_stop)
    return out.token_ids, out.stop_reason, len(steps)


def test_should_stop_ends_the_loop_before_the_next_step() -> None:
    asked = []

    def stop_after_three() -> bool:
        asked.append(1)
        return len(asked) >= 3

    tokens, reason, steps = _loop(stop_after_three)
    assert reason == "cancelled"
    assert len(tokens) == 3 and steps == 2  # asked before each step; the third "yes" skipped the third step


def test_should_stop_still_returns_the_first_token() -> None:
    tokens, reason, steps = _loop(lambda: True)
    assert (len(tokens), reason, steps) == (1, "cancelled", 0)


def test_without_should_stop_the_loop_runs_to_its_limit() -> None:
    assert _loop(None, 20)[:2] == (_loop(lambda: False, 20)[0], "max_new_tokens")
    assert len(_loop(None, 20)[0]) == 20


# ---- OpenAI request parsing -----------------------------------------------------------------------------


PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nrest").decode()


def _user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def _image(url: str = PNG_URI) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _parse(**body: Any):
    return parse_chat_request({"model": "m", **body}, "m")


def test_a_request_becomes_question_image_and_sampling() -> None:
    chat = _parse(messages=[_user(_text("Rhythm?"), _image())], temperature=0.5, top_p=0.9, seed=3,
                  max_completion_tokens=12, stream=True, stream_options={"include_usage": True})
    assert chat.question == "Rhythm?" and chat.image.startswith(b"\x89PNG") and chat.history == ()
    assert chat.sampling == SamplingParams(temperature=0.5, top_p=0.9, seed=3)
    assert (chat.max_tokens, chat.stream, chat.include_usage, chat.system) == (12, True, True, None)


def test_detail_that_asks_for_the_full_grid_is_taken() -> None:
    for detail in ("auto", "high"):
        image = {"type": "image_url", "image_url": {"url": PNG_URI, "detail": detail}}
        assert _parse(messages=[_user(image)]).image.startswith(b"\x89PNG")


def test_omitted_sampling_is_greedy_and_an_image_alone_asks_the_default_question() -> None:
    chat = _parse(messages=[_user(_image())])
    assert chat.sampling.greedy and chat.max_tokens == 1024 and chat.question == DEFAULT_QUESTION
    for blank in (" ", "\n\t"):  # an empty form field as some clients send it: the same as none
        assert _parse(messages=[_user(_image(), _text(blank))]).question == DEFAULT_QUESTION


def test_history_and_system_messages() -> None:
    chat = _parse(messages=[{"role": "system", "content": "Be brief."}, _user(_image(), _text("Rhythm?")),
                            {"role": "assistant", "content": "Sinus."}, {"role": "user", "content": "Rate?"},
                            {"role": "user", "content": "And axis?"}])
    assert chat.system == "Be brief."
    assert chat.history == (Turn("Rhythm?", "Sinus."),)
    assert chat.question == "Rate?\nAnd axis?"  # consecutive user messages are one question
    told = _parse(messages=[_user(_image(), _text("Rhythm?")), {"role": "assistant", "content": "Sinus."},
                            {"role": "assistant", "content": "Rate 72."}, _user(_text("Axis?"))])
    assert told.history == (Turn("Rhythm?", "Sinus.\nRate 72."),)  # and assistant ones one answer: none dropped
    # an image-only first message was answered as the default question: replayed, it is that question again
    replayed = _parse(messages=[_user(_image()), {"role": "assistant", "content": "Sinus."}, _user(_text("Rate?"))])
    assert replayed.history == (Turn(DEFAULT_QUESTION, "Sinus."),) and replayed.question == "Rate?"


@pytest.mark.parametrize(("messages", "words"), [
    ([_user(_text("Rhythm?"))], "exactly one ECG image"),
    ([_user(_image(), _image())], "found 2 images"),
    ([_user(_text("hi")), {"role": "assistant", "content": "hello"}, _user(_image())], "first user message"),
    ([_user(_image("https://example.org/ecg.png"))], "data: URI"),
    ([_user(_image("data:image/png;base64,***"))], "not valid base64"),
    ([_user(_image("data:image/png,%89PNG"))], "must be base64-encoded"),
    ([_user(_image()), {"role": "assistant", "content": "x"}], "last message must be the user's"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([], "non-empty list"),
    ([_user({"type": "image_url", "image_url": {"url": PNG_URI, "detail": "low"}})], "detail 'low' is not supported"),
])
def test_malformed_conversations_are_400s_that_say_why(messages: list, words: str) -> None:
    with pytest.raises(ApiError, match=words) as caught:
        _parse(messages=messages)
    assert caught.value.status == 400 and caught.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("extra", "words"), [
    ({"stop": ["\n"]}, "'stop' is not supported"), ({"n": 2}, "'n' is not supported"),
    ({"temperature": 3}, "temperature must be in"), ({"top_p": 0}, "top_p must be in"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"), ({"seed": -1}, "seed must be"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"temperature": 10**400}, "temperature must be a number"),  # JSON allows it; float() overflows
    # other servers' parameters that would change the answer (vLLM's), never dropped in silence
    ({"top_k": 5}, "'top_k' is not supported"), ({"repetition_penalty": 1.1}, "'repetition_penalty' is not"),
    ({"min_tokens": 8}, "'min_tokens' is not supported"), ({"ignore_eos": True}, "'ignore_eos' is not supported"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, r"max_tokens \(10\) and max_completion_tokens \(20\) differ"),
])
def test_unsupported_or_out_of_range_parameters_are_refused(extra: dict, words: str) -> None:
    with pytest.raises(ApiError, match=words):
        _parse(messages=[_user(_image())], **extra)


def test_the_bounds_of_temperature_and_seed_are_taken_and_a_bool_seed_is_not() -> None:
    edge = _parse(messages=[_user(_image())], temperature=2.0, seed=2**32 - 1).sampling
    assert (edge.temperature, edge.seed) == (2.0, 2**32 - 1)  # OpenAI's largest temperature, the sampler's seed
    with pytest.raises(ApiError, match="seed must be an integer"):
        _parse(messages=[_user(_image())], seed=True)  # JSON's true is no seed of 1


def test_an_omitted_seed_is_drawn_inside_the_range_the_sampler_takes() -> None:
    seeds = {_parse(messages=[_user(_image())]).sampling.seed for _ in range(64)}
    assert len(seeds) > 1 and all(0 <= seed < 2**32 for seed in seeds)


def test_bookkeeping_parameters_are_ignored_and_another_model_is_404() -> None:
    _parse(messages=[_user(_image())], user="cart-7", metadata={"site": "a"}, store=False, n=1, stop=None,
           max_tokens=8, max_completion_tokens=8, return_token_ids=True)
    for options, words in (({"include_usage": True}, "only read with stream: true"),
                           ({"include_obfuscation": True}, "\\['include_obfuscation'\\] are not supported")):
        with pytest.raises(ApiError, match=words):  # as OpenAI refuses them; read by nothing here
            _parse(messages=[_user(_image())], stream=options.get("include_usage") is None, stream_options=options)
    with pytest.raises(ApiError, match="not served here") as caught:
        parse_chat_request({"model": "gpt-4o", "messages": [_user(_image())]}, "m")
    assert caught.value.status == 404


# ---- paths under --allow-dir ----------------------------------------------------------------------------


@pytest.fixture()
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ecg.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "inside-link.png").symlink_to(root / "sub" / "ecg.png")
    (root / "outside-link.png").symlink_to(tmp_path / "secret.png")
    (root / "dir-link").symlink_to(tmp_path)
    return root.resolve()


def test_files_under_the_root_resolve(allowed: Path) -> None:
    target = allowed / "sub" / "ecg.png"
    assert resolve_allowed("sub/ecg.png", allowed) == target
    assert resolve_allowed(str(target), allowed) == target
    assert resolve_allowed("sub/../sub/ecg.png", allowed) == target
    assert resolve_allowed("inside-link.png", allowed) == target  # a symlink that stays inside is fine
    (allowed / "sub" / "rec.hea").write_text("rec 12 500 5000\n")
    assert resolve_allowed("sub/rec", allowed) == allowed / "sub" / "rec.hea"  # a bare WFDB record, as infer takes


@pytest.mark.parametrize(("requested", "kind"), [
    ("../secret.png", "forbidden"), ("sub/../../secret.png", "forbidden"), ("/etc/passwd", "forbidden"),
    ("outside-link.png", "forbidden"), ("dir-link/secret.png", "forbidden"), ("missing.png", "not_found"),
    ("sub", "bad_request"), ("", "bad_request"), ("a\x00b", "bad_request"),
])
def test_traversal_and_symlinks_out_are_refused(allowed: Path, requested: str, kind: str) -> None:
    with pytest.raises(ApiError) as caught:
        resolve_allowed(requested, allowed)
    assert caught.value.kind == kind


def test_a_wfdb_headers_signal_file_is_held_to_the_root_too(allowed: Path, tmp_path: Path) -> None:
    """The reader opens the files a header names: a .dat linked out of the root was read and drawn."""
    (tmp_path / "outside.dat").write_bytes(b"\0" * 64)
    (allowed / "sub" / "out.hea").write_text("out 1 500 32\nout.dat 16 200 16 0 0 0 0 I\n")
    (allowed / "sub" / "out.dat").symlink_to(tmp_path / "outside.dat")
    for requested in ("sub/out", "sub/out.hea"):
        with pytest.raises(ApiError, match=r"names 'out\.dat', which leads outside") as caught:
            resolve_allowed(requested, allowed)
        assert caught.value.kind == "forbidden"
    # asked for by its signal file, the record is read through its header: held to the root the same way
    (allowed / "sub" / "rec.hea").write_text("rec 1 500 32\nsecret.dat 16 200 16 0 0 0 0 I\n")
    (allowed / "sub" / "rec.dat").write_bytes(b"\0" * 64)
    (allowed / "sub" / "secret.dat").symlink_to(tmp_path / "outside.dat")
    # a multi-segment record: a segment's header names the file
    (allowed / "sub" / "multi.hea").write_text("multi/1 1 500 32\nseg1 32\n")
    (allowed / "sub" / "seg1.hea").write_text("seg1 1 500 32\nsecret.dat 16 200 16 0 0 0 0 I\n")
    for requested in ("sub/rec.dat", "sub/rec", "sub/multi", "sub/multi.hea"):
        with pytest.raises(ApiError, match=r"names 'secret\.dat', which leads outside") as caught:
            resolve_allowed(requested, allowed)
        assert caught.value.kind == "forbidden", requested
    (allowed / "sub" / "long.hea").write_text(f"long 1 500 32\n{'x' * 300}.dat 16 200 16 0 0 0 0 I\n")
    with pytest.raises(ApiError, match="names a file that cannot be looked up") as caught:  # not a 500
        resolve_allowed("sub/long", allowed)
    assert caught.value.kind == "bad_request"
    (allowed / "sub" / "in.hea").write_text("# a comment\nin 1 500 32\nin.dat 16 200 16 0 0 0 0 I\n")
    (allowed / "sub" / "in.dat").symlink_to(allowed / "sub" / "ecg.png")  # a link that stays inside
    assert resolve_allowed("sub/in", allowed) == allowed / "sub" / "in.hea"


def test_no_root_accepts_no_path(allowed: Path) -> None:
    with pytest.raises(ApiError, match="--allow-dir"):
        resolve_allowed(str(allowed / "sub" / "ecg.png"), None)


# ---- the API key ----------------------------------------------------------------------------------------


def test_api_key_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "s3cret-0123456789")
    assert resolve_api_key("env") == "s3cret-0123456789" and resolve_api_key("literal-key-0123") == "literal-key-0123"
    assert resolve_api_key(None) is None
    with pytest.raises(ConfigError, match=r"the API key has 1 characters; use at least 16 random ones"):
        resolve_api_key("a")  # taken as the key before
    monkeypatch.delenv(API_KEY_ENV)
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        resolve_api_key("env")


# ---- the queue ------------------------------------------------------------------------------------------


def _blocking_job(release: threading.Event, log: list[str], name: str):
    def job(should_stop) -> str:
        log.append(f"{name} started")
        while not release.is_set():
            if should_stop():
                log.append(f"{name} stopped")
                return "stopped"
            time.sleep(0.002)
        return name

    return job


def test_the_queue_admits_one_running_plus_max_queue_and_frees_slots() -> None:
    async def scenario() -> None:
        worker, release, log = ModelWorker(max_queue=1), threading.Event(), []
        first = worker.submit(_blocking_job(release, log, "a"))
        second = worker.submit(_blocking_job(release, log, "b"))
        with pytest.raises(QueueFull):
            worker.submit(_blocking_job(release, log, "c"))
        await asyncio.sleep(0.05)
        assert worker.busy and worker.waiting == 1
        second.cancel()  # cancelled while waiting: it never starts
        release.set()
        assert await first.result == "a"
        await asyncio.sleep(0.05)
        assert log == ["a started"] and worker.waiting == 0 and not worker.busy
        third = worker.submit(_blocking_job(release, log, "c"))
        assert await third.result == "c"
        worker.close()

    asyncio.run(scenario())


def test_cancelling_a_running_job_stops_it_and_frees_the_slot() -> None:
    async def scenario() -> None:
        worker, release, log = ModelWorker(max_queue=0), threading.Event(), []
        ticket = worker.submit(_blocking_job(release, log, "a"))
        await asyncio.sleep(0.05)
        ticket.cancel()
        assert await asyncio.wait_for(asyncio.wrap_future(ticket._future), 2) == "stopped"
        await asyncio.sleep(0.01)
        assert worker.submit(lambda should_stop: "next") is not None  # the slot is free again
        worker.close()

    asyncio.run(scenario())


def test_a_finished_job_is_never_counted_as_waiting() -> None:
    """/health read {"waiting": 1, "generating": false} with one request in flight, at its end: the slot was freed
    by a callback that ran after the answer was handed back."""
    async def scenario() -> list[int]:
        worker, seen = ModelWorker(max_queue=0), []
        for _ in range(300):
            await worker.submit(lambda should_stop: None).result
            seen.append(worker.waiting)
        worker.close()
        return seen

    assert set(asyncio.run(scenario())) == {0}


def test_a_stopped_jobs_error_is_not_logged_as_never_retrieved() -> None:
    """A stream whose client left, or whose deadline passed, stops its job, which then raises GenerationStopped
    with no handler left to await it: asyncio logged "Future exception was never retrieved" with a traceback."""
    def job(should_stop: Any) -> None:
        while not should_stop():
            time.sleep(0.002)
        raise GenerationStopped("stopped after 512 of the prompt's 2981 positions")

    async def scenario() -> list[str]:
        loop, unhandled = asyncio.get_running_loop(), []
        loop.set_exception_handler(lambda _, context: unhandled.append(context["message"]))
        worker = ModelWorker(max_queue=0)
        ticket = worker.submit(job)
        await asyncio.sleep(0.02)
        ticket.cancel()
        await asyncio.sleep(0.1)  # the job sees its stop, raises, and its result is set on this loop
        worker.close()
        del ticket
        gc.collect()
        await asyncio.sleep(0)
        return unhandled

    assert asyncio.run(scenario()) == []


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {}


async def _disconnects_soon() -> dict[str, Any]:
    await asyncio.sleep(0.05)
    return {"type": "http.disconnect"}


@pytest.mark.parametrize(("receive", "deadline_s", "error"), [
    (_disconnects_soon, 60.0, ClientGone), (_never_disconnects, 0.1, ApiError)])
def test_a_client_leaving_or_the_deadline_cancels_the_generation(receive: Any, deadline_s: float,
                                                                  error: type) -> None:
    async def scenario() -> None:
        worker, release, log = ModelWorker(max_queue=0), threading.Event(), []
        ticket = worker.submit(_blocking_job(release, log, "a"))
        with pytest.raises(error):
            await settle(ticket.result, ticket=ticket, receive=receive, deadline=Deadline(deadline_s))
        await asyncio.sleep(0.05)
        assert log == ["a started", "a stopped"] and not worker.busy
        worker.close()

    asyncio.run(scenario())


# ---- the command: user errors before anything listens; the web stack stays out of the rest -------------------


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--model", "{tmp}"], {}, "not a pulse-edge bundle"),
    (["--model", "{tmp}", "--api-key", "env"], {API_KEY_ENV: ""}, f"${API_KEY_ENV} is not set or empty"),
    (["--model", "{tmp}", "--allow-dir", "{tmp}/missing"], {}, "not an existing directory"),
])
def test_serve_refuses_bad_settings_in_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                                words: str) -> None:
    from click.testing import CliRunner

    from pulse_edge.cli.main import main

    result = CliRunner().invoke(main, ["serve", *(a.format(tmp=tmp_path) for a in args)], env=env)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("flag", "prepack"), [([], True), (["--no-prepack"], False)])
def test_serve_passes_no_prepack_to_its_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str],
                                                 prepack: bool) -> None:
    """A bundle whose prepacked weights do not fit is told to load with --no-prepack: serve must have it."""
    from click.testing import CliRunner

    import pulse_edge.runtime.server.launch as launch
    from pulse_edge.cli.main import main

    seen = []
    monkeypatch.setattr(launch, "serve", lambda config, say: seen.append(config))
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), *flag])
    assert result.exit_code == 0, result.output
    assert seen[0].session.prepack is prepack


def test_quiet_serve_logs_no_line_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pulse-edge -q serve`: uvicorn's access log (a line per request, a /health probe's 8,600 a day) and its
    start-up lines are off; without -q they are on."""
    from click.testing import CliRunner

    import pulse_edge.runtime.server.launch as launch
    from pulse_edge.cli.main import main

    seen = []
    monkeypatch.setattr(launch, "serve", lambda config, say: seen.append(config))
    for flags in (["-q"], []):
        assert CliRunner().invoke(main, [*flags, "serve", "--model", str(tmp_path)]).exit_code == 0
    settings = [launch.uvicorn_settings(config, app=lambda scope, receive, send: None) for config in seen]
    assert [(s.access_log, s.log_level) for s in settings] == [(False, "warning"), (True, "info")]


def test_serve_hashes_every_byte_of_its_bundle_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server runs for weeks on one load: bits that rotted after the bundle's stamp (metadata unchanged) are seen
    by a whole hash only, so serve asks for one, where infer's loads check the sample of a stamped bundle."""
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.server import model

    asked: dict[str, Any] = {}

    class Loaded(Exception):
        pass

    class Pipeline:
        @staticmethod
        def from_bundle(bundle: Path, **options: Any) -> None:
            asked.update(options)
            raise Loaded

    monkeypatch.setattr(model, "Pipeline", Pipeline)
    with pytest.raises(Loaded):
        model.open_model(tmp_path, SessionConfig())
    assert asked["verify"] is True


def test_only_the_server_loads_the_web_stack() -> None:
    import subprocess
    import sys

    code = ("import sys, pulse_edge.cli.main, pulse_edge.runtime.pipeline\n"
            "print(' '.join(m for m in ('starlette', 'uvicorn', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"importing the CLI or the pipeline loaded {out.stdout.strip()}"


def test_a_runtime_refusal_is_the_clients_400_unless_the_model_failed() -> None:
    """A bad file or prompt is the request's (400); NaN logits are not the client's doing (500), both one line."""
    from pulse_edge.errors import DeviceMemoryError, EngineRunError, InputError, ModelOutputError
    from pulse_edge.runtime.server.errors import from_runtime

    assert from_runtime(InputError("ecg.png: is empty")).body()["error"]["code"] == "bad_request"
    failed = from_runtime(ModelOutputError("the model's logits hold NaN or inf"))
    assert failed.status == 500 and failed.body()["error"]["message"] == "the model's logits hold NaN or inf"
    assert from_runtime(EngineRunError("onnxruntime failed running decoder.onnx (...)")).status == 500
    for full in (MemoryError("onnxruntime could not allocate memory running decoder.onnx (bad_alloc)"),
                 DeviceMemoryError("the GPU's memory is full running decoder.onnx (...)"), MemoryError()):
        busy = from_runtime(full)  # the machine's state, which may pass: a 503 OpenAI's clients retry
        assert busy.status == 503 and busy.body()["error"]["message"].endswith("ran out of memory; retry later")


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"fs": 10**400}, "fs", "fs must be a finite number: the sampling rate in Hz"),
    ({"fs": True}, "fs", "fs must be a finite number"), ({"fs": "500"}, "fs", "fs must be a finite number"),
    ({"unit": "mm"}, "unit", "unit must be one of uV, mV, V"),
    ({"leads": []}, "leads", "leads must name the leads in order"),
    ({"leads": "I,,II"}, "leads", "leads must name"), ({"leads": '["I", 2]'}, "leads", "leads must name"),
    ({"leads": '["I", "II"'}, "leads", "leads must name"),
    ({"leads": "[" * 5000}, "leads", "leads must name"),  # nested past Python's stack: refused, not a 500
    ({"leads": "[" + "1" * 5000 + "]"}, "leads", "leads must name"),  # past int()'s 4300-digit limit
])
def test_a_recordings_fields_of_the_wrong_kind_are_400s_naming_the_field(fields: dict, param: str,
                                                                         words: str) -> None:
    from pulse_edge.runtime.server.interpret import recording_options

    with pytest.raises(ApiError, match=words) as caught:
        recording_options(fields)
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("text", ["fast", "1" * 5000, "[" * 5000])  # a word, past int()'s digit limit, too deep
def test_a_numeric_form_field_that_json_cannot_read_is_a_400_quoting_its_start(text: str) -> None:
    from pulse_edge.runtime.server.interpret import _form_value

    with pytest.raises(ApiError, match=rf"^fs must be a number, got {re.escape(repr(text[:40]))}$") as caught:
        _form_value("fs", text)
    assert caught.value.status == 400 and caught.value.param == "fs"


def test_leads_are_a_list_in_json_or_in_a_forms_text() -> None:
    """In a multipart form a JSON list arrives as text: read as the list, not split on its commas."""
    from pulse_edge.runtime.server.interpret import recording_options

    wanted = {"fs": 500.0, "unit": "uV", "leads": ("V1", "II")}
    for leads in (["V1", "II"], '["V1", "II"]', "V1, II"):
        assert recording_options({"fs": 500, "unit": "uV", "leads": leads}) == wanted


# ---- a full memory through the app: one line, a 503, counted as such -------------------------------------------


class _FullMemory:
    """A pipeline whose answers run out of memory, before any text or after `said`."""

    def __init__(self, said: str | None) -> None:
        self.said = said

    def chat(self, system: str | None = None) -> _FullMemory:
        return self

    def ask(self, question: str, image: Any, *, on_text: Any = None, **kwargs: Any) -> None:
        if self.said is not None and on_text is not None:
            on_text(self.said)
        raise MemoryError("onnxruntime could not allocate memory running decoder.onnx (std::bad_alloc)")


async def _asgi(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.sleep(3600)  # the client stays: no disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _through_app(pipeline: Any, tmp_path: Path, *, stream: bool, timeout_s: float = 30.0,
                 body: dict[str, Any] | None = None, path: str = "/v1/chat/completions") -> tuple[int, bytes, bytes]:
    """(status, body, /metrics after it) of one request to the app over `pipeline`, a stand-in for the model."""
    import json
    from io import BytesIO

    from pulse_testing.pages import page

    from pulse_edge.runtime.server.app import create_app
    from pulse_edge.runtime.server.model import ServedModel
    from pulse_edge.runtime.server.state import ServerConfig, ServerState

    config = ServerConfig(bundle=tmp_path, host="127.0.0.1", port=0, api_key=None, max_queue=2, allow_dir=tmp_path,
                          max_body_bytes=1 << 20, timeout_s=timeout_s)
    state = ServerState.create(config, ServedModel(pipeline=pipeline, model_id="tiny", bundle_id="0" * 64,
                                                   provider="cpu"))
    app = create_app(state)
    if body is None:
        png = BytesIO()
        page((256, 256)).save(png, format="PNG")
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            png.getvalue()).decode()}}
        body = {"model": "tiny", "stream": stream, "max_tokens": 4,
                "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Rate?"}]}]}

    async def scenario() -> tuple[int, bytes, bytes]:
        status, answer = await _asgi(app, "POST", path, json.dumps(body).encode())
        return status, answer, (await _asgi(app, "GET", "/metrics"))[1]

    try:
        return asyncio.run(scenario())
    finally:
        state.worker.close()


def _events(answer: bytes) -> list[dict[str, Any]]:
    import json

    return [json.loads(e.removeprefix("data: ")) for e in answer.decode().split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize(("stream", "said"), [(False, None), (True, None), (True, "Sinus")])
def test_a_full_memory_is_a_503_with_its_line_and_counted_as_unavailable(tmp_path: Path, stream: bool,
                                                                          said: str | None) -> None:
    """Not a 500 with a traceback: the machine's state, which may pass (OpenAI's clients retry a 503); mid-stream
    (status 200 already sent) the error event carries it. /metrics counts it as `unavailable`, not `queue_full`."""
    import json

    status, answer, metrics = _through_app(_FullMemory(said), tmp_path, stream=stream)
    error = json.loads(answer)["error"] if not said else next(e["error"] for e in _events(answer) if "error" in e)
    assert status == (200 if said else 503)
    assert error["message"] == ("onnxruntime could not allocate memory running decoder.onnx (std::bad_alloc): the "
                                "server ran out of memory; retry later") and error["type"] == "server_error"
    assert b'outcome="unavailable"} 1.0' in metrics and b'outcome="queue_full"} 1.0' not in metrics


class _Broken(_FullMemory):
    """A pipeline with a bug: some text, then an error no refusal expects."""

    def ask(self, question: str, image: Any, *, on_text: Any = None, **kwargs: Any) -> None:
        if on_text is not None:
            on_text("Sinus")
        raise RuntimeError("a bug mid-answer")


class _Slow(_FullMemory):
    """Some text, then nothing until the server asks it to stop."""

    def ask(self, question: str, image: Any, *, on_text: Any = None, should_stop: Any = None, **kwargs: Any) -> None:
        on_text("Sinus")
        end = time.monotonic() + 10
        while not should_stop() and time.monotonic() < end:
            time.sleep(0.01)
        raise RuntimeError("never stopped")


@pytest.mark.parametrize(("pipeline", "timeout_s", "code"), [(_Broken(None), 30.0, "error"),
                                                              (_Slow(None), 1.0, "timeout")],
                         ids=["a bug", "the deadline"])
def test_a_stream_that_cannot_finish_ends_in_an_error_event_counted_as_such(tmp_path: Path, pipeline: Any,
                                                                             timeout_s: float, code: str) -> None:
    """Status 200 and some text already sent: a bug, or --timeout passing, ends the stream with its error event
    (a stream cut without one reads as a finished answer), and /metrics counts it by what it was."""
    status, answer, metrics = _through_app(pipeline, tmp_path, stream=True, timeout_s=timeout_s)
    assert status == 200 and [e["error"]["code"] for e in _events(answer) if "error" in e] == [code]
    assert f'endpoint="/v1/chat/completions",outcome="{code}"}} 1.0'.encode() in metrics


def test_a_misspelt_interpret_field_is_a_400(tmp_path: Path) -> None:
    """`lead=` for `leads=` would read a recording in another lead order: never dropped in silence."""
    import json

    status, answer, _ = _through_app(_FullMemory(None), tmp_path, stream=False, path="/v1/ecg/interpret",
                                     body={"path": "ecg.png", "lead": "V1,V2"})
    assert status == 400 and "unknown fields ['lead']" in json.loads(answer)["error"]["message"]


class _StoppedByShutdown(_FullMemory):
    """An interpretation the closing worker stopped mid-answer: a partial answer whose stop reason says so."""

    def interpret(self, ecg: Any, question: str, **kwargs: Any) -> Any:
        class Stopped:
            def to_dict(self) -> dict[str, Any]:
                return {"text": "Sinus rhy", "stop_reason": "cancelled",
                        "timings": {"time_to_first_token_ms": 5.0, "decode_tokens_per_s": 0.0}}
        return Stopped()


def test_an_interpretation_the_shutdown_stopped_is_a_503_not_a_cut_answer(tmp_path: Path) -> None:
    """A server stopping mid-answer ends the generation early: the cut text came back as a 200 answer, which a
    cart would file as the interpretation. A 503 says to send it again."""
    import json

    from pulse_testing.pages import page

    from pulse_edge.runtime.server.errors import SHUTTING_DOWN

    page((256, 256)).save(tmp_path / "ecg.png")
    status, answer, metrics = _through_app(_StoppedByShutdown(None), tmp_path, stream=False,
                                           path="/v1/ecg/interpret", body={"path": "ecg.png"})
    assert status == 503 and json.loads(answer)["error"]["message"] == SHUTTING_DOWN
    assert b'pulse_edge_generations_total{stop_reason="cancelled"} 1.0' in metrics
    waited = float(re.search(rb"^pulse_edge_queue_wait_seconds_sum (\S+)$", metrics, re.M).group(1))
    assert b"pulse_edge_queue_wait_seconds_count 1.0" in metrics and 0 <= waited < 5  # the job's wait, once


def test_statuses_metrics_and_limits_are_what_clients_and_dashboards_read(tmp_path: Path) -> None:
    """A timeout is a 504 and a worker closing mid-prompt a 503 (clients retry both, never a 400); the gauges read
    the queue, the time to first token is in seconds; uvicorn keeps its connection limit, its graceful shutdown and
    the 10 s head deadline; a deadline never grants more time than asked."""
    from pulse_edge.errors import GenerationStopped
    from pulse_edge.runtime.server import launch
    from pulse_edge.runtime.server.errors import ApiError, from_runtime
    from pulse_edge.runtime.server.metrics import Metrics
    from pulse_edge.runtime.server.state import ServerConfig
    from pulse_edge.runtime.server.waiting import Deadline

    assert ApiError("timeout", "x").status == 504 and from_runtime(GenerationStopped("x")).status == 503
    metrics = Metrics(waiting=lambda: 3, busy=lambda: True)
    metrics.generation("eos", {"time_to_first_token_ms": 800.0, "decode_tokens_per_s": 5.0})
    shown = metrics.render().decode()
    assert "pulse_edge_queue_depth 3.0" in shown and "pulse_edge_generating 1.0" in shown
    assert "pulse_edge_time_to_first_token_seconds_sum 0.8" in shown
    config = ServerConfig(bundle=tmp_path, host="127.0.0.1", port=0, api_key=None, max_queue=2, allow_dir=None,
                          max_body_bytes=1 << 20, timeout_s=30.0)
    settings = launch.uvicorn_settings(config, app=lambda scope, receive, send: None)
    assert settings.limit_concurrency == launch.connection_limit(2) and settings.timeout_graceful_shutdown == 5
    assert launch.HEAD_DEADLINE_S == 10.0 and Deadline(0.2).remaining() <= 0.2


def test_serve_warns_when_reachable_from_other_machines_without_a_key(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ECGs reachable from the hospital network with no key: the operator is told, once, and only then."""
    from types import SimpleNamespace

    import pulse_edge.runtime.server.launch as launch
    from pulse_edge.runtime.server.state import ServerConfig

    model = SimpleNamespace(model_id="tiny", pipeline=SimpleNamespace(manifest=SimpleNamespace(precision="fp32")))
    monkeypatch.setattr(launch, "open_model", lambda bundle, session: model)
    monkeypatch.setattr(launch.ServerState, "create", classmethod(
        lambda cls, config, served: SimpleNamespace(worker=SimpleNamespace(close=lambda: None))))
    monkeypatch.setattr(launch, "create_app", lambda state: None)
    monkeypatch.setattr(launch, "uvicorn_settings", lambda config, app: None)
    monkeypatch.setattr(launch.ClosingServer, "__init__", lambda self, settings, close: None)
    monkeypatch.setattr(launch.ClosingServer, "run", lambda self, sockets: [s.close() for s in sockets])
    warned = {}
    for host in ("0.0.0.0", "127.0.0.1"):
        lines: list[str] = []
        launch.serve(ServerConfig(bundle=tmp_path, host=host, port=0, api_key=None, max_queue=2, allow_dir=None,
                                  max_body_bytes=1 << 20, timeout_s=30.0), lines.append)
        warned[host] = [line for line in lines if line.startswith("warning")]
    assert len(warned["0.0.0.0"]) == 1 and "no --api-key" in warned["0.0.0.0"][0] and warned["127.0.0.1"] == []


def test_a_body_that_does_not_arrive_in_time_is_a_408(tmp_path: Path) -> None:
    """A slow client, not a slow server: 504 said the server was."""
    import json

    from pulse_edge.runtime.server.app import create_app
    from pulse_edge.runtime.server.model import ServedModel
    from pulse_edge.runtime.server.state import ServerConfig, ServerState

    config = ServerConfig(bundle=tmp_path, host="127.0.0.1", port=0, api_key=None, max_queue=2, allow_dir=None,
                          max_body_bytes=1 << 20, timeout_s=0.2)
    model = ServedModel(pipeline=_FullMemory(None), model_id="tiny", bundle_id="0" * 64, provider="cpu")
    app = create_app(ServerState.create(config, model))
    sent: list[dict[str, Any]] = []
    arriving = [{"type": "http.request", "body": b'{"messages": ', "more_body": True}]  # then nothing more

    async def receive() -> dict[str, Any]:
        if arriving:
            return arriving.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 408
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert "the request body did not arrive within" in body["error"]["message"]


def test_the_connection_limit_stays_within_the_open_files_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """1024 connections under systemd's soft limit of 1024 files: accept() failed with EMFILE in a loop while
    /health went unanswered. The soft limit is raised to the hard one, and the limit kept below it."""
    import resource

    from pulse_edge.runtime.server import launch

    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: set_to.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1024))
    assert launch.connection_limit(4) == 1024 - launch.FD_MARGIN and set_to == []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 1 << 30))  # raised only as far as needed
    needed = launch.CONNECTION_LIMIT + launch.FD_MARGIN
    assert launch.connection_limit(4) == launch.CONNECTION_LIMIT and set_to == [(needed, 1 << 30)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 64))
    assert launch.connection_limit(4) == 5  # never below the model's own slots

    def refused(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "setrlimit", refused)  # a sandbox, or macOS's own cap: stay within the soft one
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 1 << 30))
    assert launch.connection_limit(4) == 256 - launch.FD_MARGIN


def test_a_request_during_shutdown_is_told_so_not_that_the_model_is_busy(tmp_path: Path) -> None:
    from pulse_edge.runtime.server.model import ServedModel
    from pulse_edge.runtime.server.state import ServerConfig, ServerState

    config = ServerConfig(bundle=tmp_path, host="127.0.0.1", port=0, api_key=None, max_queue=2, allow_dir=None,
                          max_body_bytes=1 << 20, timeout_s=30.0)
    state = ServerState.create(config, ServedModel(pipeline=_FullMemory(None), model_id="tiny",
                                                   bundle_id="0" * 64, provider="cpu"))
    state.worker.close()
    with pytest.raises(ApiError, match="the server is shutting down") as caught:
        state.submit(lambda should_stop: None)
    assert caught.value.status == 503 and caught.value.kind == "unavailable"


# ---- what the mutation review found untested (2026-12-07) -------------------------------------------------


def test_a_chunked_body_past_the_limit_is_refused_as_it_arrives_and_one_at_the_limit_is_read() -> None:
    """A body without Content-Length is counted as it arrives: unlimited, a client could stream any size into
    memory. One of exactly the limit is read."""
    from pulse_edge.runtime.server.app import Guard

    async def serve(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[int]:
        messages = [{"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)} for i, c in enumerate(chunks)]
        got: list[int] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            while True:
                message = await receive()
                got.append(len(message["body"]))
                if not message["more_body"]:
                    return

        scope = {"type": "http", "path": "/v1/chat/completions", "headers": headers}
        await Guard(app, api_key=None, max_body_bytes=1000, timeout_s=5.0)(scope, receive, None)
        return got

    with pytest.raises(ApiError) as caught:
        asyncio.run(serve([b"x" * 600] * 3 + [b""], []))
    assert caught.value.kind == "too_large"
    assert asyncio.run(serve([b"x" * 400, b"x" * 600], [])) == [400, 600]
    assert asyncio.run(serve([b"x" * 1000], [(b"content-length", b"1000")])) == [1000]


def test_finish_reason_and_usage_as_openai_clients_read_them() -> None:
    """An answer the context cut short is "length" (a client takes "stop" for a whole answer); usage adds up."""
    from pulse_edge.runtime.generation.result import GenerationResult, Timings
    from pulse_edge.runtime.server.openai_api import finish_reason, usage

    def result(stop: str) -> GenerationResult:
        return GenerationResult(text="Sinus.", token_ids=[5, 2], image_tokens=2880, prompt_tokens=2950,
                                generated_tokens=2, stop_reason=stop, timings=Timings(0, 0, 0, 0, 0, 0),
                                backend="ort")

    assert [finish_reason(result(s)) for s in ("eos", "max_new_tokens", "context_full")] == ["stop", "length",
                                                                                           "length"]
    assert usage(result("eos")) == {"prompt_tokens": 2950, "completion_tokens": 2, "total_tokens": 2952}
    with pytest.raises(ApiError, match="system messages must come before"):
        _parse(messages=[_user(_image()), {"role": "system", "content": "Be brief."}])


def test_metrics_count_generations_and_leave_a_rate_of_zero_out() -> None:
    from pulse_edge.runtime.server.metrics import Metrics

    metrics = Metrics(waiting=lambda: 0, busy=lambda: False)
    metrics.generation("eos", {"time_to_first_token_ms": 900.0, "decode_tokens_per_s": 0.0})  # one token: no rate
    metrics.generation("eos", {"time_to_first_token_ms": 800.0, "decode_tokens_per_s": 12.5})
    text = metrics.render().decode()
    assert 'pulse_edge_generations_total{stop_reason="eos"} 2.0' in text
    assert "pulse_edge_decode_tokens_per_second_count 1.0" in text
    assert "pulse_edge_time_to_first_token_seconds_count 2.0" in text


def test_draining_a_refused_body_stops_at_silence_but_reads_a_slow_sender_to_its_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that declared a body past the limit and sent none of it waited the whole --timeout for its 413; a
    slow one still sending must be read to its end (an early close resets the socket, and the 413 is lost)."""
    from pulse_edge.runtime.server import app
    from pulse_edge.runtime.server.app import drain

    async def silent() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.request", "body": b"", "more_body": False}

    start = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(drain(silent, 0.05))
    assert time.monotonic() - start < 2
    chunks = [{"type": "http.request", "body": b"x" * 100, "more_body": more} for more in (True, True, False)]
    taken: list[dict[str, Any]] = []

    async def slow() -> dict[str, Any]:
        if taken:  # the first piece at once, then one every 0.1 s: longer than the idle limit
            await asyncio.sleep(0.1)
        taken.append(chunks[len(taken)])
        return taken[-1]

    asyncio.run(drain(slow, 0.05))
    assert len(taken) == 3

    async def one_byte_then_silence() -> dict[str, Any]:
        if taken:
            await asyncio.sleep(10)
        taken.append({"type": "http.request", "body": b"x", "more_body": True})
        return taken[-1]

    taken.clear()
    with monkeypatch.context() as patched:  # a pause past DRAIN_STALL_S once the body began: answered then
        patched.setattr(app, "DRAIN_STALL_S", 0.2)
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(drain(one_byte_then_silence, 0.05))
        assert time.monotonic() - start < 2


def test_a_path_is_checked_again_when_its_turn_comes(tmp_path: Path) -> None:
    """The path was checked when the request came and opened when the model was free, minutes later maybe: a folder
    swapped meanwhile for a symlink out of --allow-dir was read through it (a concurrency review)."""
    import json

    from pulse_testing.pages import page

    from pulse_edge.runtime.server.app import create_app
    from pulse_edge.runtime.server.model import ServedModel
    from pulse_edge.runtime.server.state import ServerConfig, ServerState

    root, outside = tmp_path / "allowed", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    page((256, 256)).save(root / "sub" / "ecg.png")
    page((256, 256)).save(outside / "ecg.png")
    config = ServerConfig(bundle=tmp_path, host="127.0.0.1", port=0, api_key=None, max_queue=2,
                          allow_dir=root.resolve(), max_body_bytes=1 << 20, timeout_s=30.0)
    state = ServerState.create(config, ServedModel(pipeline=_FullMemory(None), model_id="tiny", bundle_id="0" * 64,
                                                   provider="cpu"))
    queued = state.submit

    def swapped_while_queued(job: Any) -> Any:
        shutil.rmtree(root / "sub")
        (root / "sub").symlink_to(outside)
        return queued(job)

    state.submit = swapped_while_queued  # type: ignore[method-assign]
    body = json.dumps({"path": "sub/ecg.png", "max_tokens": 2}).encode()
    try:
        status, answer = asyncio.run(_asgi(create_app(state), "POST", "/v1/ecg/interpret", body))
    finally:
        state.worker.close()
    assert status == 403, answer
    assert "leads outside the allowed directory" in json.loads(answer)["error"]["message"]


def test_text_for_a_stopped_server_is_dropped_not_a_traceback_on_the_model_thread() -> None:
    """Ctrl-C while an answer streamed closed the event loop under the model thread: every later piece and the
    job's end raised 'Event loop is closed' there, printed as tracebacks after the server's last line."""
    from pulse_edge.runtime.server.waiting import TextPipe

    loop = asyncio.new_event_loop()
    pipe = TextPipe(loop)
    pipe.put("Sinus")
    assert loop.run_until_complete(pipe.get()) == "Sinus"
    loop.close()
    pipe.put(" rhythm")
    pipe.end()  # neither raises


def test_a_connection_that_sends_no_whole_request_head_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn times a connection out only after a response: one that never sent a request, or stopped half-way
    through its headers, stayed open for good, and a thousand of them made /health answer 503 (a concurrency
    review). A whole request is served as before, and keep-alive between requests is uvicorn's."""
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pulse_edge.runtime.server import launch

    monkeypatch.setattr(launch, "HEAD_DEADLINE_S", 0.5)
    app = Starlette(routes=[Route("/health", lambda request: PlainTextResponse("ok"))])
    sock = launch.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, http=launch.HeadDeadline, log_level="warning", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        address = sock.getsockname()[:2]

        def closed_within(seconds: float, sent: bytes = b"") -> bool:
            with socket.create_connection(address) as client:
                client.sendall(sent)
                client.settimeout(seconds)
                try:
                    return client.recv(1024) == b""
                except TimeoutError:
                    return False

        assert closed_within(3.0)  # silent
        assert closed_within(3.0, b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half a head
        def answered(client: socket.socket) -> bytes:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            said = b""
            while not said.endswith(b"ok"):
                part = client.recv(1024)
                assert part, said  # closed before the whole answer
                said += part
            return said

        with socket.create_connection(address) as client:  # a whole request: answered, then kept alive
            client.settimeout(3.0)
            assert answered(client).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # past the head deadline: uvicorn's keep-alive (30 s here) holds it open
            assert answered(client).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_bundle_written_over_while_served_is_a_503_health_and_500_answers(tiny_bundle: Path, tmp_path: Path,
                                                                             ecg_png: Path) -> None:
    """/health said "ok" while a `cp` into the served bundle changed every token: now a monitor sees a 503 naming
    the file, and each request a 500 with the line (not the client's 400)."""
    import json

    from pulse_edge.runtime.server.app import create_app
    from pulse_edge.runtime.server.model import open_model
    from pulse_edge.runtime.server.state import ServerConfig, ServerState

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    (tmp_path / "ecg.png").write_bytes(ecg_png.read_bytes())
    config = ServerConfig(bundle=bundle, host="127.0.0.1", port=0, api_key=None, max_queue=2, allow_dir=tmp_path,
                          max_body_bytes=1 << 20, timeout_s=30.0)
    state = ServerState.create(config, open_model(bundle, SessionConfig()))
    app = create_app(state)
    ask = json.dumps({"path": "ecg.png", "max_tokens": 2}).encode()

    async def scenario() -> list[tuple[int, bytes]]:
        answers = [await _asgi(app, "GET", "/health"), await _asgi(app, "POST", "/v1/ecg/interpret", ask)]
        with open(bundle / "embed_tokens.npy", "r+b") as handle:  # an updater's `cp` onto the loaded table
            handle.seek(-64, os.SEEK_END)
            handle.write(bytes(64))
        return [*answers, await _asgi(app, "GET", "/health"), await _asgi(app, "POST", "/v1/ecg/interpret", ask)]

    try:
        (ok, healthy), (answered, _), (sick, health), (refused, body) = asyncio.run(scenario())
    finally:
        state.worker.close()
    assert (ok, json.loads(healthy)["status"], answered) == (200, "ok", 200)
    line = "embed_tokens.npy was written over after the bundle was loaded"
    assert sick == 503 and json.loads(health)["status"] == "error" and line in json.loads(health)["error"]
    assert refused == 500 and line in json.loads(body)["error"]["message"]
