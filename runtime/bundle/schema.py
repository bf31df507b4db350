"""The JSON shape of `manifest.json`: a JSON Schema, checked with jsonschema before any field is read.

`Manifest.from_dict` converts fields (`int(...)`, `tuple(...)`), which turns a damaged manifest into a
traceback or, worse, a wrong value (`int("5")`, a list where an object belongs). MANIFEST_SCHEMA says what
each field must be (type, range, length, a plain file name); a manifest that breaks it is refused with one
line naming the field: `manifest.json: kv.max_length must be an integer >= 1, got -5; re-export the bundle`.
Every fragment carries that phrase under EXPECTED (jsonschema ignores keywords it does not know), keyed by
the keyword that failed where one fragment has several. Cross-checks between fields and with the files are
in `checks.py` and `integrity.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.names import FORMAT, MANIFEST_FILE, MANIFEST_VERSION, SEAL_KEY
from pulse_edge.runtime.bundle.seal import check_seal

# Version 1 manifests have no checksums, version 2 ones no checksum of the manifest itself (seal.py); both still
# load, with a warning (`integrity.check_bundle`).
READABLE_VERSIONS = (1, 2, MANIFEST_VERSION)
EXPECTED = "x-pulse-edge-expected"  # the phrase "<field> must be ..." of a fragment, or one per keyword
FINITE = "finite"  # a format: Python's json reads NaN and Infinity, which are no manifest's values

Schema = dict[str, Any]


def _int(minimum: int | None = None) -> Schema:
    bound = {} if minimum is None else {"minimum": minimum}
    return {"type": "integer", **bound, EXPECTED: "an integer" + ("" if minimum is None else f" >= {minimum}")}


def _num(positive: bool = False) -> Schema:
    bound = {"exclusiveMinimum": 0} if positive else {}
    return {"type": "number", "format": FINITE, **bound, EXPECTED: "a finite number" + (" > 0" if positive else "")}


def _optional(schema: Schema) -> Schema:
    """null or `schema` (a fragment with one "type"; its other keywords pass null by)."""
    return {**schema, "type": [schema["type"], "null"]}


def _list(of: Schema, length: int | None = None, min_length: int = 0) -> Schema:
    if length is not None:
        sized = f"a list of {length}"
        return {"type": "array", "items": of, "minItems": length, "maxItems": length,
                EXPECTED: {"type": "a list", "minItems": sized, "maxItems": sized}}
    return {"type": "array", "items": of, "minItems": min_length,
            EXPECTED: {"type": "a list", "minItems": f"a list of at least {min_length}"}}


def _map(of: Schema) -> Schema:
    """An object with any keys (keys are always strings in JSON), every value `of`."""
    return {"type": "object", "additionalProperties": of, EXPECTED: "an object"}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these keys (`required` must be there); keys not listed are left alone."""
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            EXPECTED: "an object"}


STR: Schema = {"type": "string", EXPECTED: "a string"}
BOOL: Schema = {"type": "boolean", EXPECTED: "true or false"}
ANYTHING: Schema = {}
# A file inside the bundle: a plain name, never a path that could point outside it.
FILE_NAME: Schema = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\]+$", EXPECTED: "a file name inside the bundle"}
# maxLength: Python's `$` also matches before a trailing newline
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$", "maxLength": 64, EXPECTED: "64 lower-case hex digits"}
DIM: Schema = {"type": ["integer", "string", "null"], "minimum": 0, EXPECTED: "an integer >= 0"}  # size or name

TENSOR = _obj({"name": STR, "dtype": STR, "shape": _list(DIM)})
GRAPH = _obj(
    {"file": FILE_NAME, "engine": STR, "precision": STR, "inputs": _list(TENSOR, min_length=1),
     "outputs": _list(TENSOR, min_length=1)},
    {"sizes": _map(_int(0)), "external_data": _optional(FILE_NAME), "opset": _optional(_int(1)),
     "ir_version": _optional(_int(1)), "opt_level_limit": _optional(STR), "builder": STR, "kv_shared_buffer": BOOL,
     "fusions": _map(_int(0)), "matmul_schemes": _map(_int(0)), "extra": _map(ANYTHING), "target": STR,
     "kv_update": _optional(STR), "trt_ops": _optional(STR), "ort_qdq_matmulnbits_accuracy_level": _optional(_int(0))},
)
SEGMENT = _obj({"file": FILE_NAME, "inputs": _list(STR), "outputs": _list(STR, min_length=1)})
GRAPH["properties"].update({"segments": _list(SEGMENT), "segment_scales": _optional(FILE_NAME),
                            "native_index": _optional(FILE_NAME)})
