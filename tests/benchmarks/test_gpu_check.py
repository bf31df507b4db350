"""`pulse-edge bench gpu` without a GPU: the dry run and its plan, the refusal, the runner's timeouts, the report.

The report tests use hand-made step results (formatting and arithmetic only, not measurements).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pulse_edge.benchmarks.perf import gpu_check as gc
from pulse_edge.benchmarks.perf import gpu_dry_run as gd
from pulse_edge.benchmarks.perf import gpu_plan as gp
from pulse_edge.benchmarks.perf import gpu_report as gr
from pulse_edge.cli.main import main
from pulse_edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ALL_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
LENT_MACHINE_STEPS = ["versions", "pytest-gpu", "projector", "make-model", "torch-decode", "projector-compile"]


def test_dry_run_prints_the_plan_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["bench", "gpu", "--dry-run", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for i, name in enumerate(LENT_MACHINE_STEPS, 1):
        assert f"  {i}. {name}: " in text
    assert "-m pulse_edge.cli.main bench projector --tokens 576,2880,14400 --precisions bf16,int8,fp8" in text
    assert "-m pytest -v -p no:cacheprovider -rs -m 'gpu or tensorrt'" in text
    assert "tests/kernels/test_kernels.py" in text and "tests/export/test_torch_cuda.py" in text
    for check in ("output folder", "packages", "modules", "pytest marks", "commands", "budget"):
        assert f"[ok] {check}: " in text
    assert text.rstrip().endswith("dry run: ok")
    assert out.is_dir() and list(out.iterdir()) == []  # checked writable, nothing left behind


def test_a_command_that_would_not_parse_fails_the_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(c: gp._Context) -> gp.Step:
        return gp.Step("projector", "", c.python(gp.CLI_MODULE, "bench", "projector", "--precision", "bf16"), 1, 1)

    monkeypatch.setitem(gp.STEP_BUILDERS, "projector", broken)
    lines: list[str] = []
    machine = gp.Machine(root=ROOT, cuda=False)
    assert gd.dry_run(gp.GpuCheckConfig(out=tmp_path), lines.append, main, machine) == 1
    failed = next(line for line in lines if "[FAIL] commands" in line)
    assert "projector: " in failed and "No such option '--precision'" in failed
    assert lines[-1] == "dry run: FAILED: commands"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check would run, not refuse")
def test_refuses_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "gpu", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "--dry-run" in lines[0]
    assert res.stdout == "" and not (tmp_path / "out").exists()


def test_a_box_with_onnxruntime_gpu_also_runs_the_ort_steps(tmp_path: Path) -> None:
    machine = gp.Machine(root=ROOT, cuda=True, ort_providers=ALL_ORT, pytest_timeout=True)
    plan = gp.build_plan(gp.GpuCheckConfig(out=tmp_path, layers=4), machine, tmp_path)
    names = [s.name for s in plan.steps]
    assert names == [*LENT_MACHINE_STEPS[:5], "ort-export", "ort-cuda", "ort-tensorrt", "projector-compile"]
    assert plan.left_out == {}
    steps = {s.name: s for s in plan.steps}
    assert "--timeout=150" in steps["pytest-gpu"].argv
    assert steps["ort-cuda"].after == ("ort-export",) and "--provider" in steps["ort-tensorrt"].argv
    assert str(tmp_path / "real-width-4-layers") in steps["ort-export"].argv
    assert all(gd.command_error(s, ROOT, main) is None for s in plan.steps)


def test_steps_bring_what_they_need_and_unknown_steps_are_refused(tmp_path: Path) -> None:
    machine = gp.Machine(root=ROOT, cuda=True)
    plan = gp.build_plan(gp.GpuCheckConfig(out=tmp_path, steps=("torch-decode",)), machine, tmp_path)
    assert [s.name for s in plan.steps] == ["make-model", "torch-decode"]
    assert plan.left_out["pytest-gpu"] == "not in --steps"
    with pytest.raises(ConfigError, match="--steps: warp not among versions, pytest-gpu"):
        gp.GpuCheckConfig(steps=("versions", "warp"))


def test_a_bare_source_tree_runs_the_script(tmp_path: Path) -> None:
    """What travels to a lent machine: the tracked files, nothing installed. The interpreter runs with -S and
    sees only the site-packages folders, so no editable install of pulse-edge can stand in for the tree."""
    tree = tmp_path / "tree"
    for folder in ("pulse_edge", "export", "runtime", "kernels", "calibration", "benchmarks"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    site = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    code = ("import pulse_edge.benchmarks.perf.gpu_check as g, pulse_edge.kernels.projector as k; "
            "print(g.__file__, k.__file__)")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join((str(tree), site))}
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(path.startswith(str(tree)) for path in done.stdout.split())
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "PYTHONPATH": site, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--budget-s" in done.stdout


# ---------------------------------------------------------------- the runner

def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


class _Clock:
    """time.monotonic with a jump: the run's budget can be spent without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def spend(self, seconds: float) -> None:
        self.offset += seconds


