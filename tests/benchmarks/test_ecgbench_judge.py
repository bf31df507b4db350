"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (canned replies, bounded, no network)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.ecgbench.judge import JudgeConfig, make_judge_scorer, parse_verdict
from pulse_edge.benchmarks.ecgbench.predictions import Prediction, PredictionFile
from pulse_edge.benchmarks.ecgbench.score import score_subset
from pulse_edge.calibration.datasets.ecgbench.readers import Sample, Turn
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS
from pulse_edge.cli.eval import eval_group
from pulse_edge.errors import ConfigError

# The reply the fake judge gives, chosen by a word of the report being graded.
CANNED = {
    "REPORT-ONE": '{"diagnosis": {"score": 8, "explanation": "ok"}, "waveform": {"score": 6}, "rhythm": {"score": 10}}',
    "REPORT-TWO": '```json\n{"Diagnosis": {"Score": 4}, "Form": {"Score": "5"}, "Rhythm": {"Score": 6}}\n```',
    "REPORT-THREE": "I think this report is quite good.",
    "ARENA-ONE": '<think>hm</think>{"Accuracy": {"Score": 7}, "Completeness": {"Score": 5}, '
                 '"Instruction Adherence": {"Score": 9}}',
}


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"]
        content = next((reply for key, reply in CANNED.items() if key in prompt), "no idea")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def judge_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.requests = []
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def _reports() -> tuple[list[Sample], PredictionFile]:
    samples = [Sample(i, "ptb-test-report", (Turn("Write a report.", f"reference {i}"),)) for i in ("r1", "r2", "r3")]
    texts = {"r1": "REPORT-ONE sinus rhythm", "r2": "REPORT-TWO", "r3": "REPORT-THREE"}
    return samples, PredictionFile(Path("p"), tuple(Prediction(i, t) for i, t in texts.items()))


