"""`pulse-edge calibrate`: ECG samples through the torch reference, statistics and searched scales out.

    samples (ECGInstruct / ECGBench / synthetic) ─ select N (seeded, stratified) ─ runtime preprocessing + prompt
      ─ observe (hooks: histograms, channel stats, row samples) ─ per site:
          activation clips for every method (int8 and E4M3 grids)
          SmoothQuant alpha and scales (decoder qkv / gate_up, for W8A8)
          AWQ alpha and scales (decoder layer sites, for int4)
        + the keys' and values' ranges per kv head and channel (an int8 KV cache's scales, kv.py)
      ─ scales.npz

The searches run on the rows the observers sampled and on a seeded subset of the
weight's output columns (`search_columns`): the output error over a random column
subset estimates the full one without bias, at a fraction of the cost on a 7B.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from pulse_edge import __version__
from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample
from pulse_edge.calibration.histogram import METHODS
from pulse_edge.calibration.kv import KVObserver, observing_kv
from pulse_edge.calibration.observe import SiteObserver, make_observers, observe, packed_weight
from pulse_edge.calibration.quant_math import SearchResult, search_awq_scales, search_smooth_alpha
from pulse_edge.calibration.samples import (
    SYNTHETIC,
    PreparedSample,
    load_samples,
    prepare_sample,
    select_samples,
)
from pulse_edge.calibration.scales import Scales, SiteScales, check_values
from pulse_edge.errors import ConfigError
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.runtime.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SMOOTH_SITES = ("qkv", "gate_up")  # the RMSNorm outputs, where SmoothQuant migrates outliers (its paper's choice)
AWQ_SITES = ("qkv", "o", "gate_up", "down")  # lm_head stays plain RTN, as in AWQ's reference code
AWQ_BITS = 4
FP8_METHODS = ("minmax", "percentile", "mse")  # entropy models an integer grid; fp8 sites calibrated "entropy" use mse


def fp8_method(method: str) -> str:
    """The clip method an fp8 (E4M3) site uses for scales calibrated with `method`."""
    return method if method in FP8_METHODS else "mse"
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))
METHOD_HELP = MappingProxyType({
    "minmax": "the largest |x| seen (no clipping)",
    "percentile": "the 99.99th percentile of |x|",
    "entropy": "the clip that minimises the KL divergence of the quantized histogram (TensorRT's method)",
    "mse": "the clip that minimises the expected squared quantization error",
})


@dataclass(frozen=True)
class CalibrationOptions:
    data: str = "synthetic"
    samples: int = 64
    method: str = "minmax"
    seed: int = 0
    image_root: Path | None = None
    block_size: int = 128  # the int4 block size the AWQ search assumes
    reservoir_rows: int = 256
    search_columns: int = 2048
    progress: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")


def choose_samples(options: CalibrationOptions, *, exclude: Sequence[str] = ()) -> list[CalibrationSample]:
    """N samples of the data, seeded and stratified; `exclude` holds ids already used elsewhere."""
    data = options.data
    if data == SYNTHETIC:  # a pool where every task is common enough to stratify, after the excluded ones
        data = f"{SYNTHETIC}:{4 * options.samples + len(exclude)}"
    excluded = set(exclude)
    pool = [s for s in load_samples(data, image_root=options.image_root) if s.id not in excluded]
    if not pool:
        raise ConfigError(f"{options.data} holds no usable calibration samples")
    if len(pool) < options.samples:  # said: the scales then rest on fewer samples than were asked for
        log.warning("%s holds %d usable samples, fewer than the %d asked for: calibrating on those", options.data,
                    len(pool), options.samples)
    return select_samples(pool, min(options.samples, len(pool)), options.seed)


def prepare_all(loaded: LoadedCheckpoint, tokenizer: Tokenizer, samples: Sequence[CalibrationSample],
                max_length: int) -> list[PreparedSample]:
    """Every sample through the runtime's own preprocessing and prompt code."""
    return [prepare_sample(s, loaded.config.image, tokenizer, template=loaded.template, max_length=max_length)
            for s in samples]


def calibrate(loaded: LoadedCheckpoint, tokenizer: Tokenizer, options: CalibrationOptions,
              samples: Sequence[CalibrationSample] | None = None) -> Scales:
    """`samples`: chosen already (the CLI reads the data before it loads the model); default choose_samples."""
    samples = choose_samples(options) if samples is None else samples
    prepared = prepare_all(loaded, tokenizer, samples, loaded.config.text.max_position_embeddings)
    if cut := sum(p.truncated for p in prepared):
        log.warning("%d of %d calibration samples were longer than the context and were cut (later turns dropped "
                    "or the first answer shortened)", cut, len(prepared))
    observers = make_observers(loaded.model, reservoir_rows=options.reservoir_rows, seed=options.seed)
    log.info("calibrating on %d samples (%s)", len(prepared), _counts(samples))
    kv = KVObserver(head_dim=loaded.config.text.head_dim)
    with observing_kv(loaded.model, kv):
        observe(loaded.model, prepared, observers, progress=options.progress)
    sites = {site: _site_scales(loaded, site, obs, options) for site, obs in observers.items()}
    scales = Scales(method=options.method, checkpoint_sha256=loaded.sha256,
                    samples=_samples_meta(samples, prepared, options), awq_block_size=options.block_size,
                    sites=sites, created_by=f"pulse-edge {__version__}", kv=kv.absmax)
    # what Scales.load refuses in a file, refused here before it is written or exported with (a site the samples
    # never moved has amax 0: every activation would be quantized to its extreme code)
    count = f"{len(prepared)} sample{'s' if len(prepared) != 1 else ''}"
    check_values(scales, f"the calibration on {count}", "calibrate on more or other ECG samples")
    return scales


