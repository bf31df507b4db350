"""`pulse-edge eval ...`: ECGBench accuracy: run a model, score predictions, compare runs.

Registered in the main CLI with `main.add_command(eval_group)`. Only the
standard library, click and pulse_edge.errors are imported here, so that
`pulse-edge --help` stays fast; each command imports what it needs when run.
User errors are `PulseEdgeError`s: one line on stderr and exit 2 (a failed
accuracy gate exits 1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click

from pulse_edge.choices import BACKENDS, TORCH_DTYPES
from pulse_edge.cli.group import UserErrorGroup
from pulse_edge.cli.params import TORCH_DEVICE
from pulse_edge.click_types import given
from pulse_edge.errors import ConfigError, InputError
from pulse_edge.staging import check_output_file, sole_writer, staged_file, target_lock

_JUDGE_HELP = "OpenAI-compatible endpoint (e.g. http://host:8000/v1) of the LLM judge for ptb-test-report and " \
              "arena; the API key is read from $PULSE_EDGE_JUDGE_KEY."


class _EvalGroup(UserErrorGroup):
    interrupt_hint = "; answers so far are saved: rerun the same command to resume"


def _judge_options(command: Any) -> Any:
    command = click.option("--judge-workers", type=click.IntRange(1, 32), default=4, show_default=True,
                           help="Concurrent judge requests.")(command)
    command = click.option("--judge-model", default=None, help="Model name to ask the judge endpoint for.")(command)
    return click.option("--judge-url", default=None, help=_JUDGE_HELP)(command)


@click.group("eval", cls=_EvalGroup)
def eval_group() -> None:
    """ECGBench accuracy: run a model, score predictions, compare runs (compat and strict scoring)."""


@eval_group.command("subsets")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ECGBench data folder.")
def subsets_command(data_dir: Path) -> None:
    """List the ECGBench subsets found in a data folder, with their layout and size."""
    from pulse_edge.calibration.datasets.ecgbench.readers import count_samples, discover
    from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS

    found = discover(data_dir)
    rows = [{"subset": name, "layout": s.layout, "samples": count_samples(s), "paper_size": SUBSETS[name].paper_size,
             "files": [str(f) for f in s.files]} for name, s in found.items()]
    click.echo(json.dumps({"data": str(data_dir), "found": rows,
                           "not_found": [n for n in SUBSETS if n not in found]}, indent=2))


@eval_group.command("score")
@click.option("--subset", required=True, help="Subset name (e.g. ptb-test, csn-test-no-cot) or alias (ptb, csn).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ECGBench data folder.")
@click.option("--predictions", required=True, type=click.Path(path_type=Path),
              help="JSONL of {id, text|response[, prompt]} per sample.")
@_judge_options
def score_command(subset: str, data_dir: Path, predictions: Path, judge_url: str | None, judge_model: str | None,
                  judge_workers: int) -> None:
    """Score a predictions file; prints compat (the paper's rules) and strict metrics as JSON."""
    from pulse_edge.benchmarks.ecgbench.predictions import read_predictions
    from pulse_edge.benchmarks.ecgbench.score import score_subset
    from pulse_edge.calibration.datasets.ecgbench.readers import find_subset, load_samples
    from pulse_edge.calibration.datasets.ecgbench.subsets import resolve_subset

    _check_options(judge_url, judge_model, None)
    spec = resolve_subset(subset)
    preds = read_predictions(predictions)
    if not preds.predictions:
        raise InputError(f"{predictions} holds no predictions{' (only a torn line)' if preds.torn_tail else ''}: "
                         "nothing to score; run `pulse-edge eval ecgbench` to make them")
    source = find_subset(data_dir, spec.name)
    cache = predictions.with_name(f"{predictions.stem}.judge.jsonl")
    judge = _judge(judge_url, judge_model, judge_workers, lambda _: cache)
    score = score_subset(spec, load_samples(source), preds, judge)
    if not score.coverage.scored:  # nothing to score is no score: a JSON with "scored": false exited 0
        example = f" (e.g. {score.coverage.unknown_ids[0]!r})" if score.coverage.unknown_ids else ""
        raise InputError(f"{predictions}: none of its {score.coverage.predictions} answer ids{example} is a sample "
                         f"of {spec.name} ({score.coverage.samples} samples in {source.describe()}): check --subset")
    click.echo(json.dumps({"predictions": str(predictions), "data": source.describe(), **score.to_dict()}, indent=2))


@eval_group.command("ecgbench")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="PULSE checkpoint (or bundle) directory.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ECGBench data folder.")
@click.option("--subset", "subsets", multiple=True, help="Subset to run (repeatable); default: every subset found.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples of each subset.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for <subset>.jsonl answers (default: ./ecgbench-<model name>); reruns resume.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Also write report.md, report.json and accuracy.png here.")
@_judge_options
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: ort for a bundle (manifest.json), torch for a checkpoint.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="Local CLIP tower directory.")
@click.option("--dtype", type=click.Choice(TORCH_DTYPES), default="auto", show_default=True)
@click.option("--device", type=TORCH_DEVICE, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="The paper's evaluation uses 1024 (greedy decoding).")
def ecgbench_command(model_dir: Path, data_dir: Path, subsets: tuple[str, ...], limit: int | None,
                     out_dir: Path | None, report_dir: Path | None, judge_url: str | None, judge_model: str | None,
                     judge_workers: int, backend: str, vision_tower: Path | None, dtype: str, device: str,
                     max_new_tokens: int) -> None:
    """Run a model over ECGBench (greedy, resumable), then score it; prints the scores as JSON."""
    from pulse_edge.benchmarks.ecgbench.runner import RUN_FILE

    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model directory not found")
    _check_options(judge_url, judge_model, report_dir)
    out = out_dir or Path(f"ecgbench-{model_dir.resolve().name}")
    _check_folder(out, "--out", "answers.jsonl")
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    # two runs into one --out would answer every id twice (into one --report, mix their files)
    with (sole_writer(out, what="--out directory", staged=(out / "scores.json", out / RUN_FILE)),
          _report_lock(report_dir)):
        _run_ecgbench(model_dir, data_dir, subsets, out, limit, report_dir, judge_url, judge_model, judge_workers,
                      backend=backend, vision_tower=vision_tower, dtype=dtype, device=device,
                      max_new_tokens=max_new_tokens)


