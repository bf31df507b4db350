"""The report of `pulse-edge bench gpu`: one JSON and one markdown file, rewritten after every step.

    gpu-check.json  the plan, each step's outcome, the versions, the GPU tests (from pytest's JUnit XML), the
                    steps' own reports (bench projector, torch-decode, bench latency), the targets, the exit code
    gpu-check.md    the same as tables: steps, GPU tests, targets, projector, torch backend, ORT
    gpu-check.log   every step's output as it ran (written by gpu_check.py)

The targets are fixed numbers (docs/gpu.md): the fused bf16 projector at T = 2880 at least 1.15x torch eager and
at least 70% of the bf16 matmul peak measured in the same run; fused fp8 at least 1.5x fused bf16 on Hopper;
decode at least 70% of the bound set by the copy bandwidth measured on the same GPU. A target that could not be
measured says why. The exit code is 1 when a GPU test failed, none ran, or a step failed, timed out or was
skipped (the budget spent, a step it needs failed).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pulse_edge.benchmarks.common.tables import markdown_table, num, percent

if TYPE_CHECKING:
    from pulse_edge.benchmarks.perf.gpu_check import GpuCheckConfig, Machine, Outcome, Plan

JSON_NAME, MD_NAME, LOG_NAME = "gpu-check.json", "gpu-check.md", "gpu-check.log"
REPORT_NAMES = (MD_NAME, JSON_NAME, LOG_NAME)
TARGET_T = 2880
HOPPER_MAJOR = 9
VERBOSE_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: \((.*?)\))?")
FAILURE_TAIL = 20  # lines of a failed step's output in the markdown


# ---------------------------------------------------------------- the GPU tests

def log_sections(path: Path) -> dict[str, list[str]]:
    """Each step's lines of gpu-check.log, under the `==> STEP (timeout ...)` header gpu_check.run_step writes."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return sections
    for line in text.splitlines():
        if line.startswith("==> ") and " (timeout " in line:
            current = sections.setdefault(line[4:].split(" (timeout ", 1)[0], [])
        else:
            current.append(line)
    return sections


def verbose_summary(lines: list[str]) -> dict[str, Any] | None:
    """The same counts from `pytest -v` lines, for a run that was stopped before it wrote its XML (partial)."""
    counts, failed, skipped = Counter(), [], Counter()
    for line in lines:
        match = VERBOSE_LINE.match(line)
        if not match:
            continue
        test_id, outcome, reason = match.groups()
        kind = {"PASSED": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}.get(outcome, "failed")
        counts[kind] += 1
        if kind == "failed":
            failed.append(test_id)
        elif kind == "skipped":
            skipped[reason or ""] += 1
    if not counts:
        return None
    return {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
            "failed_tests": failed, "skip_reasons": dict(skipped), "partial": True}


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Outcome counts, failed test ids and skip reasons from pytest's JUnit XML; None where there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts, failed, skipped = Counter(), [], Counter()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(test_id)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skipped[case.find("skipped").get("message", "")] += 1
        else:
            counts["passed"] += 1
    return {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
            "failed_tests": failed, "skip_reasons": dict(skipped)}


# ---------------------------------------------------------------- the targets

@dataclass(frozen=True)
class Target:
    name: str
    goal: float
    unit: str  # "x" (a speed-up) or "%" (a fraction)
    measure: Callable[[dict[str, Any]], tuple[float | None, str]]  # report -> (measured, note)


def _projector_row(report: dict[str, Any], precision: str, impl: str) -> dict[str, Any] | None:
    rows = (report.get("results", {}).get("projector") or {}).get("rows", [])
    return next((r for r in rows if (r["tokens"], r["precision"], r["impl"]) == (TARGET_T, precision, impl)
                 and r.get("median_ms")), None)


def _fused_vs_eager(report: dict[str, Any]) -> tuple[float | None, str]:
    fused, eager = _projector_row(report, "bf16", "fused"), _projector_row(report, "bf16", "eager")
    if not (fused and eager):
        return None, "bench projector gave no bf16 fused and eager rows at T = 2880"
    # the rounds interleave the candidates (bench projector): round r of one is paired with round r of the other
    pairs = [e / f for e, f in zip(eager["times_ms"] or [], fused["times_ms"] or [], strict=False)]
    ratio = statistics.median(pairs) if pairs else eager["median_ms"] / fused["median_ms"]
    return ratio, f"{fused['median_ms']:.3f} vs {eager['median_ms']:.3f} ms (median of {len(pairs)} paired rounds)"


