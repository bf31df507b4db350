"""The scales file `pulse-edge calibrate` writes and `export --scales` reads: one versioned .npz.

    __meta__          JSON: format, version, checkpoint sha256, method, samples, AWQ block size, per-site scalars
    {site}/absmax     [K] per-input-channel max |x|
    {site}/mean_abs   [K] per-input-channel mean |x|
    {site}/smooth     [K] SmoothQuant scales at the chosen alpha   (decoder qkv / gate_up)
    {site}/awq        [K] AWQ scales at the chosen alpha            (decoder layer sites)
    kv/layers.{i}.key    [kv_heads, D] largest rotary-pair length of the keys   (int8 KV cache; see kv.py)
    kv/layers.{i}.value  [kv_heads, D] largest |value| per channel              (absent in older files)

Per site the metadata holds the activation clip `amax` for every method (int8
grid) and `amax_fp8` (E4M3 grid; only mse differs; entropy, which models an
integer grid, has no E4M3 value and falls back to mse), and for smoothed sites the
clip of the smoothed activation x / s. Numpy only: the file can be read where
torch is absent. Written to a temporary name and renamed: never half-written.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import ConfigError, InputError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.staging import staged_file

FORMAT = "pulse-edge-scales"
VERSION = 1
META_KEY = "__meta__"
ARRAYS = ("absmax", "mean_abs", "smooth", "awq")
KV_PREFIX = "kv/"


class ScalesError(InputError):
    """A scales file that cannot be used (not one, another version, another model)."""


@dataclass(frozen=True)
class SiteScales:
    amax: Mapping[str, float]  # method -> |x| clip on the int8 grid
    amax_fp8: Mapping[str, float]
    absmax: np.ndarray
    mean_abs: np.ndarray
    smooth: np.ndarray | None = None
    smooth_alpha: float | None = None
    smooth_amax: Mapping[str, float] = field(default_factory=dict)  # method -> clip of x / smooth
    awq: np.ndarray | None = None
    awq_alpha: float | None = None
    search: Mapping[str, Any] = field(default_factory=dict)  # relative output errors per alpha tried

    def meta(self) -> dict[str, Any]:
        return {"amax": dict(self.amax), "amax_fp8": dict(self.amax_fp8), "smooth_alpha": self.smooth_alpha,
                "smooth_amax": dict(self.smooth_amax), "awq_alpha": self.awq_alpha, "search": dict(self.search)}


@dataclass(frozen=True)
class Scales:
    method: str
    checkpoint_sha256: str
    samples: Mapping[str, Any]
    awq_block_size: int
    sites: Mapping[str, SiteScales]
    created_by: str = ""
    kv: Mapping[str, np.ndarray] = field(default_factory=dict)  # calibration/kv.py: {layers.{i}.{key|value}: [N, D]}

    def amax(self, site: str, *, fp8: bool = False, method: str | None = None) -> float:
        """The activation clip a Q/DQ site uses: the smoothed one where the site is smoothed."""
        s = self.site(site)
        table = s.smooth_amax if s.smooth is not None else (s.amax_fp8 if fp8 else s.amax)
        return float(table.get(method or self.method, table.get("mse")))

    def site(self, name: str) -> SiteScales:
        if name not in self.sites:
            raise ScalesError(f"the scales file has no statistics for {name!r}: it was calibrated on another "
                              "model shape; re-run pulse-edge calibrate on this checkpoint")
        return self.sites[name]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "method": self.method, "created_by": self.created_by,
                "checkpoint_sha256": self.checkpoint_sha256, "samples": dict(self.samples),
                "awq_block_size": self.awq_block_size, "sites": {k: v.meta() for k, v in self.sites.items()}}
        arrays = {META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for site, s in self.sites.items():
            for key in ARRAYS:
                value = getattr(s, key)
                if value is not None:
                    arrays[f"{site}/{key}"] = np.asarray(value, np.float32)
        arrays.update({f"{KV_PREFIX}{name}": np.asarray(value, np.float32) for name, value in self.kv.items()})
        _atomic_write(path, arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scales:
        path = Path(path)
        arrays = _read_npz(path)
        meta = _meta(arrays, path)
        try:
            scales = cls._from(meta, arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ScalesError(f"{path} is damaged or incomplete ({e!r} is missing or malformed); re-run "
                              "pulse-edge calibrate") from e
        check_values(scales, str(path), "the file is damaged: re-run pulse-edge calibrate")
        return scales

    @classmethod
    def _from(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Scales:
        sites = {name: SiteScales(
            amax=m["amax"], amax_fp8=m["amax_fp8"], absmax=arrays[f"{name}/absmax"],
            mean_abs=arrays[f"{name}/mean_abs"], smooth=arrays.get(f"{name}/smooth"),
            smooth_alpha=m.get("smooth_alpha"), smooth_amax=m.get("smooth_amax", {}), awq=arrays.get(f"{name}/awq"),
            awq_alpha=m.get("awq_alpha"), search=m.get("search", {})) for name, m in meta["sites"].items()}
        kv = {key.removeprefix(KV_PREFIX): value for key, value in arrays.items() if key.startswith(KV_PREFIX)}
        return cls(method=meta["method"], checkpoint_sha256=meta["checkpoint_sha256"], samples=meta["samples"],
                   awq_block_size=int(meta["awq_block_size"]), sites=sites, created_by=meta.get("created_by", ""),
                   kv=kv)

    def check_model(self, sha256: str, path: Path) -> None:
        if sha256 != self.checkpoint_sha256:
            raise ScalesError(f"{path} was calibrated on another checkpoint (sha256 {self.checkpoint_sha256[:12]}..., "
                              f"this one is {sha256[:12]}...); re-run pulse-edge calibrate on this checkpoint")


def check_values(scales: Scales, where: str, fix: str) -> None:
    """Every range a graph is quantized with: finite, and a scale above 0. A zero or negative amax would be
    floored to 1e-12 by the graph and the emulated reference alike, so parity would pass a bundle that quantizes
    every activation to its extreme code; a NaN one fails the export late, as "graphs disagree". Checked on a
    file read (`where` its path; damaged) and on a calibration just run (a site its samples never moved)."""
    checks: list[tuple[str, Any, bool]] = []  # (what, value, must be > 0); absmax 0 is a channel never active
    for name, site in scales.sites.items():
        tables = [("amax", site.amax), ("amax_fp8", site.amax_fp8)]  # one range per calibration method
        tables += [("smooth_amax", site.smooth_amax)] if site.smooth is not None else []  # what a smoothed site uses
        for key, ranges in tables:
            checks += [(f"{name} {key}[{method!r}]", value, True)
                       for method, value in _by_method(ranges, f"{where}: {name} {key}").items()]
        checks += [(f"{name} absmax", site.absmax, False), (f"{name} mean_abs", site.mean_abs, False)]
        checks += [(f"{name} {key}", value, True) for key, value in (("smooth", site.smooth), ("awq", site.awq))
                   if value is not None]
    checks += [(f"kv {name}", value, False) for name, value in scales.kv.items()]
    for what, value, positive in checks:
        try:
            values = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            values = np.array([np.nan])
        bad = ~np.isfinite(values) | ((values <= 0) if positive else (values < 0))
        if bad.any():
            need = "finite number above 0" if positive else "finite number >= 0"
            shown = value if not isinstance(value, np.ndarray) else values[bad][0].item()
            raise ScalesError(f"{where}: {what} holds {shown!r}, not a {need}; {fix}")


def _by_method(ranges: Any, where: str) -> dict[str, Any]:
    if not isinstance(ranges, Mapping) or "mse" not in ranges:  # Scales.amax falls back to mse
        raise ScalesError(f"{where} is {ranges!r}, not a map from calibration method to amax (mse among them); the "
                          "file is damaged: re-run pulse-edge calibrate")
    return dict(ranges)


def _atomic_write(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; -o takes the scales file's name (e.g. scales.npz)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as work, open(work, "wb") as f:  # the user's umask, not mkstemp's 0600: a service
        np.savez(f, **arrays)  # user exporting with scales another user calibrated must read them


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise ScalesError(f"{path} is a directory; --scales takes the .npz file pulse-edge calibrate wrote")
    if not path.is_file():
        raise ScalesError(f"{path} does not exist; make it with pulse-edge calibrate MODEL --data ... -o {path}")
    data = path.read_bytes()
    if not data.startswith(b"PK"):  # numpy's own message for other files invites loading a pickle
        raise ScalesError(f"{path} is not an .npz archive, so not a pulse-edge scales file; make it with pulse-edge "
                          "calibrate")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ScalesError(f"{path} is not a pulse-edge scales file ({e}); make it with pulse-edge calibrate") from e


def _meta(arrays: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    if META_KEY not in arrays:
        raise ScalesError(f"{path} is an .npz but not a pulse-edge scales file (no {META_KEY})")
    try:
        meta = json.loads(arrays[META_KEY].tobytes().decode())
    except JSON_TEXT_ERRORS as e:  # UnicodeDecodeError too: a ValueError
        raise ScalesError(f"{path}: its metadata is unreadable ({json_error_reason(e)}); re-run pulse-edge "
                          "calibrate") from e
    if not isinstance(meta, dict):
        raise ScalesError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object; re-run pulse-edge "
                          "calibrate")
    if meta.get("format") != FORMAT:
        raise ScalesError(f"{path} is not a pulse-edge scales file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ScalesError(f"{path} is scales format version {meta.get('version')!r}; this pulse-edge reads version "
                          f"{VERSION}: re-run pulse-edge calibrate")
    return meta
