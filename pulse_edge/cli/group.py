"""The click group every pulse-edge command group uses: user errors become one line.

A `PulseEdgeError`, a bad option value of a subcommand, a full (or read-only) disk, memory (or a thread) refused, or a
package missing prints `pulse-edge: error: ...` on stderr and exits with code 2, Ctrl-C exits 130 (SIGTERM during
an export, calibrate, `infer --output` or `eval ecgbench` 143);
anything else is a bug and keeps its traceback. Commands that write bundles and reports stage them
(pulse_edge/staging.py), so a disk that fills half-way leaves nothing half-written behind.
Lean: click and pulse_edge.errors only, so the CLI starts fast.
"""

from __future__ import annotations

import importlib.util
import signal
from typing import Any

import click

from pulse_edge.errors import DISK_ERRORS, DeviceMemoryError, PulseEdgeError


class UserErrorGroup(click.Group):
    """Also used by the `bench` and `eval` groups, so they behave the same when run on their own."""

    interrupt_hint = ""  # e.g. how to resume, for commands that can

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """The group's own options (`pulse-edge --bogus verify b`): one line too, as for a subcommand's."""
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:  # no command at all: click's help, as asked
            raise
        except click.UsageError as e:
            _usage_line(e)
            raise click.exceptions.Exit(e.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PulseEdgeError as e:
            click.echo(f"pulse-edge: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError:  # `pulse-edge bench`: its help, as asked, not an error line
            raise
        except click.UsageError as e:  # a subcommand's bad option value: one line too, not click's three
            _usage_line(e)
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            what, fix = DISK_ERRORS[e.errno]
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(f"pulse-edge: error: {what}{where}: {fix}, and run the command again", err=True)
            ctx.exit(2)
        except DeviceMemoryError as e:  # a full GPU: its message says what to do
            click.echo(f"pulse-edge: error: {e}", err=True)
            ctx.exit(2)
        except MemoryError as e:  # numpy, ONNX Runtime or a kernel's scratch or threads refused: the machine's state
            what = str(e).rstrip(".") or "out of memory"
            click.echo(f"pulse-edge: error: {what}: free memory (close other programs) or use a smaller bundle or "
                       "fewer --threads, and run the command again", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C; staged work also turns SIGTERM and SIGHUP into one
            self._interrupted(ctx, e)
        except click.exceptions.Exit:  # a subgroup said so already (bench, eval): its exit, once
            raise
        except ModuleNotFoundError as e:  # a package this command needs is not installed: the machine's state
            if (inner := _interrupt_within(e)) is not None:  # or Ctrl-C inside a lazy import (below)
                self._interrupted(ctx, inner)
            if e.name is None or e.name.split(".")[0] == "pulse_edge":
                raise
            click.echo(f"pulse-edge: error: {_missing(e.name)}", err=True)
            ctx.exit(2)
        except Exception as e:
            # a Ctrl-C during a library's lazy import comes out as that library's own error (transformers: "Could
            # not import module ...") with the KeyboardInterrupt inside: an interruption, not a bug
            inner = _interrupt_within(e)
            if inner is None:
                raise
            self._interrupted(ctx, inner)

    def _interrupted(self, ctx: click.Context, e: KeyboardInterrupt) -> None:
        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        click.echo(f"pulse-edge: {what}{self.interrupt_hint}", err=True)
        ctx.exit(128 + signum)


def _missing(module: str) -> str:
    """What to say of a module that cannot be imported: a package not installed, or one of another version."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:  # a namespace package ("google") is nobody's installation: the module
        named = top if spec is None else module  # itself is what is missing ("google.protobuf")
        return (f"this command needs the Python module {named!r}, which is not installed: install pulse-edge with "
                "the extras of README's Install section, or that package alone")
    return (f"this command needs {module!r}, which the installed {top} does not have: install the versions "
            "pulse-edge is tested with (pip install -c constraints.txt, README's Install section)")


def _usage_line(error: click.UsageError) -> None:
    where = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
    click.echo(f"pulse-edge: error: {error.format_message().rstrip('.')}{where}", err=True)


def _interrupt_within(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt among the exceptions that caused or were being handled by `error`, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
