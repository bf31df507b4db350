"""`pulse-edge bench gpu`: every GPU check that fits a lent GPU machine, in one run of under ~8 minutes.

The steps and their order are gpu_plan.py's; the report is gpu_report.py's; the dry run is gpu_dry_run.py's.
Each step is a child process in a session of its own, with its own timeout cut to what is left of the run's
budget; a step that overruns is killed with its whole process group (torch.compile's workers too) and the run
goes on. After every step the report is rewritten, so a run stopped from outside still leaves its results.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from pulse_edge.benchmarks.perf.gpu_dry_run import check_out
from pulse_edge.benchmarks.perf.gpu_plan import GpuCheckConfig, Machine, Plan, Step, build_plan, plan_lines
from pulse_edge.errors import ConfigError

MIN_STEP_S = 20  # a step is not started with less than this left of the budget
KILL_GRACE_S = 5


# ---------------------------------------------------------------- running the steps

@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | timed out | skipped
    seconds: float = 0.0
    returncode: int | None = None
    reason: str = ""
    timeout_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def child_env(machine: Machine) -> dict[str, str]:
    """The steps see the same pulse_edge: a bare source tree is importable through PYTHONPATH alone."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if machine.root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(machine.root), env.get("PYTHONPATH", "")) if p)
    return env


def _tee(stream: IO[str], log: IO[str], echo: Callable[[str], None]) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        echo(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, timeout_s: float, *, cwd: Path, env: dict[str, str], log: IO[str],
             echo: Callable[[str], None]) -> Outcome:
    header = f"==> {step.name} (timeout {timeout_s:.0f} s): {shlex.join(step.argv)}"
    if step.result is not None:  # a reused --work: a step killed before it writes must not leave the last run's
        step.result.unlink(missing_ok=True)
    log.write(header + "\n")
    echo(header)
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=_tee, args=(proc.stdout, log, echo), daemon=True)
    reader.start()
    try:
        returncode, timed_out = proc.wait(timeout_s), False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        returncode, timed_out = proc.returncode, True
    except BaseException:  # Ctrl-C reaches this process only: the step runs in a session of its own
        _kill_group(proc)
        raise
    reader.join(KILL_GRACE_S)
    seconds = time.monotonic() - start
    if timed_out:
        return Outcome(step.name, "timed out", seconds, returncode, f"killed after {timeout_s:.0f} s", timeout_s)
    status = "passed" if returncode == 0 else "failed"
    return Outcome(step.name, status, seconds, returncode, "" if returncode == 0 else f"exit code {returncode}",
                   timeout_s)


def run_plan(plan: Plan, budget_s: float, *, cwd: Path, env: dict[str, str], log: IO[str],
             echo: Callable[[str], None], after_each: Callable[[list[Outcome]], None] = lambda _: None,
             ) -> list[Outcome]:
    start, outcomes = time.monotonic(), []
    for step in plan.steps:
        done = {o.name: o.status for o in outcomes}
        missing = [name for name in step.after if done.get(name) != "passed"]
        left = budget_s - (time.monotonic() - start)
        if missing:
            outcome = Outcome(step.name, "skipped", reason=f"needs {', '.join(missing)}, which did not pass")
        elif left < MIN_STEP_S:
            outcome = Outcome(step.name, "skipped", reason=f"the time budget is spent ({left:.0f} s left)")
        else:
            outcome = run_step(step, min(step.timeout_s, left), cwd=cwd, env=env, log=log, echo=echo)
        if outcome.status == "skipped":
            echo(f"==> {step.name}: skipped: {outcome.reason}")
        outcomes.append(outcome)
        after_each(outcomes)
    return outcomes


# ---------------------------------------------------------------- the real run

def require_cuda(machine: Machine) -> None:
    if not machine.cuda:
        raise ConfigError("bench gpu needs a CUDA GPU and torch sees none; `pulse-edge bench gpu --dry-run` "
                          "checks the plan on this machine")


def run_gpu_check(cfg: GpuCheckConfig, echo: Callable[[str], None], machine: Machine | None = None) -> int:
    """Run the plan; the report goes to cfg.out after every step. Returns the exit code (gpu_report.exit_code)."""
    from pulse_edge.benchmarks.perf import gpu_report

    machine = machine or Machine.probe()
    require_cuda(machine)
    writable = check_out(cfg.out)
    if not writable.ok:
        raise ConfigError(writable.detail)
    work = cfg.work or Path(tempfile.mkdtemp(prefix="pulse-edge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    plan, started = build_plan(cfg, machine, work), time.time()
    for line in plan_lines(plan, cfg):
        echo(line)

    def write(outcomes: list[Outcome]) -> dict[str, Any]:
        report = gpu_report.build_report(cfg, machine, plan, outcomes, started)
        gpu_report.write_report(cfg.out, report)
        return report

    write([])  # a report from the start: the plan, every step "not run yet"
    try:
        with open(cfg.out / gpu_report.LOG_NAME, "w", encoding="utf-8") as log:
            outcomes = run_plan(plan, cfg.budget_s, cwd=machine.root or Path.cwd(), env=child_env(machine),
                                log=log, echo=echo, after_each=write)
        report = write(outcomes)
    finally:
        if cfg.work is None:
            shutil.rmtree(work, ignore_errors=True)
    echo(gpu_report.report_markdown(report))
    echo(f"wrote {', '.join(str(cfg.out / n) for n in gpu_report.REPORT_NAMES)}")
    return report["exit_code"]
