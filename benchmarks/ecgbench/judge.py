"""LLM-as-judge scoring for the free-text subsets (PTB-XL reports, ECG Arena).

Any OpenAI-compatible chat endpoint serves (`POST {url}/chat/completions`),
reached with the standard library only. The judge grades each answer 0-10 on
three axes against the reference answer; a sample's score is the mean of its
axes x10, the subset's the mean over judged samples (the paper's arithmetic).

A reply that cannot be read as three scores in 0..10 leaves that sample
unscored, and the count is reported: no score is ever filled in. Verdicts are
kept in a JSON-lines cache beside the predictions (keyed by sample id, judge
model and a hash of the answer), so a rerun asks only for what is missing or
changed; transport failures are not cached and are retried next time.

The rubrics below paraphrase the paper's (they are not its text), and the
judge is whichever model the user names (the paper used GPT-4o): judge scores
are comparable with the paper's only approximately, and only between runs
judged by the same model.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from pulse_edge.benchmarks.ecgbench.predictions import append_record
from pulse_edge.benchmarks.ecgbench.score import JudgeScorer, Pair, SampleDetail, ScoreParts, answer_text
from pulse_edge.calibration.datasets.ecgbench.subsets import SubsetSpec
from pulse_edge.errors import ConfigError

KEY_ENV = "PULSE_EDGE_JUDGE_KEY"
_GRADES = ("10 = fully right, nothing missing; 5 = partly right, with notable errors or omissions; "
           "0 = mostly wrong or missing")
_REPORT_RUBRIC = (
    "You grade a machine-written 12-lead ECG report against a cardiologist's reference report. Judge only the "
    "findings the reference contains, be exact about medical terms, and ignore length and style. Give each "
    "aspect an integer from 0 to 10 ({grades}).\n"
    "- diagnosis: the diagnoses of the reference (conduction disturbance, ischaemia, infarction, hypertrophy, ...)\n"
    "- waveform: the waveform findings of the reference (P wave, QRS, ST segment, T wave, PR and QT intervals)\n"
    "- rhythm: the rhythm of the reference (sinus rhythm, atrial fibrillation, ectopic beats, ...)\n")
_ARENA_RUBRIC = (
    "You grade a model's answer to a question about an ECG against a reference answer. Be exact about medical "
    "terms and ignore length. Give each aspect an integer from 0 to 10 ({grades}).\n"
    "- accuracy: does the answer agree with the reference on the interpretation and diagnosis?\n"
    "- completeness: does it cover the points of the reference (rhythm, axis, waveforms, causes, ...)?\n"
    "- instruction_adherence: does it do what the question asks, whether or not it is right?\n")
_REPLY_FORMAT = ("Reply with one JSON object and nothing else, with the keys {keys}, each holding "
                 '{{"score": <0-10>, "explanation": "<one sentence>"}}.')
# What judges call the axes, beyond their own names (the paper's own rubric says "form").
_AXIS_ALIASES = MappingProxyType({"form": "waveform", "instruction": "instruction_adherence",
                                  "adherence": "instruction_adherence"})


class JudgeUnavailable(Exception):
    """The endpoint could not be asked (network, HTTP status, or a body that is not a chat completion)."""


@dataclass(frozen=True)
class JudgeConfig:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    workers: int = 4

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    @classmethod
    def from_options(cls, url: str | None, model: str | None, workers: int = 4) -> JudgeConfig | None:
        """None when no judge was asked for; an error when only half of it was given."""
        if url is None and model is None:
            return None
        if not url or not model:
            raise ConfigError("an LLM judge needs both --judge-url and --judge-model")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--judge-url must start with http:// or https://, got {url!r}")
        return cls(url=url, model=model, api_key=os.environ.get(KEY_ENV) or None, workers=max(1, workers))


def judge_prompt(spec: SubsetSpec, question: str, reference: str, response: str) -> str:
    rubric = _REPORT_RUBRIC if spec.name == "ptb-test-report" else _ARENA_RUBRIC
    parts = [rubric.format(grades=_GRADES), _REPLY_FORMAT.format(keys=", ".join(spec.judge_axes))]
    if spec.name != "ptb-test-report":
        parts.append(f"[Question]\n{question}\n[End of question]")
    parts += [f"[Reference]\n{reference}\n[End of reference]", f"[Answer to grade]\n{response}\n[End of answer]"]
    return "\n\n".join(parts)


def ask(config: JudgeConfig, prompt: str) -> str:
    """One chat completion at temperature 0; the reply's text."""
    body = json.dumps({"model": config.model, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(config.endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            payload = json.loads(response.read())
        return str(payload["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as e:
        raise JudgeUnavailable(f"HTTP {e.code} from {config.endpoint}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise JudgeUnavailable(f"{config.endpoint} unreachable ({getattr(e, 'reason', e)})") from e
    except http.client.HTTPException as e:  # a status line or body that is not HTTP (BadStatusLine, IncompleteRead)
        raise JudgeUnavailable(f"{config.endpoint} did not answer in HTTP ({type(e).__name__})") from e
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeUnavailable(f"{config.endpoint} did not answer with a chat completion ({e!r})") from e


def parse_verdict(reply: str, axes: Sequence[str]) -> tuple[dict[str, float] | None, str]:
    """The axis scores in a judge's reply, or None and the reason they cannot be read."""
    text = re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None, "the reply holds no JSON object"
    try:
        verdict = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None, "the reply's JSON cannot be parsed"
    if not isinstance(verdict, Mapping):
        return None, "the reply's JSON is not an object"
    named = {_AXIS_ALIASES.get(k, k): v for k, v in ((_axis_key(k), v) for k, v in verdict.items())}
    scores: dict[str, float] = {}
    for axis in axes:
        value = named.get(axis)
        if isinstance(value, Mapping):
            value = {str(k).lower(): v for k, v in value.items()}.get("score")
        number = _number(value)
        if number is None or not 0.0 <= number <= 10.0:
            return None, f"no score in 0..10 for {axis}"
        scores[axis] = number
    return scores, ""


def make_judge_scorer(config: JudgeConfig, cache_for: Callable[[str], Path | None] | None = None) -> JudgeScorer:
    """A scorer for JUDGE subsets that asks `config`'s endpoint about every uncached sample;
    `cache_for(subset)` names the verdict cache of a subset (None: no cache)."""

    def scorer(spec: SubsetSpec, pairs: Sequence[Pair]) -> ScoreParts:
        cache_file = cache_for(spec.name) if cache_for is not None else None
        cached = _read_cache(cache_file, config.model)
        # a verdict is reused only for the very answer it judged
        verdicts = {s.id: cached[s.id] for s, p in pairs
                    if s.id in cached and cached[s.id].get("answer_sha256") == _digest(p.text)}
        todo = [(s, p) for s, p in pairs if s.id not in verdicts]
        verdicts.update(_judge_all(config, spec, todo, cache_file))
        return _summarise(config, spec, pairs, verdicts)

    return scorer


def _judge_all(config: JudgeConfig, spec: SubsetSpec, todo: Sequence[Pair],
               cache_file: Path | None) -> dict[str, Mapping[str, Any]]:
    """Verdicts of `todo`; the first request runs alone so that a wrong URL fails at once, as one error."""
    if not todo:
        return {}

    def one(pair: Pair) -> Mapping[str, Any]:
        sample, prediction = pair
        turn = sample.turns[0]
        prompt = judge_prompt(spec, turn.question, answer_text(turn.answer), prediction.text)
        try:
            reply = ask(config, prompt)
        except JudgeUnavailable as e:
            return {"id": sample.id, "scores": None, "reason": str(e), "transport": True}
        scores, reason = parse_verdict(reply, spec.judge_axes)
        return {"id": sample.id, "judge_model": config.model, "answer_sha256": _digest(prediction.text),
                "scores": scores, "reason": reason, "reply": reply}

    first = one(todo[0])
    if first.get("transport"):
        raise ConfigError(f"the LLM judge cannot be used: {first['reason']}")
    results = {str(first["id"]): first}
    with _CacheWriter(cache_file) as cache, ThreadPoolExecutor(max_workers=config.workers) as pool:
        cache.add(first)
        for result in pool.map(one, todo[1:]):  # written as they come: an interrupted run keeps its verdicts
            results[str(result["id"])] = result
            cache.add(result)
    return results


def _summarise(config: JudgeConfig, spec: SubsetSpec, pairs: Sequence[Pair],
               verdicts: Mapping[str, Mapping[str, Any]]) -> ScoreParts:
    scored = {s.id: verdicts[s.id]["scores"] for s, _ in pairs if verdicts.get(s.id, {}).get("scores")}
    unscored = {s.id: str(verdicts.get(s.id, {}).get("reason", "not judged")) for s, _ in pairs if s.id not in scored}
    details = {i: SampleDetail(None, _sample_score(v), None) for i, v in scored.items()}
    metrics: dict[str, Any] = {"scored": bool(scored), "judge_model": config.model, "judged": len(scored),
                               "unscored": len(unscored), "unscored_reasons": dict(list(unscored.items())[:20])}
    if scored:  # unrounded: rounded once, when printed (24.650035 stored as 24.65 printed 24.6, the paper's 24.7)
        metrics["score"] = sum(_sample_score(v) for v in scored.values()) / len(scored)
        for axis in spec.judge_axes:
            metrics[axis] = 10.0 * sum(v[axis] for v in scored.values()) / len(scored)
    notes = ["judge rubric paraphrases the paper's and the judge model is the user's (the paper used GPT-4o): "
             "compare with the paper's figure only approximately"]
    if spec.multi_turn:
        notes.append("arena: only the first turn of each conversation is judged (later turns, where run, are recorded)")
    return ScoreParts(metrics, dict(metrics), details, tuple(notes))


def _sample_score(scores: Mapping[str, float]) -> float:
    return 10.0 * sum(scores.values()) / len(scores)


def _read_cache(cache_file: Path | None, model: str) -> dict[str, Mapping[str, Any]]:
    if cache_file is None or not cache_file.is_file():
        return {}
    verdicts: dict[str, Mapping[str, Any]] = {}
    for line in cache_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: that sample is simply judged again
        if isinstance(record, Mapping) and record.get("judge_model") == model and "id" in record:
            verdicts[str(record["id"])] = record
    return verdicts


class _CacheWriter:
    """Appends verdicts (never transport failures, which are retried next time) to the cache file."""

    def __init__(self, cache_file: Path | None) -> None:
        self._file = cache_file
        self._handle: IO[str] | None = None

    def __enter__(self) -> _CacheWriter:
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self._file, "a", encoding="utf-8")  # closed in __exit__
            if self._handle.tell() and not _ends_a_line(self._file):  # a line torn by a crash: the next verdict
                self._handle.write("\n")  # starts its own line, not glued to the torn one and lost with it
        return self

    def add(self, record: Mapping[str, Any]) -> None:
        if self._handle is not None and not record.get("transport"):
            append_record(self._handle, record)

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _axis_key(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None

