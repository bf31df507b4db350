"""click parameter types any of pulse-edge's command lines may use: the CLI's commands and the benchmark studies'
own entry points. Here, below both in the layer contract, so that neither restates them."""

from __future__ import annotations

import math
from typing import Any

import click


def given(name: str) -> bool:
    """Was the current command's parameter `name` given (command line, environment), not left at its default? For
    options that some modes do not read: refused or noted there, never dropped in silence."""
    return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing nan and inf too: nan fails every comparison, so a range alone lets it through
    (a server's --timeout nan answered every request 504; --max-body-mb nan failed on int())."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):  # before the range: inf is "not in the range" of a bounded one, and says less
            self.fail(f"{number} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)
