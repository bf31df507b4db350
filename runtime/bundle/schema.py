"""The JSON shape of `manifest.json`, checked before any field is read.

`Manifest.from_dict` converts fields (`int(...)`, `tuple(...)`), which turns a damaged manifest into a
traceback or, worse, a wrong value (`int("5")`, a list where an object belongs). This module says what
each field must be (type, range, length, a plain file name) and refuses anything else with one line
naming the field: `manifest.json: kv.max_length must be an integer >= 1, got -5; re-export the bundle`.
Cross-checks between fields and with the files are in `checks.py` and `integrity.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.names import FORMAT, MANIFEST_FILE, MANIFEST_VERSION

# Version 1 manifests have no checksums; they still load, with a warning (see `read_manifest`).
READABLE_VERSIONS = (1, MANIFEST_VERSION)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"


def _fail(path: str, expected: str, value: Any, got: str | None = None) -> BundleError:
    if got is None:
        short = isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(repr(value)) <= 40
        got = repr(value) if short else _json_type(value)
    return BundleError(f"{MANIFEST_FILE}: {path} must be {expected}, got {got}; re-export the bundle")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class Spec:
    """What one JSON value must be; `check` raises a BundleError naming `path`."""

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    minimum: int | None = None

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (self.minimum is not None and value < self.minimum):
            bound = "" if self.minimum is None else f" >= {self.minimum}"
            raise _fail(path, f"an integer{bound}", value)


@dataclass(frozen=True)
class Num(Spec):
    positive: bool = False

    def check(self, value: Any, path: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (self.positive and value <= 0):
            raise _fail(path, "a finite number" + (" > 0" if self.positive else ""), value)


@dataclass(frozen=True)
class Str(Spec):
    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _fail(path, "a string", value)


@dataclass(frozen=True)
class FileName(Spec):
    """A file inside the bundle: a plain name, never a path that could point outside it."""

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
            raise _fail(path, "a file name inside the bundle", value)


@dataclass(frozen=True)
class Hex(Spec):
    digits: int

    def check(self, value: Any, path: str) -> None:
        if not (isinstance(value, str) and len(value) == self.digits and all(c in "0123456789abcdef" for c in value)):
            raise _fail(path, f"{self.digits} lower-case hex digits", value)


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _fail(path, "true or false", value)


@dataclass(frozen=True)
class Anything(Spec):
    def check(self, value: Any, path: str) -> None:
        return


@dataclass(frozen=True)
class Optional(Spec):
    """null or `spec`."""

    spec: Spec

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self.spec.check(value, path)


@dataclass(frozen=True)
class Dim(Spec):
    """One dimension of a tensor's shape: a size >= 0, or a symbolic name (string or null)."""

    def check(self, value: Any, path: str) -> None:
        if value is None or isinstance(value, str):
            return
        Int(0).check(value, path)


@dataclass(frozen=True)
class List(Spec):
    of: Spec
    length: int | None = None
    min_length: int = 0

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _fail(path, "a list", value)
        if self.length is not None and len(value) != self.length:
            raise _fail(path, f"a list of {self.length}", value, f"{len(value)} items")
        if len(value) < self.min_length:
            raise _fail(path, f"a list of at least {self.min_length}", value, f"{len(value)} items")
        for i, item in enumerate(value):
            self.of.check(item, f"{path}[{i}]")


@dataclass(frozen=True)
class Map(Spec):
    """An object with any keys (keys are always strings in JSON), every value `of`."""

    of: Spec

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, "an object", value)
        for key, item in value.items():
            self.of.check(item, _join(path, key))


@dataclass(frozen=True)
class Obj(Spec):
    """An object with these keys (`required` must be there); keys not listed are left alone."""

    required: Mapping[str, Spec]
    optional: Mapping[str, Spec] = field(default_factory=dict)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, "an object", value)
        for key, spec in self.required.items():
            if key not in value:
                raise BundleError(f"{MANIFEST_FILE}: {path or 'the manifest'} lacks {key!r}; re-export the bundle")
            spec.check(value[key], _join(path, key))
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], _join(path, key))