def test_a_hung_step_is_killed_with_its_children_and_the_run_goes_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(gc, "time", clock)
    plan = gp.Plan([gp.Step("hang", "", _py(HANG), 1, 2),
                    gp.Step("after-hang", "", _py("print('never')"), 1, 5, after=("hang",)),
                    gp.Step("ok", "", _py("print('hello')"), 1, 60),
                    gp.Step("fails", "", _py("import sys; sys.exit(3)"), 1, 60),
                    gp.Step("late", "", _py("print('too late')"), 1, 60)], {}, tmp_path)
    log_path, seen = tmp_path / "log", []
    start = time.monotonic()
    with open(log_path, "w") as log:
        outcomes = gc.run_plan(plan, 600, cwd=tmp_path, env=dict(os.environ), log=log, echo=seen.append,
                               after_each=lambda done: clock.spend(590) if len(done) == 4 else None)
    assert time.monotonic() - start < 30
    status = {o.name: (o.status, o.reason) for o in outcomes}
    assert status["hang"] == ("timed out", "killed after 2 s")
    assert status["after-hang"] == ("skipped", "needs hang, which did not pass")
    assert status["ok"] == ("passed", "") and status["fails"] == ("failed", "exit code 3")
    assert status["late"][0] == "skipped" and "time budget is spent" in status["late"][1]
    grandchild = int(seen[1])  # the line the hung step printed
    time.sleep(0.5)
    assert not _alive(grandchild), "the step's own child outlived the timeout"
    log_text = log_path.read_text()
    assert "==> hang (timeout 2 s)" in log_text and "hello" in log_text and "never" not in log_text


