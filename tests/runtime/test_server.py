"""`pulse-edge serve` end to end: a subprocess on a free localhost port, spoken to with the official openai client.

Two servers on one tiny bundle: the real command (an API key, an allowed directory, a small body limit), and
the same command with a gate on every decode step (tests/pulse_testing/gated_serve.py) and no queue, which
holds a generation mid-answer for as long as a test needs: a full queue and a client leaving are then
deterministic. Both are always stopped; each must still be alive at the end and never have logged a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the acceptance test talks to the server with the openai client")

from pulse_edge.export.build.bundle import export_bundle  # noqa: E402
from pulse_edge.runtime.inputs.images import load_image  # noqa: E402
from pulse_edge.runtime.pipeline import Pipeline  # noqa: E402
from pulse_edge.runtime.text.prompt import Turn  # noqa: E402

KEY = "test-key-0123456789"
QUESTION = "What is the rhythm?"
TOKENS = 24
GATED = Path(__file__).resolve().parents[1] / "pulse_testing" / "gated_serve.py"
STARTUP_S = 90


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "tiny-fp32")


@pytest.fixture(scope="module")
def allowed(ecg_png: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    shutil.copy(ecg_png, root / "ecg.png")
    (root / "outside.png").symlink_to(ecg_png)  # a real ECG, but outside the allowed directory
    return root


@pytest.fixture(scope="module")
def infer_answer(bundle: Path, ecg_png: Path) -> dict[str, Any]:
    done = subprocess.run([*_pulse_edge(), "infer", str(ecg_png), "--model", str(bundle), "--json",
                           "--question", QUESTION, "--max-new-tokens", str(TOKENS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _pulse_edge() -> list[str]:
    script = Path(sys.executable).with_name("pulse-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pulse_edge.cli.main"]


@dataclass
class Server:
    process: subprocess.Popen
    log: Path
    url: str = ""

    def stop(self) -> str:
        alive = self.process.poll() is None
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        text = self.log.read_text()
        assert alive, f"the server died during the tests:\n{text[-3000:]}"
        assert "Traceback" not in text, f"the server logged a traceback:\n{text[-3000:]}"
        return text


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    server = Server(subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), log)
    deadline = time.monotonic() + STARTUP_S
    while not server.url:
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        found = re.search(r"serving .* at (http://127\.0\.0\.1:\d+)", log.read_text())
        server.url = found.group(1) if found else ""
        time.sleep(0.05)
    while _http("GET", f"{server.url}/health")[0] != 200:
        assert time.monotonic() < deadline, "the server never answered /health"
        time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def server(bundle: Path, allowed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    command = [*_pulse_edge(), "serve", "--model", str(bundle), "--port", "0", "--api-key", "env",
               "--allow-dir", str(allowed), "--max-body-mb", "2"]
    running = _start(command, tmp_path_factory.mktemp("log") / "serve.log", {**os.environ, "PULSE_EDGE_API_KEY": KEY})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate") / "closed"


@pytest.fixture(scope="module")
def gated(bundle: Path, gate: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    command = [sys.executable, str(GATED), str(gate), "serve", "--model", str(bundle), "--port", "0",
               "--max-queue", "0"]
    running = _start(command, tmp_path_factory.mktemp("log") / "gated.log")
    try:
        yield running
    finally:
        gate.unlink(missing_ok=True)
        running.stop()


def _client(server: Server, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _http(method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def _auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **(extra or {})}


def _messages(png: bytes, question: str = QUESTION, images: int = 1) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": url}}] * images
    return [{"role": "user", "content": parts}]


def _multipart(fields: dict[str, str], file: tuple[str, bytes] | None = None,
               *more: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    chunks = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in fields.items()]
    for name, data in ((file,) if file is not None else ()) + more:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                      "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _metric(server: Server, name: str, **labels: str) -> float:
    status, _, body = _http("GET", f"{server.url}/metrics", headers=_auth())
    assert status == 200
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$",
                      body.decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _eventually(condition: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the OpenAI-compatible API ----------------------------------------------------------------------------


def test_health_is_open_and_names_the_bundle(server: Server, bundle: Path) -> None:
    status, headers, body = _http("GET", f"{server.url}/health")  # no key: probes need none
    health = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert health["model_loaded"] is True and health["model"] == bundle.name
    assert (health["backend"], health["precision"]) == ("ort", "fp32")
    assert health["bundle_id"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    # what a load balancer reads: the queue's depth and limit, and whether an answer is being made
    assert health["queue"] == {"waiting": 0, "max_queue": 16, "generating": False}


def test_models_lists_the_one_bundle(server: Server, bundle: Path) -> None:
    assert [m.id for m in _client(server).models.list()] == [bundle.name]
    assert _client(server).models.retrieve(bundle.name).owned_by == "pulse-edge"
    status, _, body = _http("GET", f"{server.url}/v1/models/another-bundle", headers=_auth())
    error = json.loads(body)["error"]  # a client that checks a model exists before asking is told no
    assert status == 404 and (error["code"], error["param"]) == ("not_found", "model")


def test_a_completion_gives_infers_greedy_tokens(server: Server, bundle: Path, ecg_png: Path,
                                                 infer_answer: dict[str, Any]) -> None:
    reply = _client(server).chat.completions.create(
        model=bundle.name, messages=_messages(ecg_png.read_bytes()), max_tokens=TOKENS, temperature=0,
        extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == infer_answer["token_ids"]
    assert choice.message.content == infer_answer["text"] and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (infer_answer["prompt_tokens"], TOKENS)
    assert reply.object == "chat.completion" and reply.model == bundle.name
    assert reply.model_extra["notes"] == []  # an image goes to the model as it is


def test_a_chat_about_a_recording_says_what_was_done_to_it(server: Server, bundle: Path) -> None:
    """A DICOM in the data URI is rendered as the print: its notes (here: 8 s, under the print's 10) reach the
    client, in the completion and in a stream's last chunk, as infer prints them."""
    from pulse_testing.ecg_files import beats, dicom_bytes, dicom_dataset

    url = "data:application/dicom;base64," + base64.b64encode(
        dicom_bytes(dicom_dataset(beats(4000, 500.0), 500.0))).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    reply = _client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=2)
    assert any("the recording lasts 8.00 s" in note for note in reply.model_extra["notes"]), reply.model_extra
    chunks = list(_client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=2,
                                                          stream=True))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["notes"] == reply.model_extra["notes"]


