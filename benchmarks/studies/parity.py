"""How far each quantized graph sits from its emulated reference: the measurements behind the parity bounds.

    checkpoint + scales (pulse-edge calibrate)
      -> per recipe: `export_bundle` with every parity bound lifted (ValidationPlan.tolerances), so the
         errors are recorded whatever they are, into a scratch folder (one bundle at a time, removed after)
      -> per check: max rel err and min cosine against the emulated reference
         (vision at 1 and 5 tiles, merged features of whole prints, decoder after each prefill and its
         decode steps), greedy agreement, and the fidelity summary against fp32

The bounds in export/validate/tolerances.py are set from these figures with margin (docs/performance.md
holds the runs). Run: `python -m pulse_edge.benchmarks.studies.parity CKPT --scales S` (`--help`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import click

from pulse_edge.benchmarks.common.output import REPORT_PATH, write_json

# recipe key -> make_recipe arguments
RECIPES: dict[str, dict[str, Any]] = {
    "int8": {"precision": "int8"},
    "int8-w8a8": {"precision": "int8", "int8_decoder": "w8a8"},
    "int4": {"precision": "int4"},
    "int4-rtn": {"precision": "int4", "int4_method": "rtn"},
    "fp8": {"precision": "fp8"},
}


def _record_only() -> Any:
    """Bounds that every finite error meets: the study records, it does not judge."""
    from pulse_edge.export.validate.tolerances import TOLERANCES, Tolerance

    return MappingProxyType({key: Tolerance(max_rel_err=math.inf, min_cosine=-1.0) for key in TOLERANCES})


def _worst(checks: list[dict[str, Any]]) -> dict[str, float]:
    return {"max_rel_err": max(c["max_rel_err"] for c in checks), "min_cosine": min(c["cosine"] for c in checks)}


def summarise(validation: dict[str, Any], fidelity: dict[str, Any] | None) -> dict[str, Any]:
    """The worst figures per check of one bundle's validation record."""
    decoder = {f"prefill {c['prefill_length']}": _worst([c["prefill"], *c["decode"]])
               for c in validation["decoder"]["cases"]}
    greedy = validation["greedy"]["runs"]
    sites = {f"{graph} sites": {key: validation["sites"][graph][key] for key in ("max_rel_err", "min_cosine")}
             for graph in ("vision", "decoder")}
    return {"vision": _worst(validation["vision"]["shapes"]), "merge": _worst(validation["vision"]["merge"]),
            "decoder": decoder, "sites": sites, "greedy_agreement": min((r["agreement"] for r in greedy), default=1.0),
            "fidelity": None if fidelity is None else dict(fidelity["summary"])}


def measure_recipe(checkpoint: Path, scales: Path, key: str, work: Path, plan: Any) -> dict[str, Any]:
    import torch

    from pulse_edge.calibration.recipes import make_recipe
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle
    from pulse_edge.export.quant.context import QuantSettings
    from pulse_edge.runtime.bundle.manifest import read_manifest

    arguments = dict(RECIPES[key])
    precision = arguments.pop("precision")
    settings = QuantSettings(make_recipe(precision, **arguments), scales=scales, held_out=1)
    out = work / key
    started = time.perf_counter()
    # fp32 whatever the free memory: the figures are float-order error, a bf16 reference would add its own
    options = ExportOptions(precision=precision, plan=plan, quant=settings, reference=torch.float32)
    try:
        export_bundle(checkpoint, out, options)
        manifest = read_manifest(out)
        report = summarise(dict(manifest.validation), manifest.calibration.fidelity)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**report, "seconds": round(time.perf_counter() - started, 1)}


def run_parity(checkpoint: Path, scales: Path, recipes: tuple[str, ...], *, quick: bool,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
    from pulse_edge.export.validate.parity import ValidationPlan

    plan = replace(ValidationPlan.quick() if quick else ValidationPlan(), tolerances=_record_only())
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "prefill_lengths": list(plan.prefill_lengths),
                              "decode_steps": plan.decode_steps, "recipes": {}}
    with tempfile.TemporaryDirectory(prefix="parity-study-") as tmp:
        for key in recipes:
            progress(f"{key}: exporting and validating against the emulated reference")
            report["recipes"][key] = measure_recipe(checkpoint, scales, key, Path(tmp), plan)
            progress(parity_table({"recipes": {key: report["recipes"][key]}}))
    return report


def parity_table(report: dict[str, Any]) -> str:
    """One line per recipe and check: max rel err / min cosine against the emulated reference."""
    lines = [f"{'recipe':10s}  {'check':14s}  {'max rel err':>11s}  {'min cosine':>12s}"]
    for key, r in report["recipes"].items():
        checks = {**r["sites"], "vision": r["vision"], "merged print": r["merge"], **r["decoder"]}
        for name, c in checks.items():
            lines.append(f"{key:10s}  {name:14s}  {c['max_rel_err']:11.3g}  {c['min_cosine']:12.8f}")
        fidelity = r.get("fidelity") or {}
        lines.append(f"{key:10s}  greedy agreement {r['greedy_agreement']:.2f}; vs fp32: logit cosine "
                     f"{float(fidelity.get('cosine', math.nan)):.4f}, vision cosine "
                     f"{float(fidelity.get('vision_cosine', math.nan)):.4f}; {r['seconds']} s")
    return "\n".join(lines)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--scales", type=click.Path(path_type=Path), required=True, help="From `pulse-edge calibrate`.")
@click.option("--recipes", default=",".join(RECIPES), show_default=True, help="Comma-separated keys.")
@click.option("--quick", is_flag=True, help="The quick validation plan (prefills of 5 and 64 positions).")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def main(checkpoint: Path, scales: Path, recipes: str, quick: bool, json_path: Path | None) -> None:
    """Export each recipe with the parity bounds lifted and print its errors against the emulated reference."""
    from pulse_edge.errors import ConfigError

    keys = tuple(k.strip() for k in recipes.split(",") if k.strip())
    unknown = [k for k in keys if k not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    report = run_parity(checkpoint, scales, keys, quick=quick)
    click.echo(parity_table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
