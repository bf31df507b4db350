"""The README's command synopses name every option each command has, and only options it has."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pulse_edge.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(_commands(command, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = command
    return found


def _synopses() -> dict[str, str]:
    """{'infer': 'pulse-edge infer IMAGE --model DIR [...] ...', ...} from the README's code blocks."""
    synopses: dict[str, str] = {}
    current, in_code = None, False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_code, current = not in_code, None
            continue
        if not in_code:
            continue
        match = re.match(r"pulse-edge ((?:[a-z-]+ )*[a-z-]+)\b", line)
        if match and line.startswith("pulse-edge "):
            words = match.group(1).split()
            current = next((" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in COMMANDS), None)
            if current is not None:
                synopses[current] = synopses.get(current, "") + " " + line
        elif current is not None and line.startswith(" "):
            synopses[current] += " " + line
        else:
            current = None
    return synopses


COMMANDS = _commands(main)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_the_readme_synopsis_lists_every_option(path: str) -> None:
    synopsis = _synopses().get(path)
    assert synopsis is not None, f"README has no synopsis for `pulse-edge {path}`"
    options = {max(p.opts, key=len) for p in COMMANDS[path].params if isinstance(p, click.Option)} - {"--help"}
    missing = {o for o in options if not re.search(re.escape(o) + r"(?![\w-])", synopsis)}
    assert not missing, f"`pulse-edge {path}` in the README lacks {sorted(missing)}"
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", synopsis))
    known = options | {f"--no-{o[2:]}" for o in options} | {
        s for p in COMMANDS[path].params if isinstance(p, click.Option) for s in p.secondary_opts}
    assert named <= known, f"`pulse-edge {path}` in the README names options it does not have: {named - known}"