KV = _obj({"layers": _int(1), "kv_heads": _int(1), "head_dim": _int(1), "dtype": STR, "max_length": _int(1)},
          {"layout": STR, "scales": _optional(STR)})
TEXT = _obj({"hidden_size": _int(1), "vocab_size": _int(1), "bos_id": _int(0), "eos_id": _int(0),
             "max_position_embeddings": _int(1)})
EMBEDDING = _obj({"file": FILE_NAME, "dtype": STR, "shape": _list(_int(1), length=2)})
IMAGE = _obj({}, {"tile_size": _int(1), "patch_size": _int(1),
                  "grid_pinpoints": _list(_list(_int(1), length=2), min_length=1),
                  "image_mean": _list(_num(), length=3), "image_std": _list(_num(positive=True), length=3),
                  "merge": STR, "unpad": STR})
PROMPT = _obj({"name": STR, "system": STR, "roles": _list(STR, length=2), "sep": STR},
              {"image_marker": STR, "dummy_prefix_after_eos": BOOL})
SOURCE = _obj({}, {"checkpoint": STR, "layout": STR, "sha256": STR, "vision_tower": _optional(STR)})
CALIBRATION = _obj({"recipe": _map(ANYTHING), "file": FILE_NAME},
                   {"scales_source": STR, "method": STR, "samples": _map(ANYTHING), "decoder_schemes": _map(_int(0)),
                    "smoothed_or_scaled_sites": _list(STR), "awq_block_size": _optional(_int(1)),
                    "requires_compute_capability": _optional(STR), "fidelity": _optional(_map(ANYTHING)),
                    "fp8_method": _optional(STR)})
FILE_RECORD = _obj({"size": _int(0), "sha256": SHA256, "sampled_sha256": SHA256})
MANIFEST_SCHEMA: Schema = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_obj({"precision": STR, "graphs": _map(GRAPH), "kv": KV, "text": TEXT, "embedding": EMBEDDING, "image": IMAGE,
            "prompt": PROMPT, "tokenizer": FILE_NAME},
           {"source": SOURCE, "created_by": STR, "validation": _map(ANYTHING), "calibration": _optional(CALIBRATION),
            "image_newline": _optional(FILE_NAME), "files": _map(FILE_RECORD), SEAL_KEY: SHA256}),
}


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _strict_integer(_checker: Any, value: Any) -> bool:
    """JSON Schema counts 5.0 as an integer; a count or size this runtime reads must be written as one."""
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache  # MANIFEST_SCHEMA is fixed: one validator serves every manifest read
def _validator() -> Any:
    formats = FormatChecker(formats=())
    formats.checks(FINITE)(_finite)
    types = Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer)
    strict = validators.extend(Draft202012Validator, type_checker=types)
    return strict(MANIFEST_SCHEMA, format_checker=formats)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"


def _path(parts: Iterable[str | int]) -> str:
    """kv.max_length, graphs.vision.inputs[0].shape: as a user finds the field in the file."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(error: ValidationError) -> str:
    path = _path(error.absolute_path)
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        return f"{MANIFEST_FILE}: {path or 'the manifest'} lacks {missing!r}; re-export the bundle"
    expected = error.schema.get(EXPECTED, "what this pulse-edge writes")
    expected = expected.get(error.validator, expected["type"]) if isinstance(expected, dict) else expected
    value = error.instance
    if error.validator in ("minItems", "maxItems"):
        got = f"{len(value)} items"
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(repr(value)) <= 40:
        got = repr(value)
    else:
        got = _json_type(value)
    return f"{MANIFEST_FILE}: {path} must be {expected}, got {got}; re-export the bundle"


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
    error = best_match(_validator().iter_errors(d))
    if error is not None:
        raise BundleError(_one_line(error))
    check_seal(d)  # after the schema: a field it refuses is named, an edit it allows is caught here