def _run_ecgbench(model_dir: Path, data_dir: Path, subsets: tuple[str, ...], out: Path, limit: int | None,
                  report_dir: Path | None, judge_url: str | None, judge_model: str | None, judge_workers: int, *,
                  backend: str, vision_tower: Path | None, dtype: str, device: str, max_new_tokens: int) -> None:
    from pulse_edge.backends import refuse_torch_settings, serves_bundle
    from pulse_edge.benchmarks.common.machine import model_info
    from pulse_edge.benchmarks.ecgbench import runner
    from pulse_edge.benchmarks.ecgbench.predictions import read_predictions
    from pulse_edge.benchmarks.ecgbench.score import score_subsets

    if serves_bundle(model_dir, backend):  # before run.json pins them, which would lock a rerun out
        refuse_torch_settings(vision_tower=vision_tower, dtype=dtype, device=device)
    plans = runner.plan_run(data_dir, subsets, out, limit)
    _announce(data_dir, plans)
    runner.check_images(plans)
    model = model_info(model_dir)
    from pulse_edge.backends import model_identity

    # the model by what it is, not where: a re-export in place resumed and mixed two models' answers in one score
    identity = model_identity(model_dir, backend, dtype=dtype, device=device, vision_tower=vision_tower)
    settings = runner.RunSettings(model=identity, precision=model["precision"], backend=backend, dtype=dtype,
                                  device=device, max_new_tokens=max_new_tokens)
    runner.pin_settings(out, settings)

    def open_model() -> Any:
        from pulse_edge.backends import open_backend

        return open_backend(model_dir, backend=backend, vision_tower=vision_tower, dtype=dtype, device=device)

    stats = runner.run_plans(plans, open_model, max_new_tokens=max_new_tokens, stream=sys.stderr)
    judge = _judge(judge_url, judge_model, judge_workers, lambda name: out / f"{name}.judge.jsonl")
    # together: the guessing subsets draw from one generator in the paper's order, as its script does
    scores = score_subsets([(p.spec, p.reference, read_predictions(p.out_file, missing_ok=True)) for p in plans],
                           judge)
    result = {"out": str(out), "model": model, "runs": [vars(s) for s in stats],
              "subsets": [s.to_dict() for s in scores]}
    with staged_file(out / "scores.json") as work:
        work.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if report_dir is not None:
        _run_report(report_dir, scores, model, vars(settings))
    click.echo(json.dumps(result, indent=2))


def _run_report(report_dir: Path, scores: Any, model: dict[str, Any], settings: dict[str, Any]) -> None:
    from pulse_edge.benchmarks.common.machine import machine_info
    from pulse_edge.benchmarks.ecgbench.report import write_run_report

    written = write_run_report(report_dir, scores, model=model, settings=settings, machine=machine_info())
    click.echo(f"report: {', '.join(str(p) for p in written)}", err=True)


