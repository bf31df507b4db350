"""`pulse-edge calibrate`: activation statistics and SmoothQuant / AWQ scales of a checkpoint on ECG samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pulse_edge.choices import BLOCK_SIZE_CHOICES, CALIBRATION_DTYPES, CALIBRATION_METHODS, DEFAULT_BLOCK_SIZE
from pulse_edge.cli.params import SEED
from pulse_edge.cli.progress import quiet


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", default="synthetic", show_default=True,
              help="ECGInstruct JSON, ECGBench parquet/directory, or 'synthetic' (rendered 12-lead ECGs).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Where ECGInstruct's relative image paths point (default: beside the JSON).")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="How activation ranges are chosen (all four are stored; this is the default export uses).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--block-size", type=click.Choice(BLOCK_SIZE_CHOICES), default=str(DEFAULT_BLOCK_SIZE), show_default=True,
              help="The int4 block size the AWQ search assumes.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(CALIBRATION_DTYPES), default="auto", show_default=True,
              help="The reference's dtype; auto: fp32 when it fits in memory with room to spare, else the "
                   "checkpoint's bf16 (its files stay memory-mapped: the 7B on a 24 GiB machine).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The scales file to write (e.g. scales.npz).")
def calibrate_cmd(model: Path, data: str, image_root: Path | None, samples: int, method: str, seed: int,
                  block_size: str, vision_tower: Path | None, dtype: str, out: Path) -> None:
    """Collect activation statistics of a checkpoint on ECG samples and search SmoothQuant / AWQ scales."""
    from pulse_edge.staging import check_output_file, sole_writer

    check_output_file(out, what="scales file")  # before minutes of work, and before the heavy imports
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with sole_writer(out, what="scales file"):  # two runs into one file: the later would silently win
        _calibrate(model, out, dtype, vision_tower, data=data, samples=samples, method=method, seed=seed,
                   image_root=image_root, block_size=int(block_size))


def _calibrate(model: Path, out: Path, dtype: str, vision_tower: Path | None, **settings: Any) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate, choose_samples, summary_rows
    from pulse_edge.calibration.fidelity import format_table
    from pulse_edge.export.build.memory import reference_dtype
    from pulse_edge.export.model.torch_backend import TorchPipeline

    options = CalibrationOptions(**settings, progress=not quiet())
    chosen = choose_samples(options)  # a bad --data is one line before minutes of loading the model
    if dtype == "auto":
        dtype = "fp32" if reference_dtype(model) == torch.float32 else "bf16"
    pipe = TorchPipeline.from_checkpoint(model, vision_tower=vision_tower, dtype=dtype, device="cpu",
                                         fused_projector=False)
    scales = calibrate(pipe.loaded, pipe.tokenizer, options, samples=chosen)
    scales.save(out)
    rows = summary_rows(scales)
    click.echo(format_table(rows, list(rows[0])))
    counts = scales.samples
    click.echo(f"wrote {out}: {counts['count']} samples ({counts['by_source']}; {counts['by_task']}), "
               f"{counts['tokens']} positions, method {settings['method']}")
