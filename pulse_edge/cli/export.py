"""`pulse-edge export` and its quantization options.

Heavy imports (torch, transformers) stay inside the command.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import click

from pulse_edge.choices import (
    BLOCK_SIZE_CHOICES,
    DEFAULT_BLOCK_SIZE,
    EXPORT_PRECISIONS,
    EXPORT_TARGETS,
    FLOAT_PRECISIONS,
    INT4_METHODS,
    INT8_DECODER_MODES,
    KV_CACHES,
    TRT_OPS,
    VALIDATION_PLANS,
)
from pulse_edge.click_types import given
from pulse_edge.errors import ConfigError


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
        click.option("--int8-decoder", type=click.Choice(INT8_DECODER_MODES), default=None,
                     help="int8: weight-only decoder, or W8A8 with SmoothQuant (default: weight-only for --target "
                          "ort, w8a8 for --target tensorrt)."),
        click.option("--smooth-alpha", default="auto", show_default=True,
                     help="SmoothQuant migration strength; auto = chosen per layer on the samples; off = plain W8A8."),
        click.option("--int4-method", type=click.Choice(INT4_METHODS), default="awq", show_default=True,
                     help="awq: activation-aware scaling from the scales file; rtn: plain rounding."),
        click.option("--block-size", type=click.Choice(BLOCK_SIZE_CHOICES), default=str(DEFAULT_BLOCK_SIZE),
                     show_default=True, help="Block size of the block-wise int4/int8 weights."),
        click.option("--kv-cache", type=click.Choice(KV_CACHES), default=None,
                     help="The KV cache's type: int8/int4 default to int8 (calibrated per-channel scales), fp32 to "
                          "float (fp32); fp16 halves an fp32 bundle's cache (fidelity measured at export)."),
        click.option("--prefill-graph/--no-prefill-graph", default=True, show_default=True,
                     help="int8/int4: a second decoder graph on int8 GEMMs for long inputs (prompts, images)."),
        click.option("--keep", default="", help="Sites kept at fp32, comma-separated prefixes "
                                                "(e.g. lm_head,layers.0,projector; vision = the whole vision graph)."),
        click.option("--held-out", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Held-out samples for the fidelity report (quantized bundles, an fp16 KV cache)."),
        click.option("--accuracy-gate", default=None,
                     help="Refuse the bundle below these, e.g. 'cosine>=0.99,kl<=0.05,agreement>=0.8'."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# The quantization options only some precisions read (option name -> those precisions); one given outright for
# another is refused, never dropped in silence: the manifest would record a recipe knob that did nothing.
QUANT_ONLY = MappingProxyType({
    "scales": ("int8", "int4", "fp8"), "calibration_samples": ("int8", "int4", "fp8"), "int8_decoder": ("int8",),
    "smooth_alpha": ("int8",), "int4_method": ("int4",), "block_size": ("int8", "int4"),
    "prefill_graph": ("int8", "int4"), "keep": ("int8", "int4", "fp8")})
FLAGS = MappingProxyType({"prefill_graph": "--no-prefill-graph"})  # the flag a non-default value is given with


def check_quant_options(precision: str, given: Callable[[str], bool], *, target: str = "ort",
                        int8_decoder: str | None = None) -> None:
    """`given(name)`: the option was on the command line (not its default). Beyond the precision: the prefill
    graph is the ORT CPU recipes' only, and an int8 W8A8 decoder (TensorRT's default) has no weight blocks."""
    from pulse_edge.errors import ConfigError

    w8a8 = (int8_decoder or ("w8a8" if target == "tensorrt" else "weight-only")) == "w8a8"
    beside = {"prefill_graph": target == "ort", "block_size": not (precision == "int8" and w8a8)}
    unused = [FLAGS.get(name, f"--{name.replace('_', '-')}") for name, readers in QUANT_ONLY.items()
              if given(name) and (precision not in readers or not beside.get(name, True))]
    if given("calibration_samples") and given("scales") and precision in QUANT_ONLY["scales"]:
        unused.append("--calibration-samples (the scales file's samples are used)")
    if unused:
        raise ConfigError(f"{', '.join(unused)}: not used by an export at --precision {precision} (--target "
                          f"{target}); leave them out")


def quant_settings(precision: str, scales: Path | None, calibration_samples: int, int8_decoder: str | None,
                   smooth_alpha: str, int4_method: str, block_size: str, keep: str, held_out: int,
                   accuracy_gate: str | None, kv_cache: str | None = None, prefill_graph: bool = True,
                   target: str = "ort") -> Any:
    """QuantSettings for a quantized precision, None for a float one."""
    from pulse_edge.calibration.recipes import RECIPES, make_recipe, parse_keep
    from pulse_edge.export.quant.context import QuantSettings

    if precision not in RECIPES:
        return None
    gate = _parse_gate(accuracy_gate) if accuracy_gate else None
    smooth, alpha = _alpha(smooth_alpha)
    int8_decoder = int8_decoder or ("w8a8" if target == "tensorrt" else "weight-only")
    recipe = make_recipe(precision, int8_decoder=int8_decoder, int4_method=int4_method, block_size=int(block_size),
                         smooth_alpha=alpha, smooth=smooth, keep=parse_keep(keep), kv_cache=kv_cache,
                         prefill=prefill_graph, target=target)
    return QuantSettings(recipe=recipe, scales=scales, calibration_samples=calibration_samples, held_out=held_out,
                         gate=gate)


def _parse_gate(accuracy_gate: str) -> Any:
    """--accuracy-gate's text as an AccuracyGate; a malformed one is one line."""
    from pulse_edge.calibration.fidelity import AccuracyGate
    from pulse_edge.errors import ConfigError

    try:
        return AccuracyGate.from_string(accuracy_gate)
    except ValueError as e:
        raise ConfigError(f"--accuracy-gate: {e}") from e


