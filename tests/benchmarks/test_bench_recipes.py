"""`pulse-edge bench recipes` end to end on the tiny model, with small probes: each measurement's rounds are held
against the probes taken around them, and the report's fractions are those rounds' medians."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.common.host import HostWindow
from pulse_edge.cli.bench import bench_group

RUNS = 3


def _bounds(probes: list[dict], key: str) -> list[float]:
    return [max(a[key], b[key]) for a, b in itertools.pairwise(probes)]


@pytest.mark.slow
def test_bench_recipes_holds_each_round_against_the_probes_around_it(tmp_path: Path, small_probes: None,
                                                                     quiet_host: None) -> None:
    out = tmp_path / "recipes.json"
    result = CliRunner().invoke(bench_group, ["recipes", "--width", "tiny", "--layers", "1", "--recipes", "int8",
                                              "--runs", str(RUNS), "--context", "64", "--threads", "1",
                                              "--no-transformers", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rounds = report["round_probes"]
    assert {m: len(p) for m, p in rounds.items()} == {"vision": RUNS + 1, "prefill": RUNS + 1, "decode": RUNS + 1}
    assert all(p["read_gb_s"] is not None and p["int8_peak_tops"] is None for p in rounds["decode"])
    assert all(p["int8_peak_tops"] is not None and p["read_gb_s"] is None for p in rounds["prefill"])
    row = report["recipes"]["int8"]
    windows = [HostWindow(**{k: v for k, v in w.items() if k != "busy"}) for w in report["host"]["decode"]["rounds"]]
    decode = [t * row["bytes_per_step"] / (b * 1e9) for t, b in
              zip(row["decode_tokens_per_s"]["values"], _bounds(rounds["decode"], "read_gb_s"), strict=True)]
    assert len(windows) == RUNS  # one judged window per round (quiet_host decides how they are judged)
    assert row["fraction_of_read"] == pytest.approx(statistics.median(decode))
    assert "probed before each round and after the last" in result.output
    fp32 = report["recipes"]["fp32"]  # fp32 GEMMs: the int8 peak bounds nothing there
    assert fp32["float_gemms"] and "prefill_fraction_of_int8_peak" not in fp32 and not row["float_gemms"]
    assert "n/a (fp32 GEMMs)" in result.output and "prefill_fraction_of_int8_peak" in row


def test_a_cached_artifact_is_reused_only_as_made_and_another_is_made_again(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--work` reused scales from 2 samples under a header that said 8, and bundles older code exported."""
    from pulse_edge.benchmarks.common import made
    from pulse_edge.errors import ConfigError

    runs: list[list[str]] = []

    def run(args: list[str]) -> None:  # a command that writes its artifact: the last argument
        runs.append(args)
        Path(args[-1]).write_text(" ".join(args))

    scales = tmp_path / "scales.npz"
    two, eight = ["calibrate", "--samples", "2", str(scales)], ["calibrate", "--samples", "8", str(scales)]
    assert made.ensure_made(scales, two, run, print) is False
    assert made.ensure_made(scales, two, run, print) is True and len(runs) == 1  # as asked: reused
    assert made.ensure_made(scales, eight, run, print) is False and scales.read_text().endswith(f"8 {scales}")
    assert made.ensure_made(scales, eight, run, print, inputs=["checkpoint", "other"]) is False  # made from another
    monkeypatch.setattr(made, "code_digest", lambda: "other source")
    assert made.ensure_made(scales, eight, run, print, inputs=["checkpoint", "other"]) is False  # by other code
    assert len(runs) == 4
    unstamped = tmp_path / "bundle-int8"
    unstamped.mkdir()
    with pytest.raises(ConfigError, match="holds no record of how it was made"):
        made.ensure_made(unstamped, ["export", str(unstamped)], run, print)
    assert unstamped.is_dir()  # refused, never removed
    link = tmp_path / "bundle-fp32"
    link.symlink_to(unstamped)
    assert made.ensure_made(link, ["export", str(link)], run, print) is True and len(runs) == 4  # the user's


def test_the_code_digest_follows_the_source_of_the_packages_that_make_artifacts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.benchmarks.common import made

    names = [name for name, _ in made.sources()]
    assert "pulse_edge.export/build/bundle.py" in names and "pulse_edge.calibration/histogram.py" in names
    package = tmp_path / "pe_made_probe"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "step.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = made.code_digest(("pe_made_probe",))
    assert made.code_digest(("pe_made_probe",)) == before
    (package / "sub" / "step.py").write_text("SCALE = 2\n")
    assert made.code_digest(("pe_made_probe",)) != before


def test_a_measurements_cells_are_marked_where_its_rounds_were_busy() -> None:
    from pulse_edge.benchmarks.perf.recipes import _row

    stat = {"p50": 10.0, "p95": 12.0}
    entry = {"name": "onnxruntime int8", "vision_ms": stat, "prefill_ms": stat, "decode_tokens_per_s": stat,
             "decoder_bytes": 2**20, "kv_bytes": 2**20, "meter": {"resident_bytes": 2**20, "working_bytes": None},
             "float_gemms": True}
    assert _row(entry, {"prefill"})[1:4] == ["10 / 12", "10 / 12 (busy)", "10.0 / 12.0"]
    assert _row(entry, set())[1:4] == ["10 / 12", "10 / 12", "10.0 / 12.0"]


def test_the_peak_is_the_highest_stretch_and_abba_alternates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PeakWatch reported only its last stretch's peak; the ABBA order is what keeps a ratio free of which side
    ran second."""
    from pulse_edge.benchmarks.common import measure, rounds

    marks = iter([100, 50])
    monkeypatch.setattr(measure, "peak_since_reset", lambda reset_worked: next(marks))
    monkeypatch.setattr(measure, "reset_peak", lambda: True)
    watch = measure.PeakWatch.start()
    watch.aside(lambda: None)  # the first stretch ends here, at 100
    assert watch.stop() == 100  # the second reached 50 only
    order: list[str] = []
    rounds.abba(lambda: order.append("A"), lambda: order.append("B"), 3)
    assert "".join(order) == "ABBAAB"
