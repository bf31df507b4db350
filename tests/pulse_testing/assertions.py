"""Assertions several test modules share."""

from __future__ import annotations

import pytest

from pulse_edge.errors import InputError


def one_line(match: str, call, *args, **kwargs) -> str:
    """Call, expect an InputError whose message matches and fits on one line; return the message."""
    with pytest.raises(InputError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message
