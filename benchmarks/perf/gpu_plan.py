"""The plan of `pulse-edge bench gpu` (gpu_check.py runs it): which steps, in which order, with which commands.

    versions           device, driver, CUDA runtime and library versions          (gpu_steps.py versions)
    pytest-gpu         pytest -m "gpu or tensorrt" over the test files carrying those marks: the Triton kernels
                       against their torch twins (fp16/bf16/int8/fp8), the fused projector inside the torch
                       backend, the torch backend on CUDA against the CPU reference, ORT CUDA and TensorRT
                       (those skip, with their reason, where onnxruntime lacks the provider)
    projector          bench projector, T = 576, 2880, 14400 x bf16, int8, fp8 (fused vs eager; the bf16
                       matmul peak and the copy bandwidth measured in the same process)
    make-model         a random real-width checkpoint with --layers decoder layers (gpu_steps.py make-model)
    torch-decode       the torch backend on it: projector and vision fused vs plain, prefill, decode against
                       the HBM bound                                              (gpu_steps.py torch-decode)
    ort-export         where onnxruntime has a CUDA or TensorRT provider: an fp16 bundle of that model
    ort-cuda           bench latency of that bundle on the CUDA provider
    ort-tensorrt       the same on the TensorRT provider
    projector-compile  torch.compile beside the fused kernels at T = 2880 (last: the first to go when time is short)

Every step is a `python -m` command line (the plan prints them; the dry run parses them). What a machine lacks
(no checkout, no onnxruntime-gpu) leaves a step out with the reason; `--steps` picks steps and brings the ones
they need. The expected seconds are estimates for an H100 (nothing here has been timed on one yet).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pulse_edge.errors import ConfigError

STEPS_MODULE = "pulse_edge.benchmarks.perf.gpu_steps"
CLI_MODULE = "pulse_edge.cli.main"
GPU_MARKS = ("gpu", "tensorrt")
MARK_PATTERN = re.compile(r"pytest\.mark\.(gpu|tensorrt)\b")


@dataclass(frozen=True)
class GpuCheckConfig:
    out: Path = Path("gpu-check-out")
    work: Path | None = None  # the model, the bundle and the steps' JSON; None: a temp dir, removed at the end
    layers: int = 2
    budget_s: int = 450
    steps: tuple[str, ...] | None = None  # None: every step this machine allows

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps or () if s not in STEP_BUILDERS]
        if unknown:
            raise ConfigError(f"--steps: {', '.join(unknown)} not among {', '.join(STEP_BUILDERS)}")


@dataclass(frozen=True)
class Machine:
    """What decides the plan: the checkout (None for an installed wheel), CUDA, ORT's providers, pytest-timeout."""

    root: Path | None
    cuda: bool
    ort_providers: tuple[str, ...] = ()
    pytest_timeout: bool = False

    @classmethod
    def probe(cls) -> Machine:
        import pulse_edge

        root = Path(pulse_edge.__file__).resolve().parent.parent
        checkout = (root / "tests").is_dir() and (root / "pyproject.toml").is_file()
        return cls(root=root if checkout else None, cuda=_cuda_available(), ort_providers=_ort_providers(),
                   pytest_timeout=importlib.util.find_spec("pytest_timeout") is not None)


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _ort_providers() -> tuple[str, ...]:
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


@dataclass(frozen=True)
class Step:
    name: str
    purpose: str
    argv: tuple[str, ...]
    expect_s: int  # what it should take on an H100 (the budget check and the plan)
    timeout_s: int  # its own limit; the run's budget may cut it shorter
    result: Path | None = None  # the JSON (or JUnit XML) it writes, read back into the report
    after: tuple[str, ...] = ()  # steps that must have passed first

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "argv": list(self.argv), "command": shlex.join(self.argv),
                "result": None if self.result is None else str(self.result)}


@dataclass
class Plan:
    steps: list[Step]
    left_out: dict[str, str]  # step -> why this machine does not run it
    work: Path


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class _Context:
    cfg: GpuCheckConfig
    machine: Machine
    work: Path

    def python(self, module: str, *args: str) -> tuple[str, ...]:
        return (sys.executable, "-m", module, *args)

    def json(self, name: str) -> Path:
        return self.work / f"{name}.json"

    @property
    def model(self) -> Path:
        return self.work / f"real-width-{self.cfg.layers}-layers"

    @property
    def bundle(self) -> Path:
        return self.work / f"real-width-{self.cfg.layers}-layers-fp16"


