"""Reports of a run or a comparison: markdown to read, JSON to process, a PNG to look at.

Measured figures are the compat ones (the paper's scoring rules), set beside
the paper's PULSE-7B and GPT-4o figures; strict figures follow in their own
table. Every report names the model, its precision, the machine, the date and
the samples per subset, and says plainly when the model is a test model whose
accuracy means nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pulse_edge.benchmarks.common.machine import CHECKPOINT_PRECISION, accuracy_warning
from pulse_edge.benchmarks.common.plots import matplotlib_figure
from pulse_edge.benchmarks.ecgbench.compare import Comparison
from pulse_edge.benchmarks.ecgbench.paper import REFERENCE, SOURCE
from pulse_edge.benchmarks.ecgbench.score import SubsetScore
from pulse_edge.calibration.datasets.ecgbench.subsets import LOWER_IS_BETTER, SUBSETS
from pulse_edge.staging import staged_file

PLOT_FILE, MARKDOWN_FILE, JSON_FILE = "accuracy.png", "report.md", "report.json"
_METRIC_NAMES = MappingProxyType({"auc": "AUC", "f1": "F1", "hl": "HL", "accuracy": "accuracy", "score": "judge score"})

# One bar group: (column label, lower is better, {series label: value or None}).
Column = tuple[str, bool, dict[str, float | None]]


def write_run_report(report_dir: str | Path, scores: Sequence[SubsetScore], *, model: Mapping[str, Any],
                     settings: Mapping[str, Any], machine: Mapping[str, Any]) -> list[Path]:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _now()
    payload = {"kind": "ecgbench-run", "date": date, "model": dict(model), "settings": dict(settings),
               "machine": dict(machine), "warning": accuracy_warning(model), "subsets": [s.to_dict() for s in scores],
               "reference_source": SOURCE, "reference": _plain(REFERENCE)}
    title = f"ECGBench: {model.get('name', 'model')} ({model.get('precision')})"
    plot = plot_columns(out / PLOT_FILE, title, _run_columns(scores, _short(str(model.get("precision")))),
                        _plot_warning(model))
    lines = [f"# {title}", "", f"> **{accuracy_warning(model)}**", "",
             *_header(date, machine, model, settings), "", *_compat_table(scores), "", *_strict_table(scores), "",
             *_coverage_table(scores), "", *_notes(scores), "", f"![accuracy per subset]({plot.name})", ""]
    return [*_write(out, lines, payload), plot]


def write_compare_report(report_dir: str | Path, comparison: Comparison, *, machine: Mapping[str, Any],
                         gate: Sequence[str] | None = None) -> list[Path]:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _now()
    payload = {"kind": "ecgbench-compare", "date": date, "machine": dict(machine), **comparison.to_dict(),
               "gate_failures": list(gate or []), "reference_source": SOURCE}
    labels = [r.label for r in comparison.runs]
    plot = plot_columns(out / PLOT_FILE, f"ECGBench: {' vs '.join(labels)}", _compare_columns(comparison),
                        "accuracy is meaningful only with the real PULSE-7B weights")
    lines = ["# ECGBench comparison", "", f"Date: {date}  ", f"Machine: {_machine_line(machine)}", "",
             "| run | folder | model | precision | max new tokens |", "|---|---|---|---|---|"]
    for r in comparison.runs:
        lines.append(f"| {r.label} | {r.path} | {r.settings.get('model', '?')} | {r.settings.get('precision', '?')} "
                     f"| {r.settings.get('max_new_tokens', '?')} |")
    lines += ["", "> Deltas are against the first run, on the samples every run answered. "
              "Accuracy means something only for the real PULSE-7B weights.", ""]
    for c in comparison.subsets:
        lines += _compare_section(c, labels)
    if comparison.skipped:
        lines += ["Not compared: " + "; ".join(f"{k} ({v})" for k, v in comparison.skipped.items()), ""]
    if gate is not None:
        lines += ["## Gate", "", *(f"- FAILED: {g}" for g in gate), *(["- passed"] if not gate else []), ""]
    lines += [f"![metrics per run]({plot.name})", ""]
    return [*_write(out, lines, payload), plot]


def plot_columns(path: Path, title: str, columns: Sequence[Column], warning: str = "") -> Path:
    """Grouped bars, one group per metric; lower-is-better metrics (HL) get their own panel. A `warning`
    is printed on the figure itself, so that the picture cannot travel without it."""
    figure_class, canvas_class = matplotlib_figure()
    panels = [(label, [c for c in columns if c[1] == lower]) for label, lower in
              (("higher is better", False), ("lower is better\n(Hamming loss)", True))]
    panels = [(label, cols) for label, cols in panels if cols] or [("no figures", [])]
    widths = [max(2, len(cols)) for _, cols in panels]
    figure = figure_class(figsize=(min(24, max(8.0, 2 + 0.9 * sum(widths))), 5.5), layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    for ax, (label, cols) in zip(axes, panels, strict=True):
        _bars(ax, cols, label)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the figure, beside the panels, where it hides no bar
        figure.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    figure.suptitle(title)
    if warning:
        figure.supxlabel(warning, color="firebrick", fontsize=10)
    with staged_file(path) as work:  # whole or not at all: a report read while it is written, or after a kill
        figure.savefig(work, dpi=110)
    return path


def _bars(ax: Any, columns: Sequence[Column], label: str) -> None:
    series = list(dict.fromkeys(name for _, _, values in columns for name in values))
    width = 0.8 / max(1, len(series))
    top = 0.0
    for k, name in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(columns))]
        ys = [values.get(name) for _, _, values in columns]
        bars = ax.bar(xs, [0.0 if y is None else y for y in ys], width, label=name)
        top = max([top, *(y for y in ys if y is not None)])
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate("n/a" if y is None else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], rotation=35, ha="right", fontsize=8)
    pad = max(0.0, (3 - len(columns)) / 2)  # one or two groups stay centred, with bars of normal width
    ax.set_xlim(-0.5 - pad, len(columns) - 0.5 + pad)
    ax.set_ylim(0, max(10.0, min(115.0, 1.2 * top)))
    ax.set_ylabel("%")
    ax.set_title(label, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _run_columns(scores: Sequence[SubsetScore], measured_label: str) -> list[Column]:
    columns: list[Column] = []
    for score in scores:
        for metric in REFERENCE["PULSE-7B (paper)"].get(score.subset, {}):
            values = {f"measured ({measured_label})": _value(score.compat.get(metric))}
            values.update({name: table[score.subset][metric] for name, table in REFERENCE.items()})
            columns.append((f"{score.title} {_METRIC_NAMES[metric]}", metric in LOWER_IS_BETTER, values))
    return columns


def _compare_columns(comparison: Comparison) -> list[Column]:
    labels = [r.label for r in comparison.runs]
    columns: list[Column] = []
    for c in comparison.subsets:
        for metric, paper in REFERENCE["PULSE-7B (paper)"].get(c.subset, {}).items():
            values = {label: _value(s.compat.get(metric)) for label, s in zip(labels, c.scores, strict=True)}
            values["PULSE-7B (paper)"] = paper
            columns.append((f"{SUBSETS[c.subset].title} {_METRIC_NAMES[metric]}", metric in LOWER_IS_BETTER, values))
    return columns


def _short(precision: str) -> str:
    return "checkpoint" if precision == CHECKPOINT_PRECISION else precision


def _plot_warning(model: Mapping[str, Any]) -> str:
    if model.get("full_shape") is False:
        return "TEST MODEL (not PULSE-7B's shape): these results are MEANINGLESS for accuracy"
    return "accuracy is meaningful only with the real PULSE-7B weights"


def _header(date: str, machine: Mapping[str, Any], model: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    tokens = settings.get("max_new_tokens")
    paper = "" if tokens == 1024 else " (NOT the paper's 1024)"
    return [f"- Model: {model.get('name')} ({model.get('path')})",
            f"- Precision: {model.get('precision')}; backend {settings.get('backend')}, dtype "
            f"{settings.get('dtype')}, device {settings.get('device')}",
            f"- Decoding: {settings.get('sampling', 'greedy')}, max {tokens} new tokens{paper}",
            f"- Machine: {_machine_line(machine)}", f"- Date: {date}"]


def _machine_line(machine: Mapping[str, Any]) -> str:
    return (f"{machine.get('platform')}, CPU {machine.get('cpu')}, {machine.get('cores')} cores, "
            f"{machine.get('ram_gib')} GiB RAM")


# Rows whose measured figure is not computed as the paper's was: said in the row, not only in the notes.
NOT_COMPARABLE = MappingProxyType({
    "arena": "turn 1 only: the paper's judge scores the whole two-turn conversation, so not comparable",
})


def _compat_table(scores: Sequence[SubsetScore]) -> list[str]:
    names = list(REFERENCE)
    lines = ["## Results (compat: the paper's scoring rules)", "",
             f"| subset | samples scored (paper) | metric | measured | {' | '.join(names)} |",
             "|---|---|---|---|" + "---|" * len(names)]
    for s in scores:
        for metric in REFERENCE[names[0]].get(s.subset, {}):
            refs = " | ".join(f"{REFERENCE[n][s.subset][metric]:.1f}" for n in names)
            caveat = f" ({NOT_COMPARABLE[s.subset]})" if s.subset in NOT_COMPARABLE else ""
            scored = s.compat.get("judged", s.coverage.scored)  # a judged score: the samples a verdict scored
            lines.append(f"| {s.title} | {scored} ({SUBSETS[s.subset].paper_size}) | "
                         f"{_METRIC_NAMES[metric]}{caveat} | {_fmt(s.compat.get(metric), s.compat)} | {refs} |")
    return [*lines, "", f"Reference figures: {SOURCE}."]


def _strict_table(scores: Sequence[SubsetScore]) -> list[str]:
    lines = ["## Strict scoring (whole-word matching, no guessing)", "",
             "| subset | metric | strict | compat | unreadable answers |", "|---|---|---|---|---|"]
    for s in scores:
        for metric in ("f1", "hl", "accuracy", "exact_match", "score"):
            if metric in s.strict:
                lines.append(f"| {s.title} | {metric} | {_fmt(s.strict.get(metric), s.strict)} | "
                             f"{_fmt(s.compat.get(metric), s.compat)} | {s.strict.get('unparsed', '-')} |")
    return lines


def _coverage_table(scores: Sequence[SubsetScore]) -> list[str]:
    lines = ["## Coverage", "", "| subset | reference | scored | missing | unknown ids | duplicates | errors | "
             "torn last line |", "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        c = s.coverage
        lines.append(f"| {s.subset} | {c.samples} | {c.scored} | {c.missing} | {c.unknown} | {c.duplicates} | "
                     f"{c.errors} | {'yes' if c.torn_tail else 'no'} |")
    return lines


def _notes(scores: Sequence[SubsetScore]) -> list[str]:
    notes = [f"- {s.subset}: {n}" for s in scores for n in s.notes]
    notes += [f"- {s.subset}: {s.compat['reason']}" for s in scores if s.compat.get("scored") is False]
    return ["## Notes", "", *notes] if notes else []


def _compare_section(c: Any, labels: Sequence[str]) -> list[str]:
    lines = [f"## {SUBSETS[c.subset].title} ({c.subset}), {c.common} common samples", "",
             "| mode | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for mode in ("compat", "strict"):
        first = getattr(c.scores[0], mode)
        for metric in ("auc", "f1", "hl", "accuracy", "exact_match", "score"):
            if metric not in first or (mode == "strict" and metric == "auc"):
                continue
            cells = [_fmt(first.get(metric), first)]
            for k, score in enumerate(c.scores[1:]):
                delta = c.deltas[k].get(mode, {}).get(metric)
                cells.append(_fmt(getattr(score, mode).get(metric), getattr(score, mode))
                             + ("" if delta is None else f" ({delta:+.2f})"))
            lines.append(f"| {mode} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "| run vs first | identical text % | identical parsed answer % | changed samples | strict: right "
              "-> wrong / wrong -> right | strict change, points (95% CI) | p (McNemar, exact) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {a.other} | {_fmt(a.text_rate, {})} | {_fmt(a.parsed_rate, {})} | {len(a.changed)} | "
              + _paired_cells(a.paired) + " |" for a in c.agreement]
    return [*lines, ""]


def _paired_cells(paired: Any) -> str:
    if paired is None:  # a judged subset: no right or wrong per sample
        return "n/a | n/a | n/a"
    low, high = paired.ci95
    return (f"{paired.right_to_wrong} / {paired.wrong_to_right} | {paired.delta:+.2f} ({low:+.2f} to {high:+.2f}) | "
            f"{paired.p_value:.3g}")


def _fmt(value: Any, metrics: Mapping[str, Any]) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}"
    if metrics.get("scored") is False:
        return "not scored"
    return "n/a"


def _value(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _write(out: Path, lines: Sequence[str], payload: Mapping[str, Any]) -> list[Path]:
    markdown, data = out / MARKDOWN_FILE, out / JSON_FILE
    for path, text in ((markdown, "\n".join(lines)), (data, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")):
        with staged_file(path) as work:
            work.write_text(text, encoding="utf-8")
    return [markdown, data]


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
