"""Where a benchmark's words go: progress lines on stderr, the report as JSON beside the printed table."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from pulse_edge.errors import PulseEdgeError
from pulse_edge.staging import check_output_file, staged_file


def progress(message: str) -> None:
    if not _quiet():
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _quiet() -> bool:
    """`pulse-edge -q`: its console handler on the `pulse_edge` logger says so (pulse_edge/cli/progress.py). Asked
    of the logger because the benchmarks sit below the CLI and never import it."""
    return any(getattr(handler, "quiet", False) is True for handler in logging.getLogger("pulse_edge").handlers)


class ReportPath(click.Path):
    """A --json path, checked when the command line is parsed: a folder or an unwritable place is one line before
    minutes of measuring, not a traceback after them."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            check_output_file(path, what="report file")
        except PulseEdgeError as e:
            self.fail(str(e), param, ctx)
        return path


REPORT_PATH = ReportPath()


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write `report` to `path` (when given), whole or not at all, and say so on stderr."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as work:
        work.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