TENSOR = Obj({"name": Str(), "dtype": Str(), "shape": List(Dim())})
GRAPH = Obj(
    {"file": FileName(), "engine": Str(), "precision": Str(), "inputs": List(TENSOR, min_length=1),
     "outputs": List(TENSOR, min_length=1)},
    {"sizes": Map(Int(0)), "external_data": Optional(FileName()), "opset": Optional(Int(1)),
     "ir_version": Optional(Int(1)), "opt_level_limit": Optional(Str()), "builder": Str(), "kv_shared_buffer": Bool(),
     "fusions": Map(Int(0)), "matmul_schemes": Map(Int(0)), "extra": Map(Anything()), "target": Str(),
     "kv_update": Optional(Str()), "trt_ops": Optional(Str()), "ort_qdq_matmulnbits_accuracy_level": Optional(Int(0))},
)
KV = Obj({"layers": Int(1), "kv_heads": Int(1), "head_dim": Int(1), "dtype": Str(), "max_length": Int(1)},
         {"layout": Str(), "scales": Optional(Str())})
TEXT = Obj({"hidden_size": Int(1), "vocab_size": Int(1), "bos_id": Int(0), "eos_id": Int(0),
            "max_position_embeddings": Int(1)})
EMBEDDING = Obj({"file": FileName(), "dtype": Str(), "shape": List(Int(1), length=2)})
IMAGE = Obj({}, {"tile_size": Int(1), "patch_size": Int(1),
                 "grid_pinpoints": List(List(Int(1), length=2), min_length=1), "image_mean": List(Num(), length=3),
                 "image_std": List(Num(positive=True), length=3), "merge": Str()})
PROMPT = Obj({"name": Str(), "system": Str(), "roles": List(Str(), length=2), "sep": Str()}, {"image_marker": Str()})
SOURCE = Obj({}, {"checkpoint": Str(), "layout": Str(), "sha256": Str(), "vision_tower": Optional(Str())})
CALIBRATION = Obj({"recipe": Map(Anything()), "file": FileName()},
                  {"scales_source": Str(), "method": Str(), "samples": Map(Anything()), "decoder_schemes": Map(Int(0)),
                   "smoothed_or_scaled_sites": List(Str()), "awq_block_size": Optional(Int(1)),
                   "requires_compute_capability": Optional(Str()), "fidelity": Optional(Map(Anything()))})
FILE_RECORD = Obj({"size": Int(0), "sha256": Hex(64), "sampled_sha256": Hex(64)})
MANIFEST = Obj(
    {"precision": Str(), "graphs": Map(GRAPH), "kv": KV, "text": TEXT, "embedding": EMBEDDING, "image": IMAGE,
     "prompt": PROMPT, "tokenizer": FileName()},
    {"source": SOURCE, "created_by": Str(), "validation": Map(Anything()), "calibration": Optional(CALIBRATION),
     "image_newline": Optional(FileName()), "files": Map(FILE_RECORD)},
)


def check_manifest_json(d: Any) -> None:
    """The manifest as parsed from JSON: a pulse-edge manifest of a readable version, every field well-typed."""
    if not isinstance(d, dict):
        raise BundleError(f"{MANIFEST_FILE} holds {_json_type(d)}, not a manifest object: the bundle is damaged; "
                          "re-export or re-copy it")
    if d.get("format") != FORMAT:
        raise BundleError(f"manifest: format is {d.get('format')!r}, not {FORMAT!r}: not a pulse-edge bundle")
    version = d.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BundleError(f"bundle manifest version {version!r} is not supported by this pulse-edge (reads "
                          f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-export the bundle with this version")
    if version >= 2 and "files" not in d:  # version 2 brought the checksums
        raise BundleError(f"{MANIFEST_FILE}: a version {version} manifest lacks 'files' (the checksums); re-export "
                          "the bundle")
    MANIFEST.check(d, "")
