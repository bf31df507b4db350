"""The options the kernel studies share (`cpu_kernels`, `prefill_attention`): threads, heads, a size scale, a
report file. Each study adds its own repeat count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

STUDY_OPTIONS = (
    click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True),
    click.option("--heads", type=click.IntRange(min=1), default=32, show_default=True, help="Heads (x 128)."),
    click.option("--scale", type=click.FloatRange(min=0.01, max=1.0), default=1.0, show_default=True,
                 help="Shrink the study's sizes (positions; layers where it has them) by this factor: 1 is PULSE's."),
    click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the report."),
)


def study_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(STUDY_OPTIONS):
        command = option(command)
    return command