def test_a_stream_gives_the_same_answer(server: Server, bundle: Path, ecg_png: Path,
                                        infer_answer: dict[str, Any]) -> None:
    chunks = list(_client(server).chat.completions.create(
        model=bundle.name, messages=_messages(ecg_png.read_bytes()), max_tokens=TOKENS, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == infer_answer["text"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.prompt_tokens == infer_answer["prompt_tokens"]


def test_a_replayed_chat_with_a_system_prompt_matches_the_runtime(server: Server, bundle: Path,
                                                                  ecg_png: Path) -> None:
    messages = [{"role": "system", "content": "You read ECGs."}, *_messages(ecg_png.read_bytes()),
                {"role": "assistant", "content": "Sinus rhythm."}, {"role": "user", "content": "And the rate?"}]
    reply = _client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=6,
                                                    extra_body={"return_token_ids": True})
    local = Pipeline.from_bundle(bundle).chat(system="You read ECGs.").ask(
        "And the rate?", load_image(ecg_png), history=[Turn(QUESTION, "Sinus rhythm.")], max_new_tokens=6)
    assert reply.choices[0].model_extra["token_ids"] == local.token_ids
    assert reply.usage.prompt_tokens == local.prompt_tokens


@pytest.mark.parametrize(("image", "images", "words"), [
    (b"this is not an image", 1, "not an image, PDF or ECG recording"), (None, 2, "found 2 images"),
    (None, 0, "found no image")])
def test_a_bad_image_is_a_400_with_a_json_error(server: Server, bundle: Path, ecg_png: Path, image: bytes | None,
                                                images: int, words: str) -> None:
    messages = _messages(image or ecg_png.read_bytes(), images=images)
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=4)
    assert caught.value.status_code == 400 and words in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.response.headers["content-type"] == "application/json"


def test_the_key_is_enforced(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    status, headers, body = _http("GET", f"{server.url}/metrics")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["www-authenticate"] == "Bearer"
    assert _http("GET", f"{server.url}/metrics", headers=_auth())[0] == 200
    # the scheme is case-insensitive (RFC 9110); the key is not
    assert _http("GET", f"{server.url}/metrics", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert _http("GET", f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY.upper()}"})[0] == 401
    assert _http("GET", f"{server.url}/metrics", headers={"Authorization": KEY})[0] == 401
    assert _http("GET", f"{server.url}/metrics", headers={"Authorization": f"Basic {KEY}"})[0] == 401  # only Bearer


# ---- the ECG-native API -----------------------------------------------------------------------------------


def test_interpret_answers_an_upload_or_a_path_like_infer_json(server: Server, ecg_png: Path,
                                                               infer_answer: dict[str, Any]) -> None:
    fields = {"question": QUESTION, "max_tokens": str(TOKENS)}
    upload, headers = _multipart(fields, ("renamed.bin", ecg_png.read_bytes()))
    # a media type's case means nothing (RFC 9110): a cart's client that writes it so is answered the same
    headers["Content-Type"] = headers["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")
    by_path = json.dumps({**fields, "max_tokens": TOKENS, "path": "ecg.png"}).encode()
    varying = {"timings", "input_ms", "source"}  # per run; the source is what each request named
    for body, extra, source in ((upload, headers, "renamed.bin"), (by_path, {"Content-Type": "Application/JSON"},
                                                                     "ecg.png")):
        status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", body, _auth(extra))
        assert status == 200, answer
        answer = json.loads(answer)
        assert set(answer) == set(infer_answer)
        assert {k: v for k, v in answer.items() if k not in varying} == {
            k: v for k, v in infer_answer.items() if k not in varying}
        assert Path(answer["source"]).name == source


def test_interpret_reads_a_wfdb_record_uploaded_as_its_two_files(server: Server, tmp_path: Path) -> None:
    pytest.importorskip("wfdb", reason="WFDB records need the ecg extra")
    from pulse_testing.ecg_files import beats, write_wfdb

    header = write_wfdb(tmp_path, "rec01", beats(5000, 500.0), 500.0)
    parts = [(f"rec01{suffix}", header.with_suffix(suffix).read_bytes()) for suffix in (".hea", ".dat")]
    upload, headers = _multipart({"max_tokens": "2", "fs": "250"}, *parts)
    status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", upload, _auth(headers))
    assert status == 200, answer
    assert json.loads(answer)["input_kind"] == "wfdb"
    # its header holds its rate: an fs given is not used, and the answer says so
    assert "fs given but not used: a WFDB file stores its own" in json.loads(answer)["notes"], answer
    # Two files that are not one record's pair are refused with one line, before the model runs.
    for wrong in ([parts[0], ("rec02.dat", parts[1][1])], [parts[0], ("rec01.png", b"x")]):
        body, headers = _multipart({}, *wrong)
        status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", body, _auth(headers))
        assert status == 400 and "NAME.hea and NAME.dat" in json.loads(answer)["error"]["message"]


def test_interpret_reads_csv_and_npy_recordings_with_their_fs_leads_and_unit(server: Server, tmp_path: Path) -> None:
    """What `infer --fs/--leads/--unit` gives a recording that stores none of them; without fs, the reader's line."""
    from pulse_testing.ecg_files import LEADS, beats, write_csv

    signals = beats(5000, 500.0)  # [12, 5000] mV
    csv = write_csv(tmp_path / "cart.csv", signals * 1000.0, LEADS).read_bytes()  # written in microvolts
    npy_path = tmp_path / "cart.npy"
    np.save(npy_path, signals[::-1].copy())  # the leads in reverse order, as --leads says
    url = f"{server.url}/v1/ecg/interpret"
    npy = ("cart.npy", npy_path.read_bytes())
    swapped = "disagree with I and II by Einthoven's"  # the note on limb leads read in the wrong order
    for file, fields, noted in ((("cart.csv", csv), {"fs": "500", "unit": "uV"}, False),
                                (npy, {"fs": "500", "leads": ",".join(LEADS[::-1])}, False),
                                (npy, {"fs": "500"}, True)):  # without `leads`, the reversed channels disagree
        body, headers = _multipart({"max_tokens": "2", **fields}, file)
        status, _, answer = _http("POST", url, body, _auth(headers))
        assert status == 200, answer
        assert json.loads(answer)["input_kind"] == file[0].rsplit(".", 1)[1]
        assert any(swapped in note for note in json.loads(answer).get("notes", [])) is noted, answer
    refusals = [({}, "a CSV file stores no sampling rate; pass it (--fs HZ; fs= in Python; the server's `fs` field)",
                 None),
                ({"fs": "fast"}, "fs must be a number, got 'fast'", "fs"),
                ({"fs": "500", "unit": "mm"}, "unit must be one of uV, mV, V", "unit"),
                ({"fs": "5"}, "sampling rate 5 Hz is outside 50-20000 Hz", None),
                ({"fs": "500", "leads": "I,,II"}, "leads must name the leads in order", "leads")]
    for fields, message, param in refusals:
        body, headers = _multipart({"max_tokens": "2", **fields}, ("cart.csv", csv))
        status, _, answer = _http("POST", url, body, _auth(headers))
        error = json.loads(answer)["error"]
        assert status == 400 and message in error["message"] and error["param"] == param, answer


@pytest.mark.parametrize(("path", "status"), [("../ecg.png", 403), ("outside.png", 403), ("/etc/hostname", 403),
                                              ("missing.png", 404)])
def test_interpret_reads_no_file_outside_the_allowed_directory(server: Server, path: str, status: int) -> None:
    body = json.dumps({"path": path}).encode()
    got, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", body, _auth({"Content-Type": "application/json"}))
    assert got == status and json.loads(answer)["error"]["param"] == "path"


# ---- limits, garbage, metrics -----------------------------------------------------------------------------


JSON = "application/json"


@pytest.mark.parametrize(("method", "path", "body", "kind", "status"), [
    ("POST", "/v1/chat/completions", b"x" * (2 * 2**20 + 1), JSON, 413),
    ("POST", "/v1/chat/completions", b"{not json", JSON, 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", JSON, 400),
    ("POST", "/v1/chat/completions", b'{"max_tokens": ' + b"1" * 5000 + b"}", JSON, 400),  # past int()'s digit limit
    ("POST", "/v1/chat/completions", b"[" * 5000, JSON, 400),  # nested past Python's stack
    ("POST", "/v1/ecg/interpret", b"plain text", "text/plain", 415),
    ("POST", "/v1/ecg/interpret", b"--x\r\nbroken", "multipart/form-data; boundary=x", 400),
    ("POST", "/v1/ecg/interpret", b"".join(b'--x\r\nContent-Disposition: form-data; name="file"; filename="r%d.dat"'
                                          b"\r\n\r\nxx\r\n" % k for k in range(3)) + b"--x--\r\n",
     "multipart/form-data; boundary=x", 400),  # a third file: a record is two at most
    ("GET", "/v1/nothing-here", None, JSON, 404),
    ("GET", "/v1/chat/completions", None, JSON, 405),
])
def test_bad_requests_get_json_errors_and_the_server_lives_on(server: Server, method: str, path: str,
                                                              body: bytes | None, kind: str, status: int) -> None:
    got, headers, answer = _http(method, f"{server.url}{path}", body, _auth({"Content-Type": kind}))
    assert got == status and headers["content-type"] == "application/json"
    assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}
    assert _http("GET", f"{server.url}/health")[0] == 200


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/ecg/interpret"])
def test_a_question_that_is_not_unicode_text_is_a_400(server: Server, ecg_png: Path, endpoint: str) -> None:
    """JSON can carry half a UTF-16 pair ("\\ud800"), which no tokenizer takes: refused before the queue."""
    question = "Rate?\ud800"
    body = ({"messages": _messages(ecg_png.read_bytes(), question), "max_tokens": 4} if "chat" in endpoint
            else {"path": "ecg.png", "question": question, "max_tokens": 4})
    got, _, answer = _http("POST", f"{server.url}{endpoint}", json.dumps(body).encode(), _auth({"Content-Type": JSON}))
    assert got == 400, answer
    assert "the question is not valid text: character 5" in json.loads(answer)["error"]["message"]
    assert _http("GET", f"{server.url}/health")[0] == 200


def test_metrics_count_requests_by_outcome(server: Server) -> None:
    before = _metric(server, "pulse_edge_requests_total", endpoint="/v1/chat/completions", outcome="bad_request")
    _http("POST", f"{server.url}/v1/chat/completions", b"{}", _auth({"Content-Type": "application/json"}))
    after = _metric(server, "pulse_edge_requests_total", endpoint="/v1/chat/completions", outcome="bad_request")
    assert after == before + 1
    _, _, text = _http("GET", f"{server.url}/metrics", headers=_auth())
    for name in ("pulse_edge_queue_depth", "pulse_edge_time_to_first_token_seconds_bucket",
                 "pulse_edge_decode_tokens_per_second_bucket", "pulse_edge_request_duration_seconds_bucket"):
        assert name in text.decode()


# ---- a full queue, and a client that leaves mid-answer ----------------------------------------------------


def test_a_full_queue_is_503_and_a_client_leaving_frees_the_model(gated: Server, gate: Path, bundle: Path,
                                                                  ecg_png: Path) -> None:
    client, messages = _client(gated), _messages(ecg_png.read_bytes())
    gate.touch()
    stream = client.chat.completions.create(model=bundle.name, messages=messages, max_tokens=500, stream=True)
    next(iter(stream))  # the answer has started: the model is inside its decode loop, held at the gate
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=bundle.name, messages=messages, max_tokens=4)
    assert caught.value.status_code == 503 and int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "queue_full"
    stream.close()  # the client goes away mid-answer
    _eventually(lambda: _metric(gated, "pulse_edge_requests_total", endpoint="/v1/chat/completions",
                                outcome="cancelled") == 1, "the server to see the disconnect")
    gate.unlink()
    _eventually(lambda: _metric(gated, "pulse_edge_generations_total", stop_reason="cancelled") == 1,
                "the generation to stop")
    reply = client.chat.completions.create(model=bundle.name, messages=messages, max_tokens=4)
    assert reply.usage.completion_tokens == 4  # the slot is free again
    assert _metric(gated, "pulse_edge_generations_total", stop_reason="max_new_tokens") == 1


# ---- shutting down with requests in flight -------------------------------------------------------------------


@contextlib.contextmanager
def _stopping_gated_server(bundle: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A gated server with room to queue, for a test that stops it (SIGTERM) itself: it must exit by itself after
    that without a traceback; killed, whatever happened, at the end."""
    gate = tmp_path / "closed"
    running = _start([sys.executable, str(GATED), str(gate), "serve", "--model", str(bundle), "--port", "0",
                      "--max-queue", "2"], tmp_path / "gated.log")
    try:
        yield running, gate
        running.process.wait(timeout=30)
        assert "Traceback" not in running.log.read_text()
    finally:
        gate.unlink(missing_ok=True)
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def _queue(server: Server) -> dict[str, Any]:
    return json.loads(_http("GET", f"{server.url}/health")[2])["queue"]


def test_shutdown_answers_the_waiting_and_the_running_request_with_the_json_503(bundle: Path, ecg_png: Path,
                                                                                tmp_path: Path) -> None:
    """uvicorn waited 5 s for open requests, then cancelled their handlers (a text 500 and a traceback each);
    the model worker closed only after that. Now it closes first: at once for the waiting one, at the next step
    for the running one."""
    from concurrent.futures import ThreadPoolExecutor

    with _stopping_gated_server(bundle, tmp_path) as (running, gate):
        client, messages = _client(running), _messages(ecg_png.read_bytes())
        gate.touch()
        chunks = iter(client.chat.completions.create(model=bundle.name, messages=messages, max_tokens=500,
                                                     stream=True))
        next(chunks)  # generating, held at the gate
        body = json.dumps({"messages": messages, "max_tokens": 4}).encode()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_http, "POST", f"{running.url}/v1/chat/completions", body, {"Content-Type": JSON})
            _eventually(lambda: _queue(running)["waiting"] == 1, "the second request to queue")
            asked = time.monotonic()
            running.process.terminate()
            status, headers, answer = waiting.result(timeout=60)
        assert time.monotonic() - asked < 4  # not after uvicorn's 5 s grace
        assert (status, headers["content-type"]) == (503, "application/json"), answer
        assert "the server is shutting down" in json.loads(answer)["error"]["message"]
        gate.unlink()  # the running generation's next step sees the closed worker
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            for _ in chunks:
                pass


def test_shutdown_gives_a_running_interpretation_and_a_waiting_stream_the_json_503(bundle: Path, ecg_png: Path,
                                                                                     tmp_path: Path) -> None:
    """The same for the other endpoint and the other kind of request: an interpretation cut by the shutdown is a 503,
    never a half-written report, and a stream still waiting gets the JSON 503 a client retries, not a bare 500."""
    from concurrent.futures import ThreadPoolExecutor

    with _stopping_gated_server(bundle, tmp_path) as (running, gate):
        form, kind = _multipart({"max_tokens": "500"}, ("ecg.png", ecg_png.read_bytes()))
        stream = json.dumps({"messages": _messages(ecg_png.read_bytes()), "max_tokens": 4, "stream": True}).encode()
        gate.touch()
        with ThreadPoolExecutor(2) as pool:
            interpreting = pool.submit(_http, "POST", f"{running.url}/v1/ecg/interpret", form, kind)
            _eventually(lambda: _queue(running)["generating"], "the interpretation to start")
            waiting = pool.submit(_http, "POST", f"{running.url}/v1/chat/completions", stream, {"Content-Type": JSON})
            _eventually(lambda: _queue(running)["waiting"] == 1, "the stream to queue")
            running.process.terminate()
            status, headers, answer = waiting.result(timeout=60)
            assert (status, headers["content-type"]) == (503, "application/json"), answer
            gate.unlink()  # the interpretation's next step sees the closed worker
            status, _, answer = interpreting.result(timeout=60)
        assert status == 503 and "the server is shutting down" in json.loads(answer)["error"]["message"], answer


def _raw(server: Server, request: bytes, wait_s: float = 10) -> bytes:
    """What the server sends on one connection for `request` until it closes it (or `wait_s` passes)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    answer = b""
    with socket.create_connection((url.hostname, url.port), timeout=wait_s) as sock:
        sock.sendall(request)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_an_oversize_body_is_refused_without_waiting_for_it(server: Server) -> None:
    """A client waiting for 100 Continue was told to upload 2 MiB past the limit first; one that stalls mid-body
    held the connection open past the timeout (a place of uvicorn's connection limit with it)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000000\r\n").encode()
    answered = _raw(server, head + b"Expect: 100-continue\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answered, answered[:200]
    assert b"connection: close" in answered.lower()
    start = time.monotonic()  # a client that declares the body and sends none of it waited the whole --timeout
    silent = _raw(server, head + b"\r\n", wait_s=30)
    assert silent.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 10, silent[:200]


def test_a_wrong_method_says_which_are_allowed(server: Server) -> None:
    status, headers, _ = _http("GET", f"{server.url}/v1/chat/completions", headers=_auth())
    assert status == 405 and headers.get("allow") == "POST"


def test_a_stream_returns_the_token_ids_asked_for(server: Server, bundle: Path, ecg_png: Path) -> None:
    messages = _messages(ecg_png.read_bytes())
    whole = _client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=6,
                                                    extra_body={"return_token_ids": True})
    chunks = list(_client(server).chat.completions.create(model=bundle.name, messages=messages, max_tokens=6,
                                                          stream=True, extra_body={"return_token_ids": True}))
    last = chunks[-1].choices[0].model_extra
    assert last["token_ids"] == whole.choices[0].model_extra["token_ids"] and len(last["token_ids"]) == 6


@pytest.mark.parametrize(("body", "words"), [({"path": "ecg.png", "question": 0}, "question must be a string"),
                                             ({"path": "ecg.png", "question": []}, "question must be a string"),
                                             ({"path": "ecg.png", "file": "iVBORw0KGgo="}, "multipart")])
def test_interpret_refuses_what_it_would_have_dropped(server: Server, body: dict[str, Any], words: str) -> None:
    status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", json.dumps(body).encode(),
                              _auth({"Content-Type": JSON}))
    assert status == 400 and words in json.loads(answer)["error"]["message"]


def test_a_client_leaving_mid_upload_is_counted_as_cancelled_not_an_error(server: Server) -> None:
    before = {o: _metric(server, "pulse_edge_requests_total", endpoint="/v1/chat/completions", outcome=o)
              for o in ("cancelled", "error")}
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + b'{"messages": ')
    _eventually(lambda: _metric(server, "pulse_edge_requests_total", endpoint="/v1/chat/completions",
                                outcome="cancelled") == before["cancelled"] + 1, "the disconnect to be counted")
    assert _metric(server, "pulse_edge_requests_total", endpoint="/v1/chat/completions",
                   outcome="error") == before["error"]


def test_a_form_question_that_is_not_utf8_is_a_400_and_one_that_is_is_read(server: Server, ecg_png: Path) -> None:
    """Starlette reads a form field that is not UTF-8 as Latin-1: the model was asked "what is ÿþ rhythm"."""
    def post(question: bytes) -> tuple[int, dict[str, Any]]:
        body, headers = _multipart({"question": "QUESTION", "max_tokens": "2"}, ("ecg.png", ecg_png.read_bytes()))
        status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", body.replace(b"QUESTION", question),
                                  _auth(headers))
        return status, json.loads(answer)

    status, answer = post(b"what is \xff\xfe rhythm")
    assert status == 400 and "the field 'question' is not UTF-8 text" in answer["error"]["message"]
    status, answer = post("Quel est le rythme cardiaque ? (é, ü)".encode())
    assert status == 200 and answer["question"] == "Quel est le rythme cardiaque ? (é, ü)"


def test_a_raw_stream_ends_in_done_and_asks_proxies_not_to_buffer(server: Server, bundle: Path, ecg_png: Path) -> None:
    """`data: [DONE]` tells a hand-written SSE reader (curl, a proxy, another SDK) a finished answer from a cut one;
    without `X-Accel-Buffering: no` nginx holds the whole answer back."""
    body = json.dumps({"model": bundle.name, "stream": True, "max_tokens": 2,
                       "messages": _messages(ecg_png.read_bytes())}).encode()
    status, headers, answer = _http("POST", f"{server.url}/v1/chat/completions", body, _auth({"Content-Type": JSON}))
    named = {key.lower(): value for key, value in headers.items()}
    assert status == 200 and answer.endswith(b"data: [DONE]\n\n")
    assert named["x-accel-buffering"] == "no" and "no-cache" in named["cache-control"]


def test_interpret_refuses_two_ecgs_or_a_field_given_twice(server: Server, ecg_png: Path) -> None:
    """A form with both a file and a path, or two questions, was answered from one of them, the other dropped."""
    both, kind = _multipart({"path": "ecg.png"}, ("ecg.png", ecg_png.read_bytes()))
    status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", both, _auth(kind))
    assert status == 400 and "exactly one ECG" in json.loads(answer)["error"]["message"]
    once, kind = _multipart({"question": "Rate?"}, ("ecg.png", ecg_png.read_bytes()))
    boundary = kind["Content-Type"].split("boundary=")[1]
    twice = f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\nAxis?\r\n'.encode() + once
    status, _, answer = _http("POST", f"{server.url}/v1/ecg/interpret", twice, _auth(kind))
    assert status == 400 and "'question' is given twice" in json.loads(answer)["error"]["message"]
