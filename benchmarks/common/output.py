"""Where a benchmark's words go: progress lines on stderr, the report as JSON beside the printed table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write `report` to `path` (when given) and say so on stderr."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