def gpu_test_files(root: Path) -> list[str]:
    """Test files (relative to the checkout) that carry a gpu or tensorrt mark."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                  if MARK_PATTERN.search(p.read_text(encoding="utf-8")))


def _versions(c: _Context) -> Step:
    return Step("versions", "device, driver, CUDA and library versions",
                c.python(STEPS_MODULE, "versions", "--json", str(c.json("versions"))), 15, 60, c.json("versions"))


def _pytest(c: _Context) -> Step | str:
    if c.machine.root is None:
        return "no tests/ folder beside pulse_edge: run from a source checkout"
    files = gpu_test_files(c.machine.root)
    if not files:
        return "no test file carries a gpu or tensorrt mark"
    xml = c.work / "pytest-gpu.xml"
    per_test = ("--timeout=150",) if c.machine.pytest_timeout else ()
    argv = c.python("pytest", "-v", "-p", "no:cacheprovider", "-rs", "-m", " or ".join(GPU_MARKS),
                    f"--junitxml={xml}", *per_test, *files)
    return Step("pytest-gpu", f"pytest -m \"gpu or tensorrt\" over {len(files)} files", argv, 180, 300, xml)


def _projector(c: _Context) -> Step:
    argv = c.python(CLI_MODULE, "bench", "projector", "--tokens", "576,2880,14400", "--precisions", "bf16,int8,fp8",
                    "--runs", "20", "--warmup", "5", "--no-compile", "--json", str(c.json("projector")))
    return Step("projector", "fused Triton projector vs torch eager, bf16/int8/fp8, T = 576/2880/14400",
                argv, 60, 150, c.json("projector"))


def _make_model(c: _Context) -> Step:
    argv = c.python(STEPS_MODULE, "make-model", str(c.model), "--layers", str(c.cfg.layers),
                    "--json", str(c.json("make-model")))
    return Step("make-model", f"random real-width checkpoint, {c.cfg.layers} decoder layers (bf16)", argv,
                10 + 5 * c.cfg.layers, 120, c.json("make-model"))


def _torch_decode(c: _Context) -> Step:
    argv = c.python(STEPS_MODULE, "torch-decode", "--model", str(c.model), "--dtype", "fp16",
                    "--json", str(c.json("torch-decode")))
    return Step("torch-decode", "torch backend on CUDA: projector/vision fused vs plain, prefill, decode vs HBM",
                argv, 40, 150, c.json("torch-decode"), after=("make-model",))


def _ort_export(c: _Context) -> Step | str:
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(c.machine.ort_providers):
        return "onnxruntime has no CUDA or TensorRT provider here (a CPU build): install onnxruntime-gpu"
    argv = c.python(CLI_MODULE, "export", str(c.model), "--output", str(c.bundle), "--precision", "fp16",
                    "--validation", "quick")
    return Step("ort-export", "fp16 bundle of the real-width model", argv, 300, 900, after=("make-model",))


def _ort_latency(provider: str, ort_name: str, expect_s: int) -> Callable[[_Context], Step | str]:
    def build(c: _Context) -> Step | str:
        if ort_name not in c.machine.ort_providers:
            return f"onnxruntime has no {ort_name} here"
        name = f"ort-{provider}"
        argv = c.python(CLI_MODULE, "bench", "latency", "--model", str(c.bundle), "--provider", provider,
                        "--sizes", "2200x1700", "--runs", "3", "--warmup", "1", "--max-new-tokens", "32",
                        "--json", str(c.json(name)))
        return Step(name, f"the fp16 bundle on ORT's {ort_name}: vision, prefill, decode", argv, expect_s,
                    3 * expect_s, c.json(name), after=("ort-export",))

    return build


def _projector_compile(c: _Context) -> Step:
    argv = c.python(CLI_MODULE, "bench", "projector", "--tokens", "2880", "--precisions", "bf16,int8,fp8",
                    "--runs", "20", "--warmup", "5", "--compile", "--json", str(c.json("projector-compile")))
    return Step("projector-compile", "torch.compile beside the fused kernels at T = 2880", argv, 90, 180,
                c.json("projector-compile"))


# In running order: the correctness checks first, what matters least last (it is what a short budget drops).
STEP_BUILDERS: dict[str, Callable[[_Context], Step | str]] = {
    "versions": _versions, "pytest-gpu": _pytest, "projector": _projector, "make-model": _make_model,
    "torch-decode": _torch_decode, "ort-export": _ort_export,
    "ort-cuda": _ort_latency("cuda", "CUDAExecutionProvider", 60),
    "ort-tensorrt": _ort_latency("tensorrt", "TensorrtExecutionProvider", 300),
    "projector-compile": _projector_compile,
}


def build_plan(cfg: GpuCheckConfig, machine: Machine, work: Path) -> Plan:
    """The steps this machine can run, in order; a chosen step brings the steps it needs along."""
    context = _Context(cfg, machine, work)
    built = {name: build(context) for name, build in STEP_BUILDERS.items()}
    wanted = set(cfg.steps or STEP_BUILDERS)
    for name in list(wanted):
        step = built[name]
        wanted.update(step.after if isinstance(step, Step) else ())
    steps = [s for n, s in built.items() if n in wanted and isinstance(s, Step)]
    left_out = {n: s for n, s in built.items() if isinstance(s, str)}
    left_out.update({n: "not in --steps" for n in built if n not in wanted})
    return Plan(steps, left_out, work)


def plan_lines(plan: Plan, cfg: GpuCheckConfig) -> list[str]:
    expected = sum(s.expect_s for s in plan.steps)
    lines = [f"plan: {len(plan.steps)} steps, ~{expected} s expected on an H100, budget {cfg.budget_s} s; "
             f"output {cfg.out}, work {plan.work}"]
    for i, step in enumerate(plan.steps, 1):
        lines += [f"  {i}. {step.name}: {step.purpose} (~{step.expect_s} s, timeout {step.timeout_s} s)",
                  f"     {shlex.join(step.argv)}"]
    lines += [f"  left out: {name}: {why}" for name, why in plan.left_out.items()]
    return lines
