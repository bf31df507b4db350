"""`pulse-edge bench gpu --dry-run`: the plan, and every check that needs no GPU.

    CUDA            whether torch sees a GPU (a warning here: a real run would refuse)
    output folder   --out can be created and written
    packages        what the steps import is installed; onnxruntime, tensorrt and pytest-timeout reported
    modules         the modules the steps run import
    pytest marks    gpu and tensorrt are declared, and the kernel tests carry gpu
    commands        every step's command line parses (click for pulse-edge, argparse for gpu_steps, the test
                    files exist for pytest) without running
    budget, disk    the expected seconds fit --budget-s; room for the model (warnings)

Exit code 0 when nothing failed (warnings allowed), 1 otherwise. CI runs it (tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from pulse_edge.benchmarks.perf.gpu_plan import (
    CLI_MODULE,
    GPU_MARKS,
    STEPS_MODULE,
    GpuCheckConfig,
    Machine,
    Plan,
    Step,
    build_plan,
    gpu_test_files,
    plan_lines,
)

# Imported by the dry run: what the steps run (each imports torch, transformers or triton only when it runs).
STEP_MODULES = (CLI_MODULE, STEPS_MODULE, "pulse_edge.benchmarks.perf.projector", "pulse_edge.benchmarks.perf.latency",
                "pulse_edge.export.model.torch_backend", "pulse_edge.export.fixtures.tiny",
                "pulse_edge.kernels.projector", "pulse_edge.kernels.triton_src")
# Needed on the GPU machine (import name: what it is for); the optional ones widen the plan.
REQUIRED = {"torch": "everything", "triton": "the fused kernels", "transformers": "the torch backend",
            "safetensors": "checkpoints", "sentencepiece": "make-model's tokenizer", "tokenizers": "the tokenizer",
            "numpy": "everything", "PIL": "ECG prints", "pytest": "pytest-gpu", "click": "the CLI",
            "jsonschema": "the bundle contract, imported by every step's runtime"}
OPTIONAL = {"onnxruntime": "ORT steps (with a CUDA/TensorRT provider)", "tensorrt": "tensorrt-marked tests",
            "tensorrt_rtx": "tensorrt-marked tests (TensorRT for RTX)",
            "pytest_timeout": "a per-test timeout inside pytest-gpu"}
MODEL_BYTES = {"base": 1.2e9, "per_layer": 0.41e9}  # a real-width bf16 checkpoint: CLIP, embeddings, lm_head + layers


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: a warning, reported but not fatal
    detail: str

    def line(self) -> str:
        return f"  [{ {True: 'ok', False: 'FAIL', None: 'warn'}[self.ok] }] {self.name}: {self.detail}"


def check_out(out: Path) -> Check:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        return Check("output folder", False, f"{out} is not writable: {e}")
    return Check("output folder", True, f"{out.resolve()} is writable")


def check_packages() -> Check:
    missing = [f"{name} ({why})" for name, why in REQUIRED.items() if importlib.util.find_spec(name) is None]
    optional = [f"{name}: {'present' if importlib.util.find_spec(name) else 'absent'}" for name in OPTIONAL]
    if missing:
        return Check("packages", False, f"missing {', '.join(missing)}")
    return Check("packages", True, f"{', '.join(REQUIRED)} importable; {'; '.join(optional)}")


def check_modules() -> Check:
    failed = []
    for name in STEP_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure is what this check is for
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return Check("modules", not failed, "; ".join(failed) or f"{len(STEP_MODULES)} step modules import")


def declared_marks(root: Path) -> set[str]:
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    block = text.split("markers = [", 1)[1].split("]", 1)[0] if "markers = [" in text else ""
    return set(re.findall(r'"(\w+):', block))


def check_marks(machine: Machine) -> Check:
    if machine.root is None:
        return Check("pytest marks", None, "no checkout here: the pytest step is left out")
    undeclared = set(GPU_MARKS) - declared_marks(machine.root)
    if undeclared:
        return Check("pytest marks", False, f"{', '.join(sorted(undeclared))} not declared in pyproject.toml")
    files = gpu_test_files(machine.root)
    if "tests/kernels/test_kernels.py" not in files:
        return Check("pytest marks", False, f"tests/kernels/test_kernels.py carries no gpu mark (found: {files})")
    return Check("pytest marks", True, f"gpu, tensorrt declared; marked in {', '.join(files)}")


def _parse_cli(cli: click.Group, args: Sequence[str]) -> None:
    """Parse a `pulse-edge ...` command line as click would run it, without running it."""
    command, rest, names = cli, list(args), ["pulse-edge"]
    while isinstance(command, click.Group):
        names.append(rest.pop(0))
        command = command.get_command(click.Context(cli), names[-1])
        if command is None:
            raise ValueError(f"no command {' '.join(names)}")
    command.make_context(" ".join(names), rest)


def _parse_steps(_cli: click.Group, args: Sequence[str]) -> None:
    from pulse_edge.benchmarks.perf.gpu_steps import build_parser

    build_parser().parse_args(list(args))


def command_error(step: Step, root: Path | None, cli: click.Group) -> str | None:
    """Why this step's command line would not run, or None where it parses; `cli` is pulse-edge's root group."""
    if step.argv[1:2] != ("-m",) or len(step.argv) < 3:
        return "not a `python -m` command"
    module, args = step.argv[2], step.argv[3:]
    if module == "pytest":
        missing = [a for a in args if a.endswith(".py") and (root is None or not (root / a).is_file())]
        return f"missing test files {missing}" if missing else None
    parsers = {CLI_MODULE: _parse_cli, STEPS_MODULE: _parse_steps}
    if module not in parsers:
        return f"unknown module {module}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsers[module](cli, args)
    except (Exception, SystemExit) as e:  # click raises UsageError, argparse exits: both mean "would not run"
        return f"{type(e).__name__}: {e} {stderr.getvalue().strip()}".strip()
    return None


def check_commands(plan: Plan, root: Path | None, cli: click.Group) -> Check:
    errors = [f"{s.name}: {err}" for s in plan.steps if (err := command_error(s, root, cli))]
    return Check("commands", not errors, "; ".join(errors) or f"all {len(plan.steps)} command lines parse")


def check_budget(plan: Plan, budget_s: int) -> Check:
    expected = sum(s.expect_s for s in plan.steps)
    if expected > budget_s:
        return Check("budget", None, f"~{expected} s expected > --budget-s {budget_s}: the last steps will be cut")
    return Check("budget", True, f"~{expected} s expected within --budget-s {budget_s}; every step has a timeout")


def check_disk(plan: Plan, layers: int) -> Check:
    needed = MODEL_BYTES["base"] + MODEL_BYTES["per_layer"] * layers
    if any(s.name == "ort-export" for s in plan.steps):
        needed *= 2
    anchor = next((p for p in (plan.work, *plan.work.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(anchor).free
    ok = True if free > 1.5 * needed else None
    return Check("disk", ok, f"{free / 2**30:.0f} GiB free at {anchor}; the model needs ~{needed / 2**30:.1f} GiB")


def check_cuda(machine: Machine) -> Check:
    if machine.cuda:
        return Check("CUDA", True, "torch sees a CUDA GPU")
    return Check("CUDA", None, "torch sees no CUDA GPU here: a real run refuses; this dry run checks the rest")


def dry_run_checks(plan: Plan, cfg: GpuCheckConfig, machine: Machine, cli: click.Group) -> list[Check]:
    return [check_cuda(machine), check_out(cfg.out), check_packages(), check_modules(), check_marks(machine),
            check_commands(plan, machine.root, cli), check_budget(plan, cfg.budget_s), check_disk(plan, cfg.layers)]


def default_work(cfg: GpuCheckConfig) -> Path:
    return cfg.work or Path(tempfile.gettempdir()) / "pulse-edge-gpu-check"


def dry_run(cfg: GpuCheckConfig, echo: Callable[[str], None], cli: click.Group,
            machine: Machine | None = None) -> int:
    """Print the plan and the checks; 0 when every check passes (warnings allowed), else 1."""
    machine = machine or Machine.probe()
    plan = build_plan(cfg, machine, default_work(cfg))
    checks = dry_run_checks(plan, cfg, machine, cli)
    for line in [*plan_lines(plan, cfg), "checks:", *(c.line() for c in checks)]:
        echo(line)
    failed = [c.name for c in checks if c.ok is False]
    echo(f"dry run: {'FAILED: ' + ', '.join(failed) if failed else 'ok'}")
    return 1 if failed else 0