def _site_scales(loaded: LoadedCheckpoint, site: str, obs: SiteObserver, options: CalibrationOptions) -> SiteScales:
    amax = {m: obs.histogram.amax(m) for m in METHODS}
    amax_fp8 = {m: obs.histogram.amax(m, target="fp8") for m in FP8_METHODS}
    absmax, mean_abs = obs.channels.absmax, obs.channels.mean_abs
    part = site.rsplit(".", 1)[-1]
    if obs.reservoir is None:  # only decoder layer sites keep rows: the searched ones
        return SiteScales(amax=amax, amax_fp8=amax_fp8, absmax=absmax, mean_abs=mean_abs)
    rows = obs.reservoir.sample()  # [R, K]
    full = packed_weight(loaded.model, site)  # [K, N]
    weight = _column_sample(full, options.search_columns, options.seed)
    # judged on a column sample, the scales from the whole weight (max|W_j| over a sample is biased low)
    smooth = (search_smooth_alpha(rows, weight, absmax, alphas=ALPHAS, scales_from=full) if part in SMOOTH_SITES
              else None)
    smooth_used = smooth is not None and smooth.error < smooth.baseline_error  # else plain W8A8 (s = 1) won
    s = smooth.scales if smooth_used else None
    awq = search_awq_scales(rows, weight, mean_abs, AWQ_BITS, options.block_size) if part in AWQ_SITES else None
    search = {"smooth_errors": _errors(smooth), "smooth_baseline_error": _baseline(smooth),
              "awq_errors": _errors(awq), "rows": int(rows.shape[0]), "columns": int(weight.shape[1])}
    return SiteScales(amax=amax, amax_fp8=amax_fp8, absmax=absmax, mean_abs=mean_abs, smooth=s,
                      smooth_alpha=smooth.alpha if s is not None else None,
                      smooth_amax=_smoothed_amax(absmax, s) if s is not None else {},
                      awq=None if awq is None else awq.scales, awq_alpha=None if awq is None else awq.alpha,
                      search=search)


def _smoothed_amax(absmax: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """The clip of x / s: its exact maximum, from the channel maxima, under every method. The histograms saw x, not
    x / s, and the sampled rows (256 of tens of thousands) miss the rare tokens whose x / s is largest: a
    percentile, entropy or MSE clip of them cut the attention-sink token of every prompt (a measured 33.8 clipped to
    4.44). SmoothQuant calibrates the smoothed input by its maximum too; a clip of the whole distribution of x / s
    would cost a second pass over the samples."""
    exact = float(np.max(absmax / s))
    return dict.fromkeys(METHODS, exact)


def _column_sample(weight: np.ndarray, columns: int, seed: int) -> np.ndarray:
    if weight.shape[1] <= columns:
        return weight
    picked = np.sort(np.random.default_rng(seed).choice(weight.shape[1], columns, replace=False))
    return weight[:, picked]


def _baseline(result: SearchResult | None) -> float | None:
    return None if result is None else float(result.baseline_error)


def _errors(result: object | None) -> dict[str, float]:
    return {} if result is None else {str(k): float(v) for k, v in result.errors.items()}


def _counts(samples: Sequence[CalibrationSample]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(Counter(f"{s.source}/{s.task}" for s in samples).items()))


def _samples_meta(samples: Sequence[CalibrationSample], prepared: Sequence[PreparedSample],
                  options: CalibrationOptions) -> dict[str, object]:
    root = None if options.image_root is None else str(options.image_root)
    return {"data": options.data, "image_root": root, "count": len(samples), "seed": options.seed,
            "ids": [s.id for s in samples],
            "by_source": dict(Counter(s.source for s in samples)), "by_task": dict(Counter(s.task for s in samples)),
            "tokens": int(sum(len(p.input_ids) - 1 + p.image_tokens for p in prepared)),
            "image_tokens": int(sum(p.image_tokens for p in prepared))}


def summary_rows(scales: Scales) -> list[Mapping[str, object]]:
    """One row per site for the CLI's table."""
    rows = []
    for site, s in scales.sites.items():
        ratio = float(np.max(s.absmax) / max(float(np.median(s.absmax)), 1e-12))
        rows.append({"site": site, "amax": f"{s.amax[scales.method]:.4g}", "max/median channel": f"{ratio:.1f}",
                     "smooth alpha": "-" if s.smooth_alpha is None else f"{s.smooth_alpha:.2f}",
                     "awq alpha": "-" if s.awq_alpha is None else f"{s.awq_alpha:.2f}"})
    return rows
