"""Option types several commands share: seeds and torch devices, checked when the command line is parsed."""

from __future__ import annotations

from typing import Any

import click

from pulse_edge.choices import SEED_RANGE, TORCH_DEVICES, is_torch_device
from pulse_edge.errors import ConfigError

SEED = click.IntRange(*SEED_RANGE)


class TorchDevice(click.ParamType):
    """auto, cpu, cuda or cuda:N (whether that GPU exists is checked when the model loads)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, str) and is_torch_device(value):
            return value
        self.fail(f"{value!r} is not one of {', '.join(TORCH_DEVICES)} or cuda:N", param, ctx)


TORCH_DEVICE = TorchDevice()


def at_most_usable_cpus(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """A --threads callback: SessionConfig's check when the command line is read, not minutes later when a session
    is made (or never, where torch or a probe takes the number as it is)."""
    from pulse_edge.runtime.engines.sessions import check_threads

    try:
        check_threads(value)
    except ConfigError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value