@eval_group.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="ECGBench data folder.")
@click.option("--max-drop", "max_drops", multiple=True, metavar="METRIC=POINTS",
              help="Fail (exit 1) when METRIC falls more than POINTS below the first run. METRIC: "
                   "[compat.|strict.][SUBSET.]NAME, NAME in auc f1 hl accuracy score exact_match; strict by default.")
@click.option("--changes", "changes_file", type=click.Path(path_type=Path), default=Path("ecgbench-changes.json"),
              show_default=True, help="Where to write the samples whose answers changed.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Also write report.md, report.json and accuracy.png here.")
@_judge_options
def compare_command(run_dirs: tuple[Path, ...], data_dir: Path, max_drops: tuple[str, ...], changes_file: Path,
                    report_dir: Path | None, judge_url: str | None, judge_model: str | None,
                    judge_workers: int) -> None:
    """Compare two or more runs on the same samples (the first is the baseline): deltas, agreement, gate."""
    from pulse_edge.benchmarks.common.machine import machine_info
    from pulse_edge.benchmarks.ecgbench import compare

    rules = [compare.DropRule.parse(text) for text in max_drops]
    _check_options(judge_url, judge_model, report_dir)
    check_output_file(changes_file, what="--changes file")
    runs = compare.load_runs(run_dirs)
    judges = [_judge(judge_url, judge_model, judge_workers, lambda name, d=r.path: d / f"{name}.judge.jsonl")
              for r in runs]
    comparison = compare.compare_runs(runs, data_dir, judges)
    failures = compare.gate_failures(comparison, rules) if rules else None
    compare.write_changes(comparison, changes_file)
    if report_dir is not None:
        from pulse_edge.benchmarks.ecgbench.report import write_compare_report

        with _report_lock(report_dir):
            write_compare_report(report_dir, comparison, machine=machine_info(), gate=failures)
    click.echo(json.dumps({**comparison.to_dict(), "changes_file": str(changes_file),
                           "gate_failures": failures}, indent=2))
    if failures:
        raise compare.GateFailed("accuracy gate failed: " + "; ".join(failures))


def _announce(data_dir: Path, plans: Any) -> None:
    """Say on stderr which subsets the data folder holds and what is left to answer in each."""
    from pulse_edge.calibration.datasets.ecgbench.readers import discover
    from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS

    absent = [name for name in SUBSETS if name not in discover(data_dir)]
    click.echo(f"{data_dir}: {len(SUBSETS) - len(absent)} of {len(SUBSETS)} subsets present"
               + (f" (absent: {', '.join(absent)})" if absent else ""), err=True)
    for plan in plans:
        click.echo(f"{plan.source.describe()}: {len(plan.reference)} samples, {len(plan.todo)} to answer", err=True)


def _check_options(judge_url: str | None, judge_model: str | None, report_dir: Path | None) -> None:
    """Refuse half a judge, or a report that cannot be drawn, before any long work starts."""
    from pulse_edge.benchmarks.ecgbench.judge import JudgeConfig

    JudgeConfig.from_options(judge_url, judge_model)
    _workers_need_a_judge(judge_url)
    if report_dir is not None:
        from pulse_edge.benchmarks.common.plots import require_plotting

        require_plotting()
        _check_folder(report_dir, "--report", "report.md")


def _report_lock(report_dir: Path | None) -> AbstractContextManager[Any]:
    """One writer per --report folder (its report.md, report.json and plot belong together)."""
    if report_dir is None:
        return nullcontext()
    report_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    return target_lock(report_dir, what="--report folder")


def _check_folder(folder: Path, option: str, example: str) -> None:
    """A folder the command writes into (made if absent): not a file, in a place this user can write. Checked before
    the work: the report was written after an ECGBench run of hours, and failed there with a traceback."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; {option} names a folder")
    check_output_file(folder / example, what=f"{option} folder")


def _workers_need_a_judge(url: str | None) -> None:
    """--judge-workers without a judge would be dropped in silence (JudgeConfig.from_options refused half a one)."""
    if url is None and given("judge_workers"):
        raise ConfigError("--judge-workers sets how many requests go to the LLM judge: give --judge-url and "
                          "--judge-model too, or leave it out")


def _judge(url: str | None, model: str | None, workers: int, cache_for: Callable[[str], Path]) -> Any:
    """A judge scorer whose verdicts for a subset are cached in `cache_for(subset)`; None without a judge."""
    from pulse_edge.benchmarks.ecgbench.judge import JudgeConfig, make_judge_scorer

    config = JudgeConfig.from_options(url, model, workers)
    _workers_need_a_judge(url)
    return None if config is None else make_judge_scorer(config, cache_for)