def test_report_scores_by_hand_and_unreadable_replies_stay_unscored(judge_server: ThreadingHTTPServer,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # r1: 8, 6, 10 -> 80; r2: 4, 5, 6 (keys in another case, "Form" for waveform, fenced) -> 50; r3: no JSON -> unscored
    # subset: (80 + 50) / 2 = 65; diagnosis (8+4)/2*10 = 60; waveform (6+5)/2*10 = 55; rhythm (10+6)/2*10 = 80
    monkeypatch.setenv("PULSE_EDGE_JUDGE_KEY", "sk-test")
    config = JudgeConfig.from_options(_url(judge_server), "judge-1", workers=2)
    cache = tmp_path / "ptb-test-report.judge.jsonl"
    samples, predictions = _reports()
    score = score_subset(SUBSETS["ptb-test-report"], samples, predictions, make_judge_scorer(config, lambda _: cache))
    m = score.compat
    assert (m["score"], m["diagnosis"], m["waveform"], m["rhythm"]) == (65.0, 60.0, 55.0, 80.0)
    assert (m["judged"], m["unscored"]) == (2, 1)
    assert m["unscored_reasons"] == {"r3": "the reply holds no JSON object"}
    path, auth, body = judge_server.requests[0]
    assert (path, auth, body["model"], body["temperature"]) == ("/v1/chat/completions", "Bearer sk-test", "judge-1", 0)
    assert "reference r1" in body["messages"][0]["content"]
    again = score_subset(SUBSETS["ptb-test-report"], samples, predictions, make_judge_scorer(config, lambda _: cache))
    assert again.compat == m and len(judge_server.requests) == 3  # every verdict came from the cache
    changed = PredictionFile(Path("p"), (Prediction("r1", "REPORT-TWO rewritten"), *predictions.predictions[1:]))
    rejudged = score_subset(SUBSETS["ptb-test-report"], samples, changed, make_judge_scorer(config, lambda _: cache))
    assert len(judge_server.requests) == 4 and rejudged.compat["score"] == 50.0  # a changed answer is judged again
    # a crash tore the cache's last line: the next verdict starts its own line (glued to the torn one, it was lost
    # with it and judged again on every run)
    cache.write_text(cache.read_text() + '{"id": "r9", "judge_mod')
    first = PredictionFile(Path("p"), (Prediction("r1", "REPORT-ONE changed again"), *predictions.predictions[1:]))
    score_subset(SUBSETS["ptb-test-report"], samples, first, make_judge_scorer(config, lambda _: cache))
    score_subset(SUBSETS["ptb-test-report"], samples, first, make_judge_scorer(config, lambda _: cache))
    assert len(judge_server.requests) == 5  # judged once, then read from the cache


def test_arena_judges_the_first_turn(judge_server: ThreadingHTTPServer) -> None:
    # 7, 5, 9 -> 70
    sample = Sample("a", "arena", (Turn("What rhythm?", "Sinus."), Turn("Axis?", "Normal.")))
    config = JudgeConfig(_url(judge_server), "judge-1", timeout_s=5)
    score = score_subset(SUBSETS["arena"], [sample], PredictionFile(Path("p"), (Prediction("a", "ARENA-ONE"),)),
                         make_judge_scorer(config))
    assert score.compat["score"] == 70.0 and score.compat["instruction_adherence"] == 90.0
    prompt = judge_server.requests[0][2]["messages"][0]["content"]
    assert "What rhythm?" in prompt and "Axis?" not in prompt
    assert any("first turn" in n for n in score.notes)


def test_verdict_parsing() -> None:
    axes = SUBSETS["ptb-test-report"].judge_axes
    assert parse_verdict('{"diagnosis": 3, "waveform": 4, "rhythm": 5}', axes) == (
        {"diagnosis": 3.0, "waveform": 4.0, "rhythm": 5.0}, "")
    assert parse_verdict('{"diagnosis": 11, "waveform": 4, "rhythm": 5}', axes)[1] == "no score in 0..10 for diagnosis"
    assert parse_verdict('{"diagnosis": 3, "waveform": 4}', axes)[1] == "no score in 0..10 for rhythm"
    assert parse_verdict("{not json}", axes)[1] == "the reply's JSON cannot be parsed"


def test_unreachable_judge_and_half_options_are_one_line_errors(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = JudgeConfig(f"http://127.0.0.1:{port}/v1", "judge-1", timeout_s=2)
    samples, predictions = _reports()
    with pytest.raises(ConfigError, match=r"the LLM judge cannot be used: .*unreachable"):
        score_subset(SUBSETS["ptb-test-report"], samples, predictions, make_judge_scorer(config))
    with pytest.raises(ConfigError, match="both --judge-url and --judge-model"):
        JudgeConfig.from_options("http://x", None)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def test_score_command_with_and_without_a_judge(judge_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    items = [{"id": i, "image": f"{i}.png", "conversations": _conversation("Write a report.", f"reference {i}")}
             for i in ("r1", "r2", "r3")]
    (tmp_path / "ptb-test-report.json").write_text(json.dumps(items))
    predictions = tmp_path / "reports.jsonl"
    predictions.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                                   (("r1", "REPORT-ONE"), ("r2", "REPORT-TWO"), ("r3", "REPORT-THREE"))))
    base = ["score", "--subset", "report", "--data", str(tmp_path), "--predictions", str(predictions)]
    unjudged = CliRunner().invoke(eval_group, base)
    assert unjudged.exit_code == 0, unjudged.output
    out = json.loads(unjudged.output)
    assert out["compat"]["scored"] is False and "needs an LLM judge" in out["compat"]["reason"]
    assert "score" not in out["compat"]
    judged = CliRunner().invoke(eval_group, [*base, "--judge-url", _url(judge_server), "--judge-model", "j"])
    assert judged.exit_code == 0, judged.output
    assert json.loads(judged.output)["compat"]["score"] == 65.0
    assert (tmp_path / "reports.judge.jsonl").is_file()


def test_a_judge_that_does_not_speak_http_is_unavailable_not_a_traceback() -> None:
    """A status line that is not HTTP ("garbage"), or a body shorter than its length: one line."""
    from pulse_edge.benchmarks.ecgbench.judge import JudgeUnavailable, ask

    def garbage(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"garbage\r\n\r\n")
        conn.close()

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    thread = threading.Thread(target=lambda: garbage(server.accept()[0]), daemon=True)
    thread.start()
    config = JudgeConfig(url=f"http://127.0.0.1:{server.getsockname()[1]}/v1", model="judge", timeout_s=10)
    try:
        with pytest.raises(JudgeUnavailable, match="did not answer in HTTP"):
            ask(config, "score this")
    finally:
        thread.join(timeout=10)
        server.close()


def test_a_run_the_judge_scored_in_part_fails_the_gate(judge_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    """Run A's answers are all judged (80, 50: 65); run B's one readable reply is REPORT-ONE's (80), the other gets
    no verdict: B's mean over 1 sample against A's over 2 read as +15 points with the gate passing."""
    from pulse_testing.ecgbench_data import ecg_png, item, write_json_subset

    from pulse_edge.benchmarks.ecgbench import compare

    write_json_subset(tmp_path / "data", "ptb-test-report", [item(i, "Write a report.", "ref", ecg_png(seed=1))
                                                              for i in ("r1", "r2")])
    runs = []
    for label, texts in (("a", ("REPORT-ONE", "REPORT-TWO")), ("b", ("REPORT-ONE", "REPORT-THREE"))):
        (tmp_path / label).mkdir()
        (tmp_path / label / "ptb-test-report.jsonl").write_text("".join(
            json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(("r1", "r2"), texts, strict=True)))
        runs.append(tmp_path / label)
    judge = make_judge_scorer(JudgeConfig(_url(judge_server), "judge-1", timeout_s=5))
    result = compare.compare_runs(compare.load_runs(runs), tmp_path / "data", [judge, judge])
    assert [s.compat["score"] for s in result.subsets[0].scores] == [65.0, 80.0]
    from pulse_edge.benchmarks.ecgbench.report import write_run_report

    write_run_report(tmp_path / "report", [result.subsets[0].scores[1]], model={"precision": "fp16"}, settings={},
                     machine={})
    assert "| PTB-XL report | 1 (500) | judge score |" in (tmp_path / "report" / "report.md").read_text()  # judged: 1
    assert compare.gate_failures(result, [compare.DropRule.parse("score=50")]) == [
        "ptb-test-report: the judge scored 1 of 2 samples for b (1 not: the reply holds no JSON object); rerun the "
        "comparison to judge the rest (verdicts already given are cached)"]


def test_a_judged_score_is_rounded_once_when_printed() -> None:
    """481 judged reports with 3557 axis points in all: 24.650035, which the paper prints 24.7. Stored rounded to 4
    places first (24.65, a float just under it), it printed 24.6 (a review of the scoring)."""
    from pulse_edge.benchmarks.ecgbench.judge import _summarise
    from pulse_edge.benchmarks.ecgbench.report import _fmt

    spec = SUBSETS["ptb-test-report"]
    axes = spec.judge_axes
    samples = [Sample(f"r{i}", spec.name, (Turn("Report?", "Sinus."),)) for i in range(481)]
    points = [3557 // 481 + (i < 3557 % 481) for i in range(481)]  # per sample, spread over its axes
    verdicts = {f"r{i}": {"scores": {axis: (p + k) // len(axes) for k, axis in enumerate(axes)}}
                for i, p in enumerate(points)}
    assert sum(sum(v["scores"].values()) for v in verdicts.values()) == 3557
    parts = _summarise(JudgeConfig("http://127.0.0.1:9", "judge-1"), spec,
                       [(s, Prediction(s.id, "Sinus.")) for s in samples], verdicts)
    assert parts.compat["score"] == pytest.approx(10 * 3557 / (3 * 481))
    assert _fmt(parts.compat["score"], parts.compat) == "24.7"
