"""Hand-edits of a bundle's manifest, as the tests need them to reach the checks behind its seal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.runtime.bundle.seal import seal


def read_manifest_json(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], Any], *, resealed: bool = True) -> None:
    """Apply `change` to the manifest in place (what it returns is ignored), then recompute its seal, as an export
    writing those values would have (resealed=False: leave the old seal, as a hand-edit does)."""
    data = read_manifest_json(bundle)
    change(data)
    (bundle / MANIFEST_FILE).write_text(json.dumps(seal(data) if resealed else data, indent=2))