def _fused_of_peak(report: dict[str, Any]) -> tuple[float | None, str]:
    fused = _projector_row(report, "bf16", "fused")
    if not fused:
        return None, "bench projector gave no bf16 fused row at T = 2880"
    peak = report["results"]["projector"]["peaks"]["bf16_matmul_tflops"]
    return fused["frac_bf16_peak"], f"{fused['tflops']:.0f} of {peak:.0f} TFLOP/s"


def _fp8_vs_bf16(report: dict[str, Any]) -> tuple[float | None, str]:
    fp8, bf16 = _projector_row(report, "fp8", "fused"), _projector_row(report, "bf16", "fused")
    capability = ((report.get("results", {}).get("projector") or {}).get("device") or {}).get("capability", "")
    hopper = "" if capability.startswith(f"{HOPPER_MAJOR}.") else f"; sm {capability or '?'} is not Hopper"
    if not (fp8 and bf16):
        return None, f"bench projector gave no fp8 and bf16 fused rows at T = 2880{hopper}"
    return bf16["median_ms"] / fp8["median_ms"], f"{fp8['median_ms']:.3f} vs {bf16['median_ms']:.3f} ms{hopper}"


def _copy_gbps(report: dict[str, Any]) -> float | None:
    for step in ("torch-decode", "projector"):
        peaks = (report.get("results", {}).get(step) or {}).get("peaks")
        if peaks:
            return peaks["copy_gbps"]
    return None


def _ort_decode(report: dict[str, Any]) -> tuple[float | None, str]:
    latency, copy = report.get("results", {}).get("ort-cuda"), _copy_gbps(report)
    if not latency:
        return None, "not measured: no ORT CUDA run (onnxruntime-gpu absent, or the step did not pass)"
    row = latency["sizes"][0]
    rate = (row["timings"].get("decode_tokens_per_s") or {}).get("p50")
    if not rate or not copy:
        return None, "no decode rate (the model stopped at its first token) or no copy bandwidth"
    bound = copy * 1e9 / row["bytes_per_token"]
    return rate / bound, f"{rate:.1f} of {bound:.1f} tok/s at {copy:.0f} GB/s"


def _torch_decode(report: dict[str, Any]) -> tuple[float | None, str]:
    result = report.get("results", {}).get("torch-decode")
    if not result:
        return None, "not measured (the torch-decode step did not pass)"
    d = result["decode"]
    return d["fraction_of_bound"], (f"{d['tokens_per_s']['p50']:.1f} of {d['bound_tokens_per_s']:.1f} tok/s, "
                                    f"{result['model']['layers']} layers, {result['dtype']}, eager")


TARGETS = (
    Target("fused bf16 projector vs torch eager, T = 2880", 1.15, "x", _fused_vs_eager),
    Target("fused bf16 projector, of the measured bf16 matmul peak", 0.70, "%", _fused_of_peak),
    Target("fused fp8 vs fused bf16 projector, T = 2880 (Hopper)", 1.5, "x", _fp8_vs_bf16),
    Target("fp16 bundle decode on ORT CUDA, of the HBM bound", 0.70, "%", _ort_decode),
    Target("torch backend decode, of the HBM bound (for comparison)", 0.70, "%", _torch_decode),
)


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        measured, note = target.measure(report)
        rows.append({"target": target.name, "goal": target.goal, "unit": target.unit, "measured": measured,
                     "of_goal": None if measured is None else measured / target.goal,
                     "met": None if measured is None else measured >= target.goal, "note": note})
    return rows


# ---------------------------------------------------------------- the report

def exit_code(outcomes: list[Outcome], tests: dict[str, Any] | None, planned: Sequence[str]) -> int:
    """0 only when every planned step ran and passed and, where the plan holds the GPU tests, at least one ran and
    none failed; 1 otherwise: a step that failed, timed out, or was skipped (a dependency failed, the budget ran
    out) is a check not done, never a pass."""
    passed = {o.name for o in outcomes if o.status == "passed"}
    incomplete = any(name not in passed for name in planned)
    tests_failed = ("pytest-gpu" in planned and tests is None) or (
        tests is not None and (tests["failed"] > 0 or tests["passed"] == 0))
    return 1 if incomplete or tests_failed else 0


