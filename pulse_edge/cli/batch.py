"""`pulse-edge infer INPUT... --output FILE`: many ECGs into a JSON-lines file, with a progress bar.

The work is runtime/batch.py's; this module expands the arguments, draws the bar (tqdm, on a terminal
only), reports each failure as it happens and the totals at the end, all on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from pulse_edge.errors import ConfigError
from pulse_edge.staging import check_output_file, sole_writer


def infer_many(inputs: tuple[str, ...], output: Path, open_model: Callable[[], Any], *, question: str,
               max_new_tokens: int, sampling: Any, reading: Mapping[str, Any], save_render: Path | None,
               fail_fast: bool, model: str) -> None:
    from pulse_edge.runtime.batch import BatchOptions

    _check_places(output, save_render)  # before the model loads: the answers must have somewhere to go
    output.parent.mkdir(parents=True, exist_ok=True)
    with sole_writer(output, what="--output file"):  # a second run would append the same answers
        _run(inputs, output, open_model, BatchOptions(
            question=question, max_new_tokens=max_new_tokens, sampling=sampling, input_options=dict(reading),
            save_render_dir=save_render, fail_fast=fail_fast, model=model))


def _check_places(output: Path, save_render: Path | None) -> None:
    check_output_file(output, what="--output file")
    if output.exists() and not os.access(output, os.W_OK):
        raise ConfigError(f"{output} is not writable by this user; choose another --output file")
    if save_render is not None:
        if save_render.exists() and not save_render.is_dir():
            raise ConfigError(f"{save_render} is a file; with --output, --save-render names a folder for the prints")
        check_output_file(save_render / "print.png", what="--save-render folder")


def _run(inputs: tuple[str, ...], output: Path, open_model: Callable[[], Any], options: Any) -> None:
    from tqdm import tqdm

    from pulse_edge.runtime.batch import plan_batch, run_batch
    from pulse_edge.runtime.inputs.discover import expand_inputs

    fail_fast = options.fail_fast
    sources = expand_inputs(inputs, exclude=[output])
    plan = plan_batch(sources, output, options.settings())  # read under the lock: what this run sees is answered
    if plan.existing.torn_tail:
        click.echo(f"pulse-edge: {output}: its last line was cut short (a crash?); it is redone", err=True)
    # disable=None: a bar on a terminal only, nothing in logs and pipes
    with tqdm(total=len(plan.todo), unit="ECG", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        def advance(record: Mapping[str, Any]) -> None:
            if "error" in record and not fail_fast:  # fail-fast: the error ends the command, said once
                bar.write(f"pulse-edge: failed: {record['error']}", file=sys.stderr)
            bar.update()

        stats = run_batch(plan, open_model, options, on_record=advance)
    click.echo(f"pulse-edge: {stats.answered} answered, {stats.failed} failed, {stats.already_done} already in "
               f"{output} (of {stats.total} inputs) in {stats.seconds:.1f} s", err=True)
    if stats.failed:  # a cart script reads $?: exit 0 only when every input has its answer (a rerun retries them)
        click.get_current_context().exit(2)
