"""What the kernel studies share (`cpu_kernels`, `prefill_attention`, `decode_attention`): their options (threads,
heads, a size scale, a report file; each study adds its own repeat count), one-graph models with ORT's contrib
opset, the session that runs them, and the summary of ORT's form against a kernel over ABBA rounds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from pulse_edge.benchmarks.common.output import REPORT_PATH
from pulse_edge.click_types import FiniteFloatRange

STUDY_OPTIONS = (
    click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True),
    click.option("--heads", type=click.IntRange(min=1), default=32, show_default=True, help="Heads (x 128)."),
    click.option("--scale", type=FiniteFloatRange(min=0.01, max=1.0), default=1.0, show_default=True,
                 help="Shrink the study's sizes (positions; layers where it has them) by this factor: 1 is PULSE's."),
    click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report."),
)


def study_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(STUDY_OPTIONS):
        command = option(command)
    return command


CONTRIB = "com.microsoft"


def study_model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: Sequence[Any] = ()) -> Any:
    """One graph, opset 17 and ORT's contrib ops."""
    from onnx import helper

    graph = helper.make_graph(nodes, "study", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)],
                             ir_version=10)


def study_session(model: Any, threads: int, *, spinning: bool = True) -> Any:
    """A CPU session of `threads` threads. `spinning` False: the pool does not spin after a run, as the prefill's
    segment sessions do (runtime/engines/segmented.py), so a kernel running between ORT runs keeps the cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def against_kernel(ort_s: Sequence[float], kernel_s: Sequence[float], windows: Sequence[Any], amount: float,
                   rate: str) -> dict[str, Any]:
    """ORT's form and the kernel timed in the same rounds (benchmarks/common/rounds.py abba): the median ms of
    each over the quiet rounds, `rate` = amount / second / 1e9 of each, the median of the rounds' own speedups,
    and the rounds; None and a "busy" reason where the host was too busy for a ratio."""
    from pulse_edge.benchmarks.common.host import busy_reason
    from pulse_edge.benchmarks.common.rounds import paired, quiet_median

    medians = {"ort": quiet_median(ort_s, windows), "kernel": quiet_median(kernel_s, windows)}
    return {"ms": {n: None if m is None else m * 1e3 for n, m in medians.items()},
            rate: {n: None if m is None else amount / m / 1e9 for n, m in medians.items()},
            "speedup": paired(ort_s, kernel_s, windows), "busy": busy_reason(windows),
            "rounds": [{"ort_ms": a * 1e3, "kernel_ms": b * 1e3, **w.to_dict()}
                       for a, b, w in zip(ort_s, kernel_s, windows, strict=True)]}


def busy_lines(records: Sequence[dict[str, Any]], label: Any) -> list[str]:
    """Under a table: why each row that printed "busy" had no quiet rounds (its JSON has the rounds)."""
    return [f"{label(r)}: busy: {r['busy']}" for r in records if r.get("busy")]


def cell(value: float | None, form: str) -> str:
    """A table cell: the value, or "busy" where the rounds gave none."""
    return "busy" if value is None else format(value, form)
