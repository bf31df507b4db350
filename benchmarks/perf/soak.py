"""`pulse-edge bench soak`: many requests against a running `pulse-edge serve`, for latency, errors and leaks.

    render a 12-lead print -> start `pulse-edge serve` (subprocess, free localhost port) -> warm-up
        -> N sequential requests (one client) -> M concurrent requests (K clients) -> stop the server

Requests cycle through the three generating paths: a chat completion, a streamed one (read to `[DONE]`), and
an ECG-native multipart upload. Each answer is checked (a 200 with an error event inside a stream counts as
an error). The server's resident memory (VmRSS from /proc) is read before the first request, after the
warm-up and at the end: a leak shows as growth from the warm-up to the end. 503s are counted apart from
errors (the queue is sized to the clients, so none are expected).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.machine import machine_info, machine_text, model_info
from pulse_edge.benchmarks.common.measure import Stat, ecg_print, load_average
from pulse_edge.benchmarks.common.tables import gib, markdown_table
from pulse_edge.errors import ConfigError

KINDS = ("chat", "chat-stream", "interpret")
QUESTION = "What is the rhythm?"
STARTUP_S = 120
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class SoakConfig:
    model: Path
    sequential: int = 500
    concurrent: int = 200
    clients: int = 8
    warmup: int = 6
    max_new_tokens: int = 16
    size: tuple[int, int] = (2200, 1700)  # a US-letter print at 200 dpi


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer at all
    ok: bool
    seconds: float


class SoakServer:
    """`pulse-edge serve` in a subprocess on a free port; its RSS read from /proc."""

    def __init__(self, model: Path, max_queue: int, log: Path) -> None:
        command = [sys.executable, "-m", "pulse_edge.cli.main", "serve", "--model", str(model), "--port", "0",
                   "--max-queue", str(max_queue)]
        self.log = log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.host, self.port = "127.0.0.1", self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            time.sleep(0.1)
        self.stop()
        raise ConfigError(f"the server did not start; its log: {self.log.read_text()[-500:]!r}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc: the soak benchmark needs Linux")

    def metrics(self) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Client:
    """One keep-alive connection sending the request kinds in turn."""

    def __init__(self, server: SoakServer, png: bytes, max_new_tokens: int, model_id: str) -> None:
        self.server, self.connection = server, None
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                 {"type": "image_url", "image_url": {"url": uri}}]}]
        chat = {"model": model_id, "messages": messages, "max_tokens": max_new_tokens}
        form, boundary = _multipart({"question": QUESTION, "max_tokens": str(max_new_tokens)}, png)
        self.bodies = {
            "chat": ("/v1/chat/completions", json.dumps(chat).encode(), "application/json"),
            "chat-stream": ("/v1/chat/completions", json.dumps({**chat, "stream": True}).encode(),
                            "application/json"),
            "interpret": ("/v1/ecg/interpret", form, f"multipart/form-data; boundary={boundary}"),
        }

    def send(self, kind: str) -> Outcome:
        path, body, content_type = self.bodies[kind]
        start = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.server.host, self.server.port,
                                                             timeout=REQUEST_TIMEOUT_S)
            self.connection.request("POST", path, body, {"Content-Type": content_type})
            response = self.connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            self.connection = None  # reconnect for the next request
            return Outcome(kind, 0, False, time.perf_counter() - start)
        return Outcome(kind, response.status, _answer_ok(kind, response.status, answer),
                       time.perf_counter() - start)


def _answer_ok(kind: str, status: int, answer: bytes) -> bool:
    if status != 200:
        return False
    try:
        if kind == "chat-stream":
            events = [line[6:] for line in answer.decode().splitlines() if line.startswith("data: ")]
            return events[-1] == "[DONE]" and not any('"error"' in e[:12] for e in events)
        parsed = json.loads(answer)
        return bool(parsed["choices"][0]["message"]) if kind == "chat" else bool(parsed["token_ids"])
    except (ValueError, KeyError, IndexError):
        return False


def _multipart(fields: dict[str, str], png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for key, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="ecg.png"\r\n'
              "Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), boundary


def _sequential(client: Client, count: int, offset: int = 0) -> list[Outcome]:
    return [client.send(KINDS[(offset + i) % len(KINDS)]) for i in range(count)]


def _concurrent(clients: list[Client], count: int) -> list[Outcome]:
    """`count` requests shared by the clients, each sending its next one as soon as the last is answered."""
    outcomes: list[Outcome] = []
    lock, counter = threading.Lock(), iter(range(count))

    def work(client: Client) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            outcome = client.send(KINDS[i % len(KINDS)])
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _phase(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    seconds = [o.seconds for o in outcomes if o.ok]
    stat = Stat.of(seconds) if seconds else None
    return {"requests": len(outcomes), "ok": sum(o.ok for o in outcomes),
            "busy_503": sum(o.status == 503 for o in outcomes),
            "errors": sum(not o.ok and o.status != 503 for o in outcomes),
            "p50_s": stat.p50 if stat else None, "p95_s": stat.p95 if stat else None,
            "max_s": max(seconds) if seconds else None, "wall_s": wall_s,
            "requests_per_s": len(outcomes) / wall_s if wall_s else None,
            "by_kind": {k: Stat.of([o.seconds for o in outcomes if o.kind == k and o.ok]).p50
                        for k in KINDS if any(o.kind == k and o.ok for o in outcomes)},
            "failures": [asdict(o) for o in outcomes if not o.ok][:20]}


def run_soak(config: SoakConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    if config.sequential < 1 or config.concurrent < 1 or config.clients < 1:
        raise ConfigError("--sequential, --concurrent and --clients must be at least 1")
    buffer = io.BytesIO()
    ecg_print(config.size).save(buffer, format="PNG")
    png = buffer.getvalue()
    report: dict[str, Any] = {"config": {**asdict(config), "model": str(config.model), "png_bytes": len(png)},
                              "machine": {**machine_info(), "load_average": load_average()},
                              "model": model_info(config.model)}
    with tempfile.TemporaryDirectory(prefix="pulse-edge-soak-") as work:
        server = SoakServer(config.model, max_queue=config.clients, log=Path(work) / "serve.log")
        try:
            report.update(_drive(server, config, png, progress))
        finally:
            server.stop()  # SIGTERM: uvicorn finishes open requests, then re-raises the signal (exit -15)
            log = server.log.read_text()
            report["server_shut_down_cleanly"] = "Finished server process" in log and "Traceback" not in log
    report["machine"]["load_average_end"] = load_average()
    return report


def _drive(server: SoakServer, config: SoakConfig, png: bytes, progress: Callable[[str], None]) -> dict[str, Any]:
    rss = {"start": server.rss_bytes()}
    model_id = config.model.resolve().name
    clients = [Client(server, png, config.max_new_tokens, model_id) for _ in range(config.clients)]
    progress(f"server up (pid {server.process.pid}, RSS {gib(rss['start'])}); {config.warmup} warm-up requests")
    warm = _sequential(clients[0], config.warmup)
    rss["after_warmup"] = server.rss_bytes()
    progress(f"{config.sequential} sequential requests")
    start = time.perf_counter()
    sequential = _sequential(clients[0], config.sequential)
    sequential_wall = time.perf_counter() - start
    rss["after_sequential"] = server.rss_bytes()
    progress(f"{config.concurrent} concurrent requests from {config.clients} clients")
    start = time.perf_counter()
    concurrent = _concurrent(clients, config.concurrent)
    concurrent_wall = time.perf_counter() - start
    rss["end"] = server.rss_bytes()
    return {"warmup_errors": sum(not o.ok for o in warm), "rss_bytes": rss,
            "rss_growth_from_warmup": rss["end"] / rss["after_warmup"] - 1,
            "phases": {"sequential": _phase(sequential, sequential_wall),
                       "concurrent": _phase(concurrent, concurrent_wall)},
            "server_metrics": _server_counts(server.metrics())}


def _server_counts(text: str) -> dict[str, float]:
    """The server's own request and generation counters, to check against the client's view."""
    counts = {}
    for line in text.splitlines():
        if line.startswith(("pulse_edge_requests_total", "pulse_edge_generations_total")):
            name, value = line.rsplit(" ", 1)
            counts[name] = float(value)
    return counts


def soak_table(report: dict[str, Any]) -> str:
    rows = []
    for name, phase in report["phases"].items():
        clients = 1 if name == "sequential" else report["config"]["clients"]
        rows.append([name, str(clients), str(phase["requests"]), str(phase["ok"]), str(phase["busy_503"]),
                     str(phase["errors"]), _ms(phase["p50_s"]), _ms(phase["p95_s"]), _ms(phase["max_s"]),
                     f"{phase['requests_per_s']:.2f}"])
    rss = report["rss_bytes"]
    m, model = report["machine"], report["model"]
    lines = [markdown_table(["phase", "clients", "requests", "ok", "503", "errors", "p50 ms", "p95 ms", "max ms",
                             "req/s"], rows), "",
             f"server RSS: {gib(rss['start'])} before the first request, {gib(rss['after_warmup'])} after "
             f"{report['config']['warmup']} warm-up requests, {gib(rss['after_sequential'])} after the sequential "
             f"phase, {gib(rss['end'])} at the end ({100 * report['rss_growth_from_warmup']:+.1f}% from warm-up)",
             f"model: {model['name']} ({model['precision']}, hidden {model['hidden_size']}, {model['layers']} layers); "
             f"{report['config']['max_new_tokens']} new tokens per request, a {report['config']['size'][0]}x"
             f"{report['config']['size'][1]} PNG ({report['config']['png_bytes'] / 1024:.0f} KiB); requests cycle "
             f"{', '.join(KINDS)}",
             f"machine: {machine_text(m)}; {m['platform']}; python "
             f"{m['python']}; load average {' '.join(map(str, m['load_average']))} at start, "
             f"{' '.join(map(str, m['load_average_end']))} at end"]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.0f}"
