"""`pulse-edge make-tiny` and `pulse-edge render-ecg`: a random PULSE-shaped checkpoint, a synthetic ECG print."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from pulse_edge.choices import CHECKPOINT_LAYOUTS, MERGES, RHYTHMS, TOWER_PLACEMENTS
from pulse_edge.cli.params import SEED
from pulse_edge.click_types import FiniteFloatRange, given
from pulse_edge.errors import ConfigError

MAX_LAYERS = 80  # LLaMA-70B's depth: more is no PULSE-shaped model, and 100000 ran until killed

@click.command("make-tiny")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--merge", type=click.Choice(MERGES), default="flat", show_default=True,
              help="flat is PULSE's layout; spatial_unpad adds image_newline (LLaVA-1.6 default).")
@click.option("--tower", type=click.Choice(TOWER_PLACEMENTS), default="inside", show_default=True,
              help="separate: the checkpoint only names its tower; pass --vision-tower DIR/clip-vision-tower.")
@click.option("--layout", type=click.Choice(CHECKPOINT_LAYOUTS), default="llava", show_default=True,
              help="llava: PULSE's original format; llava_next: transformers' format.")
@click.option("--full-shape", is_flag=True,
              help="Real PULSE-7B shapes (random, ~14 GB in bf16) for memory and speed tests.")
@click.option("--layers", type=click.IntRange(min=1, max=MAX_LAYERS), default=None,
              help="Override the decoder's layer count (e.g. --full-shape --layers 2: real width, 2 layers).")
@click.option("--outliers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hidden dims whose q/k/v and gate/up inputs get outlier activations (function-preserving), "
                   "as trained LLMs have; for testing quantization.")
@click.option("--outlier-scale", type=FiniteFloatRange(min=0, min_open=True, max=1e4), default=50.0, show_default=True,
              help="How many times larger the outlier dims' activations are.")
@click.option("--init-range", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Draw every weight matrix from N(0, R^2) (transformers' initializer_range) instead of the "
                   "unit-scale N(0, 1/fan_in).")
def make_tiny(out_dir: Path, seed: int, merge: str, tower: str, layout: str, full_shape: bool,
              layers: int | None, outliers: int, outlier_scale: float, init_range: float | None) -> None:
    """Write a random PULSE-shaped checkpoint (original LLaVA layout) with a real SentencePiece tokenizer."""
    from pulse_edge.cli.progress import stage_progress
    from pulse_edge.staging import check_output_dir

    if not outliers and given("outlier_scale"):  # no dims to scale: the option would be dropped in silence
        raise ConfigError("--outlier-scale sets how large the --outliers dims are: give --outliers N too, or leave it "
                          "out")
    check_output_dir(out_dir, what="checkpoint")
    import torch

    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint, weight_bytes

    spec = TinySpec(seed=seed, merge=merge, tower=tower, layout=layout, full_shape=full_shape,
                    dtype=torch.bfloat16 if full_shape else torch.float32, layers=layers, outliers=outliers,
                    outlier_scale=outlier_scale, init_range=init_range)
    _check_room(out_dir, weight_bytes(spec))
    with stage_progress("make-tiny"):
        path = make_tiny_checkpoint(out_dir, spec)
    click.echo(f"wrote {'full-shape' if full_shape else 'tiny'} random checkpoint to {path}")


def _check_room(out_dir: Path, need: int) -> None:
    """Refuse before writing what the disk cannot hold (a full-shape checkpoint is 14 GB; `--layers 80` of it 26 GB):
    it was found out at the last shard, after minutes."""
    from pulse_edge.staging import nearest_existing, size_text

    place = nearest_existing(out_dir)
    free = shutil.disk_usage(place).free
    if need + (64 << 20) > free:
        raise ConfigError(f"the checkpoint's weights take {size_text(need)} and {place} has {size_text(free)} "
                          "free; free some space, write elsewhere or give fewer --layers")


# The formats `infer` reads that Pillow writes, by extension.
PRINT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


def _print_size(size: str) -> tuple[int, int]:

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"--size must look like 2200x1700, got {size!r}") from e
    return width, height


@click.command("render-ecg")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rhythm", type=click.Choice(RHYTHMS), default="sinus", show_default=True,
              help="The rhythm the synthetic signal has (its labels go to stdout).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--size", default="2200x1700", show_default=True,
              help="WIDTHxHEIGHT in pixels (200 dpi letter), at most 64 million pixels.")
@click.option("--header", default=None, help="Header text printed at the top.")
def render_ecg(out: Path, rhythm: str, seed: int, size: str, header: str | None) -> None:
    """Render a synthetic 12-lead ECG print with a known rhythm (PNG, JPEG, TIFF or BMP by OUT's extension)."""
    from pulse_edge.runtime.ecg.render import ecg_print_geometry
    from pulse_edge.runtime.ecg.render import render_ecg as render
    from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
    from pulse_edge.staging import check_output_file, staged_file

    image_format = PRINT_FORMATS.get(out.suffix.lower())
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; OUT is the print's file name, e.g. {out / 'print.png'}")
    if image_format is None:
        raise ConfigError(f"{out}: the extension {out.suffix or '(none)'!r} is not one of "
                          f"{', '.join(PRINT_FORMATS)}; the print's format follows it")
    check_output_file(out, what="image", make_parents=False)
    width, height = _print_size(size)
    ecg_print_geometry(width, height)  # refuses a size out of bounds before anything is drawn
    record = synthesize_ecg(rhythm, seed=seed)
    image = render(record, width_px=width, height_px=height, header=header)
    with staged_file(out) as work:
        image.save(work, format=image_format)
    click.echo(f"wrote {out}: {record.description}")
