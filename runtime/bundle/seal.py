"""The manifest's own checksum: `manifest_sha256`, the sha256 of every other field (manifest version 3).

The runtime trusts every field of `manifest.json`: the prompt template, `image_std`, the special ids, the
cache length, which file is which graph. A hand-edit or a damaged copy that still parses and passes the schema
changes answers without any error (a new `image_std` shifts every pixel the vision graph sees), and the files'
checksums (`files`) cannot see it, since they live in the manifest. So export seals it: the sha256 of the
manifest in one canonical JSON form, written into the manifest itself, checked at every load after the schema
(a field the schema refuses is named; an edit the schema allows is caught here).

The canonical form is `json.dumps` with sorted keys, no whitespace and ASCII escapes, of the parsed manifest
without its `manifest_sha256`, with every whole float written as an integer: what the file parses to, not its
bytes, so indentation, key order and how a number is spelled do not matter (jq and JavaScript rewrite 1.0 as 1,
and 1e-05 as 0.00001; both parse to the same values). A number the schema needs as an integer is still refused
as 1.0 by the schema. (That is the seal's view: TensorRT engines record the manifest's bytes,
runtime/bundle/engines.py, so a reformatted manifest needs `build-engines` again.)

It guards against accidents (an editor, a copy, a disk), not against someone set on changing the manifest:
anyone can recompute the seal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.names import MANIFEST_FILE, SEAL_KEY

SEALED_FROM_VERSION = 3


def manifest_digest(d: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON form, its own `manifest_sha256` left out."""
    return canonical_digest(d, SEAL_KEY)


def canonical_digest(d: Mapping[str, Any], seal_key: str) -> str:
    """sha256 of a JSON object's canonical form (module doc), its `seal_key` left out: the manifest's, and
    engines.json's (runtime/bundle/engines.py)."""
    body = _whole_floats_as_ints({k: v for k, v in d.items() if k != seal_key})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_whole_floats_as_ints(v) for v in value]
    return value


def seal(d: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its `manifest_sha256` (re)computed: what export writes."""
    return {**{k: v for k, v in d.items() if k != SEAL_KEY}, SEAL_KEY: manifest_digest(d)}


def check_seal(d: Mapping[str, Any]) -> None:
    """A version-3 manifest must carry its checksum, and any checksum present must match (so a version lowered by
    hand does not skip it; earlier versions were written without one)."""
    if SEAL_KEY not in d and d["version"] < SEALED_FROM_VERSION:
        return
    if SEAL_KEY not in d:
        raise BundleError(f"{MANIFEST_FILE}: a version {d['version']} manifest lacks {SEAL_KEY!r} (its own "
                          "checksum); re-export the bundle")
    if d[SEAL_KEY] != manifest_digest(d):
        raise BundleError(f"{MANIFEST_FILE} was changed after export: its contents no longer match its {SEAL_KEY} "
                          "(a hand-edit or a damaged copy; the runtime would trust every changed field); re-copy the "
                          "bundle from where it was exported, or re-export it")