def _read(path: Path | None) -> Any:
    if path is None or path.suffix != ".json":
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_report(cfg: GpuCheckConfig, machine: Machine, plan: Plan, outcomes: list[Outcome],
                 started: float) -> dict[str, Any]:
    by_name = {o.name: o for o in outcomes}
    results = {s.name: _read(s.result) for s in plan.steps
               if s.name in by_name and by_name[s.name].status == "passed"}
    pytest_step = next((s for s in plan.steps if s.name == "pytest-gpu"), None)
    sections = log_sections(cfg.out / LOG_NAME)
    tests = None
    if pytest_step and pytest_step.name in by_name:
        tests = junit_summary(pytest_step.result) or verbose_summary(sections.get(pytest_step.name, []))
    report: dict[str, Any] = {
        "kind": "gpu-check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started, "finished": len(outcomes) == len(plan.steps),
        "config": {"out": str(cfg.out), "work": str(plan.work), "layers": cfg.layers, "budget_s": cfg.budget_s,
                   "steps": list(cfg.steps) if cfg.steps else None},
        "machine": {"checkout": str(machine.root), "cuda": machine.cuda, "ort_providers": list(machine.ort_providers)},
        "plan": [s.to_dict() for s in plan.steps], "left_out": plan.left_out,
        "steps": [o.to_dict() for o in outcomes], "tests": tests, "results": results,
        "failure_tails": {o.name: sections.get(o.name, [])[-FAILURE_TAIL:] for o in outcomes
                          if o.status in ("failed", "timed out")}}
    report["targets"] = evaluate_targets(report)
    report["exit_code"] = exit_code(outcomes, tests, [s.name for s in plan.steps])
    return report


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / JSON_NAME, json.dumps(report, indent=2, default=str))
    _atomic_write(out / MD_NAME, report_markdown(report) + "\n")


# ---------------------------------------------------------------- markdown

def _device_line(report: dict[str, Any]) -> str:
    v = report["results"].get("versions")
    if not v:
        return "device: unknown (the versions step did not pass)"
    d, p = v["cuda"].get("device") or {}, v["packages"]
    libs = ", ".join(f"{name} {p[name]}" for name in ("torch", "triton", "transformers", "onnxruntime",
                                                      "onnxruntime-gpu", "tensorrt", "numpy") if p.get(name))
    return (f"device: {d.get('name', 'none')} (sm {d.get('capability')}, {d.get('sms')} SMs, "
            f"{d.get('memory_gib')} GiB); driver {v['driver']}; CUDA {v['cuda']['runtime']}; {libs}; "
            f"python {v['python']}; ORT providers {', '.join(v['ort_providers'] or ['none'])}; commit {v['commit']}")


def _steps_table(report: dict[str, Any]) -> str:
    rows = [[o["name"], o["status"], f"{o['seconds']:.0f}", o["reason"]] for o in report["steps"]]
    done = {o["name"] for o in report["steps"]}
    rows += [[s["name"], "not run yet", "", ""] for s in report["plan"] if s["name"] not in done]
    rows += [[name, "left out", "", why] for name, why in report["left_out"].items()]
    return markdown_table(["step", "status", "s", "note"], rows)


