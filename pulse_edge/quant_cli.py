"""`pulse-edge calibrate` and the quantization options of `pulse-edge export`.

Heavy imports (torch, transformers) stay inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pulse_edge.calibration.recipes import BLOCK_SIZES, INT4_METHODS, INT8_DECODER_MODES

METHODS = ("minmax", "percentile", "entropy", "mse")  # calibration.histogram.METHODS; checked equal in the tests


def _alpha(value: str) -> tuple[bool, float | None]:
    """--smooth-alpha: (smooth?, alpha); 'auto' searches alpha per site, 'off' is plain W8A8."""
    if value in ("auto", "off"):
        return value == "auto", None
    try:
        return True, float(value)
    except ValueError as e:
        from pulse_edge.errors import ConfigError

        raise ConfigError(f"--smooth-alpha must be 'auto', 'off' or a number in [0, 1], got {value!r}") from e


def quant_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The export options that only int8 / int4 / fp8 use."""
    options = [
        click.option("--scales", type=click.Path(path_type=Path), default=None,
                     help="A scales file from `pulse-edge calibrate` (default: calibrate on synthetic ECGs now)."),
        click.option("--calibration-samples", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Synthetic samples to calibrate on when no --scales is given."),
        click.option("--int8-decoder", type=click.Choice(tuple(INT8_DECODER_MODES)), default="weight-only",
                     show_default=True, help="int8: weight-only decoder, or W8A8 with SmoothQuant."),
        click.option("--smooth-alpha", default="auto", show_default=True,
                     help="SmoothQuant migration strength; auto = chosen per layer on the samples; off = plain W8A8."),
        click.option("--int4-method", type=click.Choice(INT4_METHODS), default="awq", show_default=True,
                     help="awq: activation-aware scaling from the scales file; rtn: plain rounding."),
        click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="128",
                     show_default=True, help="Block size of the block-wise int4/int8 weights."),
        click.option("--keep", default="", help="Sites kept at fp32, comma-separated prefixes "
                                                "(e.g. lm_head,layers.0,projector; vision = the whole vision graph)."),
        click.option("--held-out", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Held-out samples for the fidelity report."),
        click.option("--accuracy-gate", default=None,
                     help="Refuse the bundle below these, e.g. 'cosine>=0.99,kl<=0.05,agreement>=0.8'."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def quant_settings(precision: str, scales: Path | None, calibration_samples: int, int8_decoder: str,
                   smooth_alpha: str, int4_method: str, block_size: str, keep: str, held_out: int,
                   accuracy_gate: str | None) -> Any:
    """QuantSettings for a quantized precision, None for a float one."""
    from pulse_edge.calibration.fidelity import AccuracyGate
    from pulse_edge.calibration.recipes import RECIPES, make_recipe, parse_keep
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.quantized_bundle import QuantSettings

    if precision not in RECIPES:
        return None
    try:
        gate = AccuracyGate.from_string(accuracy_gate) if accuracy_gate else None
    except ValueError as e:
        raise ConfigError(f"--accuracy-gate: {e}") from e
    smooth, alpha = _alpha(smooth_alpha)
    recipe = make_recipe(precision, int8_decoder=int8_decoder, int4_method=int4_method, block_size=int(block_size),
                         smooth_alpha=alpha, smooth=smooth, keep=parse_keep(keep))
    return QuantSettings(recipe=recipe, scales=scales, calibration_samples=calibration_samples, held_out=held_out,
                         gate=gate)


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", default="synthetic", show_default=True,
              help="ECGInstruct JSON, ECGBench parquet/directory, or 'synthetic' (rendered 12-lead ECGs).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Where ECGInstruct's relative image paths point (default: beside the JSON).")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="minmax", show_default=True,
              help="How activation ranges are chosen (all four are stored; this is the default export uses).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="128", show_default=True,
              help="The int4 block size the AWQ search assumes.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="The reference's dtype; auto: fp32 when it fits in memory with room to spare, else the "
                   "checkpoint's bf16 (its files stay memory-mapped: the 7B on a 24 GiB machine).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The scales file to write (e.g. scales.npz).")
def calibrate_cmd(model: Path, data: str, image_root: Path | None, samples: int, method: str, seed: int,
                  block_size: str, vision_tower: Path | None, dtype: str, out: Path) -> None:
    """Collect activation statistics of a checkpoint on ECG samples and search SmoothQuant / AWQ scales."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate, summary_rows
    from pulse_edge.calibration.fidelity import format_table
    from pulse_edge.export.bundle import reference_dtype
    from pulse_edge.export.torch_backend import TorchPipeline

    options = CalibrationOptions(data=data, samples=samples, method=method, seed=seed, image_root=image_root,
                                 block_size=int(block_size), progress=True)
    if dtype == "auto":
        dtype = "fp32" if reference_dtype(model) == torch.float32 else "bf16"
    pipe = TorchPipeline.from_checkpoint(model, vision_tower=vision_tower, dtype=dtype, device="cpu",
                                         fused_projector=False)
    scales = calibrate(pipe.loaded, pipe.tokenizer, options)
    scales.save(out)
    rows = summary_rows(scales)
    click.echo(format_table(rows, list(rows[0])))
    counts = scales.samples
    click.echo(f"wrote {out}: {counts['count']} samples ({counts['by_source']}; {counts['by_task']}), "
               f"{counts['tokens']} positions, method {method}")


def print_fidelity(bundle: Path) -> None:
    """The fidelity report of a quantized bundle, from its manifest (nothing for a float bundle)."""
    from pulse_edge.calibration.fidelity import format_table
    from pulse_edge.runtime.manifest import read_manifest

    calibration = read_manifest(bundle).calibration
    if not calibration or not calibration.get("fidelity"):
        return
    report = calibration["fidelity"]
    summary = {k: f"{float(v):.4g}" for k, v in report["summary"].items()}  # "inf"/"nan" strings read back
    click.echo(f"fidelity against the fp32 torch reference on {len(report['held_out'])} held-out samples "
               f"(scales: {calibration['scales_source']}):")
    click.echo(format_table([summary], list(summary)))
    sizes = report["sizes"]
    click.echo(f"size on disk: {sizes['total'] / 2**20:.1f} MiB ({float(report['summary']['size_ratio']):.2f} of fp32 "
               f"weights, {report['float_bytes'] / 2**20:.1f} MiB)")
