"""The click group every pulse-edge command group uses: user errors become one line.

A `PulseEdgeError` prints `pulse-edge: error: ...` on stderr and exits with its
code (2), Ctrl-C exits 130; anything else is a bug and keeps its traceback.
Lean: click and pulse_edge.errors only, so the CLI starts fast.
"""

from __future__ import annotations

from typing import Any

import click

from pulse_edge.errors import PulseEdgeError


class UserErrorGroup(click.Group):
    """Also used by the `bench` and `eval` groups, so they behave the same when run on their own."""

    interrupt_hint = ""  # e.g. how to resume, for commands that can

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PulseEdgeError as e:
            click.echo(f"pulse-edge: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(f"pulse-edge: interrupted{self.interrupt_hint}", err=True)
            ctx.exit(130)