# ---------------------------------------------------------------- the report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernels.test_kernels" name="test_linear[gpu-fp16]" time="1.0"/>
<testcase classname="tests.kernels.test_kernels" name="test_fp8[gpu-bf16]" time="1.0"><failure message="x"/></testcase>
<testcase classname="tests.runtime.test_ort_cuda" name="test_cuda" time="0"><skipped message="no CUDA EP"/></testcase>
<testcase classname="tests.runtime.test_ort_cuda" name="test_trt" time="0"><skipped message="no CUDA EP"/></testcase>
</testsuite></testsuites>"""


def _projector_report() -> dict:
    from pulse_edge.benchmarks.perf import projector as pb

    peaks = {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0, "matmul_size": 8192, "copy_bytes": 2**30}
    rows = [pb._row(2880, "bf16", "fused", [0.2e-3], 0.0, peaks), pb._row(2880, "bf16", "eager", [0.3e-3], 0.0, peaks),
            pb._row(2880, "fp8", "fused", [0.1e-3], 0.0, peaks)]
    device = {"name": "Made-up GPU", "capability": "9.0", "sms": 1, "memory_gib": 1.0, "torch": "x", "cuda": "x",
              "triton": "x"}
    return {"device": device, "peaks": peaks, "rows": rows}


def _report(tmp_path: Path, junit: str) -> dict:
    machine = gp.Machine(root=ROOT, cuda=True)
    plan = gp.build_plan(gp.GpuCheckConfig(out=tmp_path, steps=("pytest-gpu", "projector")), machine, tmp_path)
    (tmp_path / "pytest-gpu.xml").write_text(junit)
    (tmp_path / "projector.json").write_text(json.dumps(_projector_report()))
    outcomes = [gc.Outcome("pytest-gpu", "failed", 10.0, 1, "exit code 1"), gc.Outcome("projector", "passed", 5.0, 0)]
    return gr.build_report(gp.GpuCheckConfig(out=tmp_path), machine, plan, outcomes, time.time())


def test_report_counts_the_gpu_tests_and_weighs_the_targets(tmp_path: Path) -> None:
    report = _report(tmp_path, JUNIT)
    assert report["tests"] == {"passed": 1, "failed": 1, "skipped": 2,
                               "failed_tests": ["tests.kernels.test_kernels::test_fp8[gpu-bf16]"],
                               "skip_reasons": {"no CUDA EP": 2}}
    assert report["exit_code"] == 1
    targets = {t["target"]: t for t in report["targets"]}
    speedup = targets["fused bf16 projector vs torch eager, T = 2880"]
    assert speedup["measured"] == pytest.approx(1.5) and speedup["met"] is True
    of_peak = targets["fused bf16 projector, of the measured bf16 matmul peak"]
    assert of_peak["measured"] == pytest.approx(120.8e9 / 0.2e-3 / 1e12 / 700, rel=1e-3) and of_peak["met"] is True
    fp8 = targets["fused fp8 vs fused bf16 projector, T = 2880 (Hopper)"]
    assert fp8["measured"] == pytest.approx(2.0) and fp8["of_goal"] == pytest.approx(2.0 / 1.5)
    ort = targets["fp16 bundle decode on ORT CUDA, of the HBM bound"]
    assert ort["met"] is None and "not measured" in ort["note"]
    text = gr.report_markdown(report)
    assert "1 passed, 1 failed, 2 skipped" in text and "- FAILED tests.kernels.test_kernels::test_fp8[gpu-bf16]" in text
    assert "| fused bf16 projector vs torch eager, T = 2880 | 1.15x | 1.50x | 130% | yes |" in text
    assert "| pytest-gpu | failed | 10 | exit code 1 |" in text and "| 2880 | bf16 | fused |" in text
    gr.write_report(tmp_path / "out", report)
    assert json.loads((tmp_path / "out" / gr.JSON_NAME).read_text())["exit_code"] == 1
    assert (tmp_path / "out" / gr.MD_NAME).read_text().startswith("# pulse-edge GPU check")


def test_no_gpu_test_that_ran_is_a_failure(tmp_path: Path) -> None:
    skipped_only = JUNIT.replace('time="1.0"/>', 'time="0"><skipped message="needs a CUDA GPU"/></testcase>', 1)
    skipped_only = skipped_only.replace('<failure message="x"/>', '<skipped message="needs a CUDA GPU"/>')
    report = _report(tmp_path, skipped_only)
    assert report["tests"]["passed"] == 0 and report["tests"]["failed"] == 0
    outcomes = [gc.Outcome("pytest-gpu", "passed", 1.0, 0)]
    assert gr.exit_code(outcomes, report["tests"], ["pytest-gpu"]) == 1
    assert gr.exit_code(outcomes, {**report["tests"], "passed": 3}, ["pytest-gpu"]) == 0


def test_a_step_that_never_ran_is_not_a_pass() -> None:
    """Skipped for the budget or a failed dependency, or never reached: the check was not done, exit 1."""
    ok = {"passed": 3, "failed": 0}
    tests = gc.Outcome("pytest-gpu", "passed", 1.0, 0)
    assert gr.exit_code([tests, gc.Outcome("projector", "passed", 5.0, 0)], ok, ["pytest-gpu", "projector"]) == 0
    budget = gc.Outcome("projector", "skipped", reason="the time budget is spent (20 s left)")
    assert gr.exit_code([tests, budget], ok, ["pytest-gpu", "projector"]) == 1
    assert gr.exit_code([tests], ok, ["pytest-gpu", "projector"]) == 1  # stopped before its turn
    assert gr.exit_code([gc.Outcome("pytest-gpu", "skipped", reason="x")], None, ["pytest-gpu"]) == 1


def test_a_reused_work_folder_never_reports_the_last_runs_results(tmp_path: Path) -> None:
    stale = tmp_path / "pytest-gpu.xml"
    stale.write_text(JUNIT)
    step = gp.Step("pytest-gpu", "", _py("import sys; sys.exit(1)"), 1, 60, result=stale)
    outcome = gc.run_step(step, 60, cwd=tmp_path, env=dict(os.environ), log=io.StringIO(), echo=lambda _: None)
    assert outcome.status == "failed" and not stale.exists()


# ---------------------------------------------------------------- the steps, on the CPU test path

def test_a_run_of_the_versions_step_writes_the_report_and_the_log(tmp_path: Path) -> None:
    """The real run's wiring (plan, child process, log, report after each step), with CUDA assumed present."""
    machine = gp.Machine(root=ROOT, cuda=True)
    cfg = gp.GpuCheckConfig(out=tmp_path / "out", work=tmp_path / "work", steps=("versions",))
    lines: list[str] = []
    assert gc.run_gpu_check(cfg, lines.append, machine) == 0
    report = json.loads((cfg.out / gr.JSON_NAME).read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("versions", "passed")]
    versions = report["results"]["versions"]
    assert versions["packages"]["torch"] == torch.__version__
    assert versions["cuda"]["available"] is torch.cuda.is_available()
    log = (cfg.out / gr.LOG_NAME).read_text()
    assert "==> versions" in log and "onnxruntime providers:" in log
    md = (cfg.out / gr.MD_NAME).read_text()
    assert "| versions | passed |" in md and "| pytest-gpu | left out |" in md
    assert sorted(p.name for p in cfg.out.iterdir()) == sorted(gr.REPORT_NAMES)  # <= 8 files come back


