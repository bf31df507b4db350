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
