"""`engines.json`: the TensorRT engines `pulse-edge build-engines` made from a bundle, and how they were made.

An engine directory sits beside (by default inside) its bundle: `vision.engine`, `decoder.engine` and this
manifest. The runtime's `trt` backend reads the engines' IO tensors and optimisation profiles from here, and
refuses engines built from another bundle (the sha256 of the bundle's manifest.json is recorded), built with
the other TensorRT module, truncated or damaged: version 2 records each engine's sha256 and sampled sha256,
checked as a bundle's files are (runtime/bundle/integrity.py: the sample at every load, every byte at a copy's
first), and seals the file itself (`engines_sha256`, the canonical digest runtime/bundle/seal.py gives the
manifest), so an edit to a profile or an alias is refused. A plan carries no checksum of its weights: a flipped
bit in one ran. The build figures (seconds, peak memory) are reports for people.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pulse_edge.choices import ENGINE_TARGETS, GRAPH_PRECISIONS
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.runtime.bundle.integrity import HashProgress, Recorded, check_files
from pulse_edge.runtime.bundle.manifest import BundleError, FileRecord, TensorSpec
from pulse_edge.runtime.bundle.names import DECODER, MANIFEST_FILE, VISION
from pulse_edge.runtime.bundle.seal import canonical_digest

ENGINES_FORMAT = "pulse-edge-engines"
ENGINES_VERSION = 2
READ_VERSIONS = (1, ENGINES_VERSION)  # 1: no checksums, no seal; read with a warning, by size only
ENGINES_SEAL = "engines_sha256"
ENGINES_FILE = "engines.json"
BUILT = Recorded("build-engines", ENGINES_FILE, "rebuild or re-copy the engines")
log = logging.getLogger(__name__)
ENGINE_SUFFIX = ".engine"
TENSORRT_MODULES = ("tensorrt_rtx", "tensorrt")
ENGINE_ROLES = (VISION, DECODER)  # the graphs an engine set must hold: the TensorRT backend runs both

Shape = tuple[int, ...]


def _need(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise BundleError(f"{ENGINES_FILE}: {what} lacks {key!r}; rebuild the engines")
    return d[key]


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise BundleError(f"{ENGINES_FILE}: {what} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


@dataclass(frozen=True)
class ProfileSpec:
    """One optimisation profile: (min, opt, max) shape per dynamic input, and what it is for."""

    name: str  # "tiles" | "decode" | "prefill"
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileSpec:
        shapes = {str(k): tuple(tuple(int(x) for x in s) for s in v)
                  for k, v in _need(d, "shapes", "a profile").items()}
        if any(len(v) != 3 for v in shapes.values()):
            raise BundleError(f"{ENGINES_FILE}: a profile shape is not (min, opt, max); rebuild the engines")
        return cls(name=str(_need(d, "name", "a profile")), shapes=shapes)

    def limits(self, name: str, axis: int) -> tuple[int, int]:
        """The (min, max) one input's axis may take in this profile."""
        low, _, high = self.shapes[name]
        return low[axis], high[axis]

    def admits(self, shapes: Mapping[str, Shape]) -> bool:
        """Every given input shape lies within this profile's range."""
        for name, shape in shapes.items():
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True


@dataclass(frozen=True)
class EngineSpec:
    """One serialized engine: the graph it came from, its IO as the builder's network declares it, its
    profiles, and the build's own figures."""

    file: str
    graph: str  # the bundle's ONNX file it was built from
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    size: int
    build_seconds: float = 0.0
    peak_rss_bytes: int = 0
    layers: Mapping[str, int] = field(default_factory=dict)  # the network's layer types and counts
    kv_aliases: Mapping[str, str] = field(default_factory=dict)  # present output -> the past input it writes into
    sha256: str = ""  # of the plan file; "" in a version-1 set
    sampled_sha256: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineSpec:
        return cls(file=str(_need(d, "file", "an engine")), graph=str(_need(d, "graph", "an engine")),
                   precision=_choice(d.get("precision"), GRAPH_PRECISIONS, "engine precision"),
                   inputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "inputs", "an engine")),
                   outputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "outputs", "an engine")),
                   profiles=tuple(ProfileSpec.from_dict(p) for p in _need(d, "profiles", "an engine")),
                   size=int(_need(d, "size", "an engine")), build_seconds=float(d.get("build_seconds", 0.0)),
                   peak_rss_bytes=int(d.get("peak_rss_bytes", 0)),
                   layers={str(k): int(v) for k, v in d.get("layers", {}).items()},
                   kv_aliases={str(k): str(v) for k, v in d.get("kv_aliases", {}).items()},
                   sha256=str(d.get("sha256", "")), sampled_sha256=str(d.get("sampled_sha256", "")))

    def record(self) -> FileRecord:
        return FileRecord(size=self.size, sha256=self.sha256, sampled_sha256=self.sampled_sha256)

    def tensor(self, name: str) -> TensorSpec:
        found = [t for t in (*self.inputs, *self.outputs) if t.name == name]
        if not found:
            raise BundleError(f"{ENGINES_FILE}: engine {self.file} has no tensor {name!r}; rebuild the engines")
        return found[0]

    def profile(self, name: str) -> tuple[int, ProfileSpec]:
        for index, profile in enumerate(self.profiles):
            if profile.name == name:
                return index, profile
        raise BundleError(f"{ENGINES_FILE}: engine {self.file} has no {name!r} profile; rebuild the engines")