def _tests_lines(tests: dict[str, Any] | None) -> list[str]:
    if tests is None:
        return ["no JUnit report: pytest-gpu did not run or wrote none"]
    partial = " (PARTIAL: read from the log; pytest was stopped before it wrote its report)" \
        if tests.get("partial") else ""
    lines = [f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped{partial}"]
    if tests["passed"] == 0:
        lines.append("- no GPU test passed: that fails the check (a GPU run must run them)")
    lines += [f"- FAILED {t}" for t in tests["failed_tests"]]
    lines += [f"- skipped ({n}): {reason}" for reason, n in tests["skip_reasons"].items()]
    return lines


def _targets_table(report: dict[str, Any]) -> str:
    def cell(value: float | None, unit: str) -> str:
        return "n/a" if value is None else (f"{value:.2f}x" if unit == "x" else percent(value))

    rows = [[t["target"], cell(t["goal"], t["unit"]), cell(t["measured"], t["unit"]), percent(t["of_goal"]),
             {True: "yes", False: "NO", None: "not measured"}[t["met"]], t["note"]] for t in report["targets"]]
    return markdown_table(["target", "goal", "measured", "of goal", "met", "how"], rows)


def _torch_decode_table(r: dict[str, Any]) -> str:
    def ms(stat: dict[str, Any] | None, digits: int = 2) -> str:
        return "n/a" if stat is None else f"{stat['p50']:.{digits}f} / {stat['p95']:.{digits}f}"

    p, v, d = r["projector"], r["vision_ms"], r["decode"]
    rows = [[f"projector, T = {p['tokens']} (CUDA events, L2 flushed)", ms(p.get("fused_ms"), 3),
             ms(p["eager_ms"], 3), f"fused vs eager rel err {num(p.get('rel_err_vs_eager'), 4)}"],
            ["vision: 5 tiles, tower + projector + merge", ms(v.get("fused")), ms(v["eager"]), ""],
            [f"prefill, {r['prefill']['positions']} positions", ms(r["prefill"]["ms"]), "",
             f"{r['prefill']['tflops']:.0f} TFLOP/s"],
            [f"decode tok/s at ~{d['context']:.0f} positions", ms(d["tokens_per_s"], 1), "",
             f"bound {d['bound_tokens_per_s']:.1f} tok/s ({percent(d['fraction_of_bound'])}): "
             f"{d['bytes_per_token'] / 2**30:.2f} GiB per token at {r['peaks']['copy_gbps']:.0f} GB/s"]]
    return "\n".join([
        f"{r['model']['layers']} decoder layers at hidden {r['model']['hidden_size']}, {r['dtype']}, eager; "
        f"projector: {r['projector_choice']}; loaded in {r['load_s']:.1f} s; GPU memory peak "
        f"{num(r['gpu_memory_peak_gib'])} GiB; cells: p50 / p95 ms over {r['runs']} runs after {r['warmup']} warm-up",
        "", markdown_table(["stage", "fused projector", "plain torch projector", "note"], rows), "",
        f"CUDA graphs: none ({r['cuda_graphs']['reason']})"])


def _section(title: str, body: str | None, missing: str) -> list[str]:
    return [f"## {title}", "", body if body else missing, ""]


def report_markdown(report: dict[str, Any]) -> str:
    from pulse_edge.benchmarks.perf.latency import latency_table
    from pulse_edge.benchmarks.perf.projector import projector_table

    results = report["results"]
    status = "finished" if report["finished"] else "NOT FINISHED (stopped early, or still running)"
    model = results.get("make-model")
    lines = ["# pulse-edge GPU check", "", _device_line(report), "",
             f"started {report['started']}, {report['elapsed_s']:.0f} s (budget {report['config']['budget_s']} s), "
             f"{status}; exit code {report['exit_code']}", "", "## Steps", "", _steps_table(report), "",
             "## GPU tests (pytest -m \"gpu or tensorrt\")", "", *_tests_lines(report["tests"]), "",
             "## Targets", "", _targets_table(report), ""]
    lines += _section("Projector (bench projector)", projector_table(results["projector"])
                      if results.get("projector") else None, "not measured")
    if model:
        lines += [f"make-model: {model['seconds']:.1f} s, {model['bytes_on_disk'] / 2**30:.2f} GiB on disk, "
                  f"peak RSS {model['peak_rss_bytes'] / 2**30:.2f} GiB{' (reused)' if model['reused'] else ''}", ""]
    lines += _section("Torch backend on CUDA (real width)", _torch_decode_table(results["torch-decode"])
                      if results.get("torch-decode") else None, "not measured")
    for name in ("ort-cuda", "ort-tensorrt"):
        if results.get(name):
            lines += _section(f"{name}: fp16 bundle (bench latency)", latency_table(results[name]), "")
    if results.get("projector-compile"):
        lines += _section("torch.compile beside the fused kernels", projector_table(results["projector-compile"]), "")
    for name, tail in report.get("failure_tails", {}).items():
        lines += [f"## {name}: the last lines of its output", "", "```", *tail, "```", ""]
    return "\n".join(lines).rstrip()