def test_the_torch_decode_step_on_the_cpu_test_path(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from pulse_edge.benchmarks.perf import gpu_steps

    out = tmp_path / "torch-decode.json"
    argv = ["torch-decode", "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "fp32", "--runs", "1",
            "--warmup", "0", "--decode-tokens", "2", "--positions", "64", "--json", str(out)]
    assert gpu_steps.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["device"]["name"].startswith("cpu") and r["model"]["layers"] == 2 and r["prefill"]["positions"] == 64
    assert r["projector"]["tokens"] == 2880 and not r["projector"]["fused_in_backend"]
    d = r["decode"]
    assert d["context"] == 65 and d["fraction_of_bound"] == pytest.approx(d["tokens_per_s"]["p50"] /
                                                                           d["bound_tokens_per_s"])
    assert d["bound_tokens_per_s"] == pytest.approx(r["peaks"]["copy_gbps"] * 1e9 / d["bytes_per_token"])
    assert r["cuda_graphs"]["available"] is False
    table = gr._torch_decode_table(r)
    assert "| prefill, 64 positions |" in table and "CUDA graphs: none" in table


def test_prefill_flops_counts_the_layers_and_causal_attention() -> None:
    from pulse_edge.benchmarks.perf.gpu_steps import prefill_flops

    # Vicuna-7B layer: 4 x 4096^2 attention + 3 x 4096 x 11008 MLP parameters
    layer = 4 * 4096**2 + 3 * 4096 * 11008
    assert prefill_flops(2 * layer, 2, 4096, 2950) == pytest.approx(2 * 2 * layer * 2950 + 2 * 2 * 2950**2 * 4096)


def test_a_pytest_run_stopped_before_its_xml_is_read_from_the_log(tmp_path: Path) -> None:
    log = [f"==> pytest-gpu (timeout 300 s): {sys.executable} -m pytest -v",
           "tests/kernels/test_kernels.py::test_linear[gpu-fp16-gelu] PASSED                [  4%]",
           "tests/kernels/test_kernels.py::test_fp8[gpu-bf16] FAILED                          [  8%]",
           "tests/runtime/test_ort_cuda.py::test_cuda SKIPPED (onnxruntime has no CUDA)      [ 12%]",
           "tests/kernels/test_kernels.py::test_mlp[gpu-bf16] "]  # the test it hung in
    (tmp_path / gr.LOG_NAME).write_text("\n".join(log) + "\n")
    machine = gp.Machine(root=ROOT, cuda=True)
    plan = gp.build_plan(gp.GpuCheckConfig(out=tmp_path, steps=("pytest-gpu",)), machine, tmp_path)
    outcomes = [gc.Outcome("pytest-gpu", "timed out", 300.0, -15, "killed after 300 s")]
    report = gr.build_report(gp.GpuCheckConfig(out=tmp_path), machine, plan, outcomes, time.time())
    assert report["tests"] == {"passed": 1, "failed": 1, "skipped": 1, "partial": True,
                               "failed_tests": ["tests/kernels/test_kernels.py::test_fp8[gpu-bf16]"],
                               "skip_reasons": {"onnxruntime has no CUDA": 1}}
    assert report["exit_code"] == 1 and report["failure_tails"]["pytest-gpu"][-1].endswith("[gpu-bf16] ")
    text = gr.report_markdown(report)
    assert "1 passed, 1 failed, 1 skipped (PARTIAL" in text
    assert "## pytest-gpu: the last lines of its output" in text
