"""`pulse-edge build-engines`: TensorRT engines from a bundle exported with --target tensorrt."""

from __future__ import annotations

from pathlib import Path

import click

from pulse_edge.choices import ENGINE_TARGETS
from pulse_edge.click_types import FiniteFloatRange
from pulse_edge.errors import ConfigError


def _capabilities(text: str | None) -> tuple[str, ...] | None:
    """'8.9,12.0' -> ("8.9", "12.0"); the library checks each value. Given but naming none (an empty CI variable)
    is refused: an empty list means the build machine's own GPU, and an ahead-of-time build host has none."""
    if text is None:
        return None
    named = tuple(part.strip() for part in text.split(",") if part.strip())
    if not named:
        raise ConfigError(f"--compute-capability {text!r} names no capability; give e.g. 8.7 (Orin) or 8.9,12.0, or "
                          "leave it out for the defaults")
    return named


@click.command("build-engines")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(ENGINE_TARGETS), default="auto", show_default=True,
              help="rtx: TensorRT-RTX, ahead of time on any machine (no GPU needed); jetson: JetPack's TensorRT, on "
                   "the Jetson itself; auto: whichever is installed (TensorRT-RTX first).")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Positions the engine's KV cache holds (default: the bundle's); less uses less device memory.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=None,
              help="Image tiles per vision run, at most the largest image's (the default, 5 for PULSE); an image with "
                   "more runs in batches.")
@click.option("--max-chunk", type=click.IntRange(min=1), default=None,
              help="Positions one prefill run takes (default 512, the runtime's chunk). TensorRT reserves scratch "
                   "memory for the largest run, device memory a Jetson shares with its CPU; --prefill-chunk at run "
                   "time may not exceed it.")
@click.option("--workspace", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="TensorRT's workspace limit in GiB (default: TensorRT's own).")
@click.option("--compute-capability", "capabilities", default=None,
              help="rtx: GPUs to compile for, e.g. 8.6,8.9,12.0 (the default; FP8 bundles: 8.9,12.0).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="The engine directory to create (default: BUNDLE/engines-<target>).")
def build_engines_cmd(bundle: Path, target: str, max_context: int | None, max_tiles: int | None,
                      max_chunk: int | None, workspace: float | None, capabilities: str | None,
                      out: Path | None) -> None:
    """Build the vision and decoder TensorRT engines of a bundle exported with --target tensorrt."""
    from pulse_edge.export.engines.build import EngineBuildOptions, build_engines

    options = EngineBuildOptions(target=target, max_context=max_context, max_tiles=max_tiles, max_chunk=max_chunk,
                                 workspace_gib=workspace,
                                 compute_capabilities=_capabilities(capabilities), output=out)
    path = build_engines(bundle, options, progress=lambda line: click.echo(line, err=True))
    # outside the bundle (-o) the trt backend finds them only when named
    inside = path.resolve().parent == Path(bundle).resolve()
    click.echo(f"wrote TensorRT engines to {path} (serve them with `pulse-edge infer IMAGE --model {bundle} "
               f"--backend trt{'' if inside else f' --engines {path}'}`)")