def float_gate(accuracy_gate: str | None, kv_cache: str | None) -> Any:
    """--accuracy-gate for a float precision: it judges an fp16 KV cache's fidelity; with the float cache there is
    nothing to judge (the bundle is the reference), which is refused rather than ignored."""
    from pulse_edge.errors import ConfigError

    if accuracy_gate is None:
        return None
    if kv_cache != "fp16":
        raise ConfigError("--accuracy-gate judges fidelity against fp32: a quantized bundle's, or one with "
                          "--kv-cache fp16; this float bundle is the reference itself")
    return _parse_gate(accuracy_gate)


def print_fidelity(bundle: Path) -> None:
    """The fidelity report from the manifest: a quantized bundle's, or a float bundle's with an fp16 KV cache
    (nothing for a float bundle with its own cache: it is the reference)."""
    from pulse_edge.calibration.fidelity import format_table
    from pulse_edge.runtime.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    calibration = manifest.calibration
    report = calibration.fidelity if calibration is not None else manifest.validation.get("fidelity")
    if not report:
        return
    summary = {k: f"{float(v):.4g}" for k, v in report["summary"].items()}  # "inf"/"nan" strings read back
    source = f"scales: {calibration.scales_source}" if calibration is not None else "its fp16 KV cache"
    left_out = len(report.get("held_out_left_out", []))  # absent from bundles made before it was recorded
    fits = f"; {left_out} left out, too long for the context" if left_out else ""
    click.echo(f"fidelity against the fp32 torch reference on {len(report['held_out'])} held-out samples "
               f"({source}{fits}):")
    click.echo(format_table([summary], list(summary)))
    sizes = report["sizes"]
    click.echo(f"size on disk: {sizes['total'] / 2**20:.1f} MiB ({float(report['summary']['size_ratio']):.2f} of fp32 "
               f"weights, {report['float_bytes'] / 2**20:.1f} MiB)")


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The bundle directory to create (must not exist or be empty).")
@click.option("--precision", type=click.Choice(EXPORT_PRECISIONS), default="fp32",
              show_default=True, help="int8 / int4 / fp8: quantized recipes (see the options below and the README).")
@click.option("--max-context", type=int, default=None,
              help="KV cache length in positions (default: the model's 4096).")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
              help="A local CLIP vision tower directory; takes precedence over the tower named in the config.")
@click.option("--validation", type=click.Choice(VALIDATION_PLANS), default="standard", show_default=True,
              help="quick: short prefills only (the full 7B in fp32 on a small CPU).")
@click.option("--target", type=click.Choice(EXPORT_TARGETS), default="ort", show_default=True,
              help="ort: ONNX Runtime's fused ops; tensorrt: standard-ONNX fp16 graphs for `build-engines` (ONNX "
                   "Runtime serves them too).")
@click.option("--trt-ops", type=click.Choice(TRT_OPS), default="native", show_default=True,
              help="--target tensorrt: native = opset-24 attention/RoPE/RMSNorm/KV ops (TensorRT-RTX, TensorRT >= "
                   "10.15); explicit = explicit opset-18 ops (21 with int4) for TensorRT 10.3 (JetPack 6).")
@quant_options
def export_cmd(checkpoint: Path, out: Path, precision: str, max_context: int | None, vision_tower: Path | None,
               validation: str, target: str, trt_ops: str, **quant: Any) -> None:
    """Export a checkpoint to a validated bundle (ONNX graphs, tokenizer.json, manifest.json)."""
    from pulse_edge.cli.progress import stage_progress
    from pulse_edge.staging import check_output_dir

    check_quant_options(precision, given, target=target, int8_decoder=quant["int8_decoder"])
    fp16_cache = precision == "fp32" and quant["kv_cache"] == "fp16"  # the one float bundle with a fidelity report
    if given("held_out") and precision in FLOAT_PRECISIONS and not fp16_cache:
        raise ConfigError("--held-out: its samples are for the fidelity report against fp32, a quantized bundle's "
                          "or an fp32 one's with --kv-cache fp16; this bundle has none: leave it out")
    check_output_dir(out, what="bundle")  # before minutes of work, and before the heavy imports
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle
    from pulse_edge.export.validate.parity import ValidationPlan

    plan = ValidationPlan() if validation == "standard" else ValidationPlan.quick()
    settings = quant_settings(precision, target=target, **quant)
    options = ExportOptions(precision=precision, max_context=max_context, vision_tower=vision_tower, plan=plan,
                            quant=settings, target=target, trt_ops=trt_ops, held_out=quant["held_out"],
                            kv_cache=None if settings else quant["kv_cache"],
                            gate=None if settings else float_gate(quant["accuracy_gate"], quant["kv_cache"]))
    exporter_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = exporter_log.level
    try:
        # torch's exporter warns about torchvision ops and trips its own pytree deprecation:
        # nothing a user exporting PULSE can act on.
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), stage_progress(f"export {precision}"):
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            path = export_bundle(checkpoint, out, options)
    finally:
        exporter_log.setLevel(level)
    print_fidelity(path)
    from pulse_edge.runtime.bundle.manifest import read_manifest

    reference = read_manifest(path).validation.get("reference", "the torch reference")
    made_for = " for TensorRT (`pulse-edge build-engines`; ONNX Runtime serves it too)" if target == "tensorrt" else ""
    click.echo(f"wrote {precision} bundle{made_for} to {path} (validated against {reference})")
