"""`pulse-edge`: the command line.

Every command validates its inputs before loading anything heavy, imports
torch/transformers only inside the command that needs them, and turns a
`PulseEdgeError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import logging
import sys

import click

from pulse_edge import __version__
from pulse_edge.cli.bench import bench_group
from pulse_edge.cli.build_engines import build_engines_cmd
from pulse_edge.cli.calibrate import calibrate_cmd
from pulse_edge.cli.eval import eval_group
from pulse_edge.cli.export import export_cmd
from pulse_edge.cli.fixtures import make_tiny, render_ecg
from pulse_edge.cli.group import UserErrorGroup
from pulse_edge.cli.infer import infer
from pulse_edge.cli.serve import serve


@click.group(cls=UserErrorGroup)
@click.version_option(__version__, prog_name="pulse-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """Run PULSE, the ECG-image LLM, on edge devices."""
    # Only pulse-edge's own logger: exporters and optimisers log plenty at INFO on the root logger.
    logger = logging.getLogger("pulse_edge")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pulse-edge: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


main.add_command(infer)
main.add_command(export_cmd)
main.add_command(build_engines_cmd)
main.add_command(make_tiny)
main.add_command(render_ecg)
main.add_command(calibrate_cmd)
main.add_command(eval_group)
main.add_command(bench_group)
main.add_command(serve)

if __name__ == "__main__":
    main()