@dataclass(frozen=True)
class EngineSet:
    """What build-engines wrote: the target and TensorRT that built it, and one EngineSpec per graph."""

    target: str  # "rtx" | "jetson"
    tensorrt: str  # the Python module that built (and alone can run) the engines
    tensorrt_version: str
    compute_capabilities: tuple[str, ...]  # rtx: the list compiled for; () = the GPU of the build machine
    max_context: int
    max_tiles: int
    bundle_manifest_sha256: str
    engines: Mapping[str, EngineSpec]
    created_by: str = ""
    workspace_bytes: int | None = None
    timing_cache: str | None = None  # standard TensorRT: the cache file used and updated

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineSet:
        if d.get("format") != ENGINES_FORMAT:
            raise BundleError(f"{ENGINES_FILE}: format is {d.get('format')!r}, not {ENGINES_FORMAT!r}")
        if d.get("version") not in READ_VERSIONS:
            raise BundleError(f"{ENGINES_FILE} version {d.get('version')!r} is not read by this pulse-edge (reads "
                              f"{', '.join(map(str, READ_VERSIONS))}); rebuild the engines")
        return cls(target=_choice(d.get("target"), ENGINE_TARGETS, "target"),
                   tensorrt=_choice(d.get("tensorrt"), TENSORRT_MODULES, "tensorrt module"),
                   tensorrt_version=str(_need(d, "tensorrt_version", "the engine set")),
                   compute_capabilities=tuple(str(c) for c in d.get("compute_capabilities", ())),
                   max_context=int(_need(d, "max_context", "the engine set")),
                   max_tiles=int(_need(d, "max_tiles", "the engine set")),
                   bundle_manifest_sha256=str(_need(d, "bundle_manifest_sha256", "the engine set")),
                   engines={str(k): EngineSpec.from_dict(v) for k, v in _need(d, "engines", "the set").items()},
                   created_by=str(d.get("created_by", "")), workspace_bytes=d.get("workspace_bytes"),
                   timing_cache=d.get("timing_cache"))

    def to_dict(self) -> dict[str, Any]:
        return {"format": ENGINES_FORMAT, "version": ENGINES_VERSION, **asdict(self)}

    def write(self, directory: Path) -> None:
        """engines.json, sealed; every engine's checksums must be in its spec (build-engines records them)."""
        d = self.to_dict()
        (directory / ENGINES_FILE).write_text(json.dumps({**d, ENGINES_SEAL: canonical_digest(d, ENGINES_SEAL)},
                                                         indent=2))


def manifest_sha256(bundle: Path) -> str:
    """The identity engines are tied to: the bundle's manifest.json as written."""
    return hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()


def read_engines(directory: Path, bundle: Path, *, verify: bool = False,
                 progress: HashProgress | None = None) -> EngineSet:
    """Load an engine directory's manifest and check it belongs to `bundle` and its files are whole (every byte
    with `verify`, or at their first load on this machine)."""
    path = directory / ENGINES_FILE
    if not path.is_file():
        raise BundleError(f"{directory} holds no {ENGINES_FILE}: build engines with `pulse-edge build-engines "
                          f"{bundle}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} cannot be read ({e}); rebuild the engines") from e
    except JSON_TEXT_ERRORS as e:  # syntax, nested too deeply, a 5000-digit number
        raise BundleError(f"{path} cannot be read ({json_error_reason(e)}); rebuild the engines") from e
    try:
        if not isinstance(data, Mapping) or not isinstance(data.get("engines"), Mapping):
            raise TypeError("it is not an engine set: an object whose engines map graph names to engines")
        engines = EngineSet.from_dict(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{path} cannot be read ({e}); rebuild the engines") from e
    sealed = data["version"] >= ENGINES_VERSION
    if sealed and data.get(ENGINES_SEAL) != canonical_digest(data, ENGINES_SEAL):
        raise BundleError(f"{path} was changed after build-engines wrote it: its contents no longer match its "
                          f"{ENGINES_SEAL} (a hand-edit or a damaged copy); rebuild or re-copy the engines")
    missing = [role for role in ENGINE_ROLES if role not in engines.engines]
    if missing:
        raise BundleError(f"{path} has no {missing[0]} engine; rebuild the engines")
    if engines.bundle_manifest_sha256 != manifest_sha256(bundle):
        raise BundleError(f"the engines in {directory} were built from another bundle (or before {bundle} was "
                          f"re-exported, or its manifest.json rewritten): delete {directory} and rebuild them with "
                          f"`pulse-edge build-engines {bundle}`")
    for spec in engines.engines.values():
        if Path(spec.file).name != spec.file or spec.file in ("", ".", ".."):
            raise BundleError(f"{path}: engine file {spec.file!r} is not a file name inside {directory}; rebuild the "
                              "engines")
        file = directory / spec.file
        if not file.is_file() or file.stat().st_size != spec.size:
            raise BundleError(f"{file} is missing or not {spec.size} bytes as {ENGINES_FILE} says: the copy is "
                              "incomplete; rebuild or re-copy the engines")
    if sealed:
        check_files(directory, {s.file: s.record() for s in engines.engines.values()}, BUILT, verify=verify,
                    progress=progress)
    elif verify:  # "verified" must mean hashed: a version-1 set has nothing to hash against
        raise BundleError(f"{path} is version 1 and records no checksums of its engines to verify; rebuild them "
                          f"with `pulse-edge build-engines {bundle}`")
    else:
        log.warning("%s is version 1: its engines are checked by size only and the file itself is not sealed; "
                    "rebuild them to have them checked", path)
    return engines


def find_engine_dir(bundle: Path) -> Path:
    """The one engine directory inside a bundle (build-engines' default output, `engines-<target>`)."""
    found = sorted(p.parent for p in bundle.glob(f"engines-*/{ENGINES_FILE}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BundleError(f"{bundle} has no TensorRT engines: build them with `pulse-edge build-engines {bundle}` "
                          "(or name a directory with --engines)")
    raise BundleError(f"{bundle} holds several engine directories ({', '.join(p.name for p in found)}); choose one "
                      "with --engines DIR")
