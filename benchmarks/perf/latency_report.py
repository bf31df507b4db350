"""`bench latency --report DIR`: the latency breakdown as markdown, JSON and a PNG.

The plot stacks, per print size, the median time of each stage of one answer:
preprocessing, vision, prefill, and the decode steps of the generated tokens
(from the measured decode rate), so it shows where a cart's seconds go.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.machine import accuracy_warning
from pulse_edge.benchmarks.common.plots import matplotlib_figure
from pulse_edge.staging import staged_file

PLOT_FILE, MARKDOWN_FILE, JSON_FILE = "latency.png", "latency.md", "latency.json"
STAGES = (("preprocess", "preprocess_ms"), ("vision", "vision_ms"), ("prefill", "prefill_ms"))
COLOURS = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "prefill": "#ff7f0e", "decode": "#2ca02c"}


def stage_medians(row: Mapping[str, Any]) -> dict[str, float]:
    """p50 ms of each stage of one print size; decode = (generated - 1) tokens at the p50 rate."""
    timings = row["timings"]
    stages = {name: float(timings[key]["p50"]) for name, key in STAGES}
    rate = timings.get("decode_tokens_per_s", {}).get("p50")
    steps = max(int(row.get("generated_tokens", 0)) - 1, 0)
    stages["decode"] = 1000.0 * steps / rate if rate else 0.0
    return stages


def plot_latency(path: Path, report: Mapping[str, Any]) -> Path:
    figure_class, canvas_class = matplotlib_figure()
    rows = report["sizes"]
    fig = figure_class(figsize=(10, 1.4 + 0.7 * len(rows)))
    canvas_class(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['size']} ({r['image_tokens']} img tok)" for r in rows]
    left = [0.0] * len(rows)
    for stage in ("preprocess", "vision", "prefill", "decode"):
        widths = [stage_medians(r)[stage] / 1000.0 for r in rows]
        ax.barh(labels, widths, left=left, color=COLOURS[stage], label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    model = report["model"]
    ax.set_xlabel("seconds (p50 per stage)")
    ax.set_title(f"{model.get('name')} ({model.get('precision')}, {report.get('backend')}) on "
                 f"{report['machine'].get('cpu')}, {report['machine'].get('cores')} cores", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_latency_report(report_dir: str | Path, report: Mapping[str, Any], table: str) -> list[Path]:
    """latency.md (the printed table with model, machine, date and caveats), latency.json, latency.png."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine, model = report["machine"], report["model"]
    lines = [f"# Latency: {model.get('name')}", "",
             f"- model: {model.get('path')} ({model.get('precision')}), backend {report.get('backend')}",
             f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('ram_gib')} GiB RAM, "
             f"{machine.get('platform')}",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')} (report written)", ""]
    warning = accuracy_warning(model)
    lines += [f"> {warning}", ""] if warning else []
    lines += [table, "", f"![latency breakdown]({PLOT_FILE})", ""]
    # the plot first (the likeliest to fail), each file whole or not at all: never a report naming a missing plot
    with staged_file(out / PLOT_FILE) as work:
        plot_latency(work, report)
    for name, text in ((JSON_FILE, json.dumps(report, indent=2) + "\n"), (MARKDOWN_FILE, "\n".join(lines))):
        with staged_file(out / name) as work:
            work.write_text(text, encoding="utf-8")
    return [out / MARKDOWN_FILE, out / JSON_FILE, out / PLOT_FILE]
