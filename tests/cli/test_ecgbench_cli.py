"""`pulse-edge eval`: a lean group (no heavy import until a command runs) with one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.cli.eval import eval_group

HEAVY = ("numpy", "PIL", "pyarrow", "matplotlib", "torch", "transformers")


def test_importing_the_group_pulls_in_nothing_heavy() -> None:
    code = ("import sys, json; import pulse_edge.cli.eval; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_backends_match_the_pipelines() -> None:
    """The --backend choices users see are exactly what open_backend accepts."""
    from pulse_edge.backends import BACKENDS
    from pulse_edge.cli.bench import bench_group

    for command in (eval_group.commands["ecgbench"], bench_group.commands["latency"]):
        option = next(p for p in command.params if p.name == "backend")
        assert tuple(option.type.choices) == BACKENDS


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(eval_group, ["--help"])
    assert result.exit_code == 0
    for command in ("ecgbench", "score", "compare", "subsets"):
        assert command in result.output


def test_user_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    a_file = tmp_path / "ecg.png"
    a_file.write_bytes(b"not a folder")
    cases = [
        (["ecgbench", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)], "model directory not found"),
        (["score", "--subset", "ptb-xl-form", "--data", str(tmp_path), "--predictions", "p.jsonl"],
         "unknown ECGBench subset 'ptb-xl-form'; choose from ptb-test"),
        (["score", "--subset", "csn", "--data", str(tmp_path), "--predictions", str(tmp_path / "p.jsonl")],
         "predictions file not found"),
        (["subsets", "--data", str(tmp_path / "missing")], "does not exist"),
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--judge-url", "http://x"],
         "needs both --judge-url and --judge-model"),
        # read only by a judge: dropped in silence before
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--judge-workers", "8"],
         "--judge-workers sets how many requests go to the LLM judge"),
        (["score", "--subset", "csn", "--data", str(tmp_path), "--predictions", "p.jsonl", "--judge-workers", "8"],
         "--judge-workers sets how many requests go to the LLM judge"),
        # output places, checked before the run: a report was written after hours of ECGBench, and failed there
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(a_file)],
         "is a file; --out names a folder"),
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--report", str(a_file)],
         "is a file; --report names a folder"),
        (["compare", str(tmp_path), str(tmp_path), "--data", str(tmp_path), "--changes", str(tmp_path)],
         "is a directory, not a --changes file"),
        (["compare", str(tmp_path), str(tmp_path), "--data", str(tmp_path), "--report", str(a_file)],
         "is a file; --report names a folder"),
        # the ranges an option takes: a run of no samples, more judge requests than a judge server takes
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--limit", "0"], "--limit"),
        (["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path), "--judge-url", "http://x",
          "--judge-model", "m", "--judge-workers", "33"], "--judge-workers"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(eval_group, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pulse-edge: error: ") and message in lines[0], lines


def test_ecgbench_on_a_folder_without_subsets(tmp_path: Path) -> None:
    result = CliRunner().invoke(eval_group, ["ecgbench", "--model", str(tmp_path), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "no ECGBench subset found" in result.output


def test_missing_optional_dependencies_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.benchmarks.common.plots import require_plotting
    from pulse_edge.calibration.datasets.ecgbench.readers import find_subset, load_samples
    from pulse_edge.errors import ConfigError

    (tmp_path / "mmmu-ecg.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ConfigError, match=r"needs pyarrow: install pulse-edge\[bench\]"):
        load_samples(find_subset(tmp_path, "mmmu-ecg"))
    with pytest.raises(ConfigError, match=r"need matplotlib: install pulse-edge\[bench\]"):
        require_plotting()


def test_a_bundle_with_torch_settings_is_refused_before_the_run_pins_them(tmp_path: Path) -> None:
    """Refused after run.json was written, the settings would be pinned there and lock every rerun out."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")  # what makes a folder a bundle for --backend auto
    out = tmp_path / "run"
    result = CliRunner().invoke(eval_group, ["ecgbench", "--model", str(bundle), "--data", str(tmp_path),
                                             "--device", "cuda", "--out", str(out)])
    assert result.exit_code == 2 and "--device: settings of the torch backend" in result.output, result.output
    assert not (out / "run.json").exists()
