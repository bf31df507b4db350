"""`pulse-edge bench`: the roofline arithmetic against docs/performance.md's bounds, the bandwidth probe, and both
commands end to end on the tiny model (numbers positive and ordered, JSON complete)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.common.measure import Stat
from pulse_edge.benchmarks.common.roofline import (
    achieved_bandwidth,
    kv_bytes_per_position,
    measure_bandwidth,
    roofline_tokens_per_s,
    vicuna_rooflines,
)
from pulse_edge.benchmarks.perf.backends import work_dir
from pulse_edge.benchmarks.perf.latency import parse_sizes
from pulse_edge.cli.bench import bench_group
from pulse_edge.errors import ConfigError

HEAVY = ("numpy", "PIL", "torch", "transformers", "onnxruntime")
ORIN_BANDWIDTH = 204.8e9  # Jetson AGX Orin (docs/performance.md, bounds)
VICUNA_FP16_KV = kv_bytes_per_position(layers=32, kv_heads=32, head_dim=128, itemsize=2)


@pytest.fixture(scope="module")
def quick_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle
    from pulse_edge.export.validate.parity import ValidationPlan

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bench") / "bundle",
                         ExportOptions(precision="fp32", plan=ValidationPlan.quick()))


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(bench_group, args)
    assert result.exit_code == 0, result.output
    return result.output


def _assert_stat(stat: dict) -> None:
    assert stat["p50"] > 0 and stat["p50"] <= stat["p95"]
    assert all(v > 0 for v in stat["values"])


def test_kv_bytes_per_token_of_vicuna_7b_fp16_is_half_a_mib() -> None:
    assert VICUNA_FP16_KV == 32 * 2 * 4096 * 2 == 0.5 * 2**20


def test_roofline_reproduces_design_section_7() -> None:
    # docs/performance.md's device table is the weight-only bound: 204.8 GB/s / 13.5 GB = 15.2 tok/s ("15").
    assert roofline_tokens_per_s(ORIN_BANDWIDTH, 13.5e9, VICUNA_FP16_KV, context=0) == pytest.approx(15.17, abs=0.01)
    # With the 2880-image-token prompt's KV read as well (3000 positions x 0.5 MiB = 1.57 GB) the bound is lower.
    expected = 204.8e9 / (13.5e9 + 3000 * 524288)
    assert roofline_tokens_per_s(ORIN_BANDWIDTH, 13.5e9, VICUNA_FP16_KV, context=3000) == pytest.approx(expected)
    assert expected == pytest.approx(13.59, abs=0.01)
    bounds = vicuna_rooflines(ORIN_BANDWIDTH, context=0)  # the weights a step reads: no token table
    assert bounds["int8"] == pytest.approx(30.1, abs=0.1) and bounds["int4"] == pytest.approx(58.5, abs=0.1)
    assert bounds["fp16"] == pytest.approx(15.50, abs=0.01)  # 6.607 B parameters x 2 bytes
    # at an ECG prompt's context, each precision's own KV cache is read too: fp32 4 bytes, int8/int4 1 byte
    at_3000 = vicuna_rooflines(ORIN_BANDWIDTH, context=3000)
    assert at_3000["fp32"] == pytest.approx(204.8e9 / (6_607_343_616 * 4 + 3000 * 2**20))
    assert at_3000["int4"] == pytest.approx(204.8e9 / (3.5e9 + 3000 * 2**18))


def test_achieved_bandwidth_is_tokens_times_bytes() -> None:
    assert achieved_bandwidth(10.0, 2e9) == pytest.approx(20e9)


def test_bandwidth_measurement_is_positive() -> None:
    bandwidth = measure_bandwidth(64 * 2**20, repeats=3)
    assert bandwidth.read > 0 and bandwidth.copy > 0
    assert bandwidth.best == max(bandwidth.read, bandwidth.copy)
    assert bandwidth.to_dict()["best_gb_s"] == pytest.approx(bandwidth.best / 1e9)


def test_stat_percentiles() -> None:
    stat = Stat.of([4.0, 1.0, 3.0, 2.0])
    assert stat.p50 == pytest.approx(2.5) and stat.p95 == pytest.approx(3.85)
    with pytest.raises(ValueError):
        Stat.of([])


def test_parse_sizes() -> None:
    assert parse_sizes("2200x1700, 3508X2480") == ((2200, 1700), (3508, 2480))
    for bad in ("", "2200", "axb", "0x10"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)
    with pytest.raises(ConfigError, match="'10x10' is smaller than the runtime reads"):
        parse_sizes("2200x1700,10x10")  # refused before the probes and the load, not by the pipeline after them


def test_bench_latency_refuses_a_missing_model_before_probing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from pulse_edge.benchmarks.perf import latency

    monkeypatch.setattr(latency, "bandwidth_probe", lambda *a, **k: pytest.fail("probed before checking --model"))
    result = CliRunner().invoke(bench_group, ["latency", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_a_temporary_work_dir_is_removed() -> None:
    with work_dir(None) as path:
        assert path.is_dir()
    assert not path.exists()


def test_the_machine_line_tells_cpu_generations_and_libraries_apart() -> None:
    """"AMD EPYC" named a Zen 4 and a Zen 5 VM alike, and nothing said which ONNX Runtime ran, while the docs set
    their figures side by side and the kernels choose AMX or AVX-512 by the CPU's flags."""
    from pulse_edge.benchmarks.common.machine import ISA_FLAGS, machine_info, machine_text
    from pulse_edge.runtime.kernels.build import cpu_flags

    m = machine_info()
    assert m["isa"] == [flag for flag in ISA_FLAGS if flag in cpu_flags()]
    text = machine_text(m)
    assert f"{m['cores']} cores" in text and "numpy " in text and m["libraries"]["numpy"] in text
    if Path("/proc/cpuinfo").is_file():
        assert m["cpu_id"] and f"({m['cpu_id']})" in text and "family" in m["cpu_id"]
    old = {"cpu": "AMD EPYC", "cores": 2, "ram_gib": 23.5}  # a record from before
    assert machine_text(old) == "AMD EPYC, 2 cores, 23.5 GiB RAM"
    assert "torch" in m["libraries"] and "avx512bw" in ISA_FLAGS  # what the torch rows and the kernels depend on


def test_the_machine_counts_the_cores_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `taskset -c 0` on 2 CPUs the line said 2 cores and the bandwidth probe ran 2 threads."""
    from pulse_edge.benchmarks.common import machine, roofline

    monkeypatch.setattr(machine, "usable_cpus", lambda: 1)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    m = machine.machine_info()
    assert m["cores"] == 1 and "1 of 2 cores (affinity)" in machine.machine_text(m)
    monkeypatch.setattr(roofline, "usable_cpus", lambda: 1)
    assert roofline.measure_bandwidth(8 * 2**20, repeats=1, copy=False).threads == 1


def test_importing_the_group_pulls_in_nothing_heavy() -> None:
    code = ("import sys, json; import pulse_edge.cli.bench; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_bench_latency_on_a_tiny_bundle(quick_bundle: Path, tmp_path: Path, small_probes: None,
                                        quiet_host: None) -> None:
    out = tmp_path / "latency.json"
    printed = _invoke(["latency", "--model", str(quick_bundle), "--runs", "3", "--warmup", "1",
                       "--sizes", "2200x1700,3508x2480", "--max-new-tokens", "6", "--bandwidth-mib", "64",
                       "--json", str(out)])
    assert "| print | pixels |" in printed and "machine:" in printed and "peak RSS" in printed
    report = json.loads(out.read_text())
    assert report["backend"] == "ort" and report["peak_rss_bytes"] > 0 and report["model_bytes_on_disk"] > 0
    assert report["prefilled_by"] == "decoder graph" and "prompts prefilled by the decoder graph" in printed
    assert report["decoded_by"] == "decoder graph" and "decode steps by the decoder graph" in printed
    assert report["bandwidth"]["best_gb_s"] > 0 and "probes beside the runs left out" in report["peak_rss_note"]
    assert [row["size"] for row in report["sizes"]] == ["2200x1700", "3508x2480"]
    for row in report["sizes"]:
        assert row["image_tokens"] == 2880 and row["prompt_tokens"] > 2880
        assert set(row["timings"]) == {"preprocess_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms",
                                       "decode_tokens_per_s"}
        for stat in row["timings"].values():
            _assert_stat(stat)
            assert len(stat["values"]) == 3
        best_read = max(p["read_gb_s"] for p in row["probes"]) * 1e9  # the roofline at the best probe beside the runs
        assert row["roofline_tokens_per_s"] == pytest.approx(best_read / row["bytes_per_token"])
        assert row["achieved_gb_s"] > 0
        _assert_fractions_from_own_probes(row, report)
    assert "bounds probed before each run and after the last" in printed and "prefill % of fp32 peak" in printed
    assert report["compute_bound"]["bound"] == "fp32"  # an fp32 bundle: its GEMMs are MLAS's SGEMM
    # a size whose runs were busy has its cells marked, not only a line under the table that says so
    from pulse_edge.benchmarks.perf.latency import latency_table

    assert "(busy)" not in printed
    report["sizes"][0]["host"]["busy"] = "host busy: 0 of 3 rounds quiet (need 3); e.g. other processes used 1 core"
    rows = [line for line in latency_table(report).splitlines() if line.startswith("| ")][1:]
    assert rows[0].count(" (busy)") == 5 and " (busy)" not in rows[1]


def _assert_fractions_from_own_probes(row: dict, report: dict) -> None:
    """A probe before each run and one after the last, read and fp32 (an fp32 bundle's GEMMs); every fraction
    recomputed from the report's own numbers: each run against the better of its two neighbouring probes, the
    median over the runs."""
    probes = row["probes"]
    assert [list(p["bandwidth"]) for p in probes] == [[f"{row['size']}, before round {r}"] for r in (1, 2, 3)] + [
        [f"{row['size']}, after"]]
    assert all(p["read_gb_s"] > 0 and p["fp32_tflops"] > 0 and p["int8_peak_tops"] is None for p in probes)
    assert all(b["copy_gb_s"] is None for p in probes for b in p["bandwidth"].values())  # one array, read only
    peak = [max(a["fp32_tflops"], b["fp32_tflops"]) * 1e12 for a, b in itertools.pairwise(probes)]
    read = [max(a["read_gb_s"], b["read_gb_s"]) * 1e9 for a, b in itertools.pairwise(probes)]
    t, ops = row["timings"], report["ops"]
    tiles = row["vision_tiles"]
    assert tiles == row["image_tokens"] // 576 == 5  # the flat merge: 576 tokens per tile, base view + 2 x 2
    # the mean context over the decode steps: the prompt and half the answer (from the row's own counts)
    assert row["decode_context"] == row["prompt_tokens"] + row["generated_tokens"] / 2
    per_step = report["decoder"]["weight_bytes"] + report["decoder"]["kv_bytes_per_position"] * round(
        row["prompt_tokens"] + row["generated_tokens"] / 2)
    expected = {
        "vision_of_compute_peak": [ops["vision_ops_per_tile"] * tiles / (ms / 1e3) / b
                                   for ms, b in zip(t["vision_ms"]["values"], peak, strict=True)],
        "prefill_of_compute_peak": [ops["decoder_ops_per_position"] * row["prompt_tokens"] / (ms / 1e3) / b
                                    for ms, b in zip(t["prefill_ms"]["values"], peak, strict=True)],
        "decode_of_read": [tok * per_step / b for tok, b in zip(t["decode_tokens_per_s"]["values"], read, strict=True)]}
    for key, values in expected.items():
        assert row["fractions"][key] == pytest.approx(np.median(values), rel=1e-9), key


def test_bench_latency_on_a_checkpoint_uses_torch(tiny_checkpoint: Path, tmp_path: Path, small_probes: None,
                                                  quiet_host: None) -> None:
    out = tmp_path / "latency.json"
    _invoke(["latency", "--model", str(tiny_checkpoint), "--runs", "1", "--warmup", "0", "--sizes", "2200x1700",
             "--threads", "1", "--max-new-tokens", "4", "--bandwidth-mib", "64", "--json", str(out)])  # torch's threads
    report = json.loads(out.read_text())
    assert report["backend"] == "torch" and report["decoder"]["source"].startswith("checkpoint")
    assert report["decoder"]["kv_bytes_per_position"] == 2 * 2 * 4 * 16 * 4  # tiny: 2 layers, 4 heads x 16, fp32
    # the reference runs on this CPU: probed, its work counted from the checkpoint's config
    (row,) = report["sizes"]
    assert report["probed"] and len(row["probes"]) == 2 and row["vision_tiles"] == 5
    assert all(row["fractions"][k] > 0 for k in ("vision_of_compute_peak", "prefill_of_compute_peak"))
    assert report["compute_bound"]["bound"] == "fp32" and row["probes"][0]["fp32_tflops"] > 0


def test_without_onnx_bench_latency_refuses_before_loading(quick_bundle: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The int8 probe builds its graphs with onnx (the bench extra): without it, one line before anything loads."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails, as where it is not installed
    result = CliRunner().invoke(bench_group, ["latency", "--model", str(quick_bundle), "--runs", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "onnx package, which is not installed: install pulse-edge[bench]" in result.output
    assert "loading" not in result.output and "measuring" not in result.output

def _cached_work(tmp_path: Path, checkpoint: Path, bundle: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint").symlink_to(checkpoint)
    (work / "bundle-fp32").symlink_to(bundle)
    return work


def test_bench_backends_tiny_runs_all_three(tiny_checkpoint: Path, quick_bundle: Path, tmp_path: Path,
                                            small_probes: None, quiet_host: None) -> None:
    out = tmp_path / "backends.json"
    work = _cached_work(tmp_path, tiny_checkpoint, quick_bundle)
    printed = _invoke(["backends", "--width", "tiny", "--runs", "2", "--decode-tokens", "8", "--work", str(work),
                       "--bandwidth-mib", "64", "--json", str(out)])
    assert "| transformers generate |" in printed and "| torch reference |" in printed
    assert "| onnxruntime (cpu) |" in printed and "pipeline overhead" in printed
    report = json.loads(out.read_text())
    assert report["model"]["reused"] is True and report["model"]["hidden_size"] == 64
    assert list(report["backends"]) == ["transformers", "torch", "ort"]
    for entry in report["backends"].values():
        for key in ("vision_ms", "prefill_ms", "decode_tokens_per_s"):
            _assert_stat(entry[key])
        assert entry["achieved_gb_s"] > 0 and entry["roofline_tokens_per_s"] > 0
        assert entry["meter"]["peak_rss_bytes"] > 0 and entry["meter"]["cores_used"] > 0
    reads = report["decode_round_read_gb_s"]  # a read probe before each of the 2 decode rounds and after the last
    assert len(reads) == 3 and all(r > 0 for r in reads)
    assert "read bandwidth probed before each decode round and after the last" in printed and "% of read BW" in printed
    bounds = [max(a, b) * 1e9 for a, b in itertools.pairwise(reads)]
    assert {p: len(h["rounds"]) for p, h in report["host"].items()} == {
        "vision": 2, "prefill": 2, "decode": 2}  # every phase's rounds judged (as quiet_host says)
    assert "busy rounds" not in printed
    from pulse_edge.benchmarks.perf.backends import backends_table

    names = ("| transformers generate |", "| torch reference |", "| onnxruntime (cpu) |")
    assert not [line for line in printed.splitlines() if line.startswith(names) and "(busy)" in line]
    report["host"]["prefill"]["busy"] = "host busy: 0 of 2 rounds quiet (need 2); e.g. other processes used 1.2 cores"
    table = backends_table(report)
    assert ("prefill: host busy: 0 of 2 rounds quiet (need 2); e.g. other processes used 1.2 cores; its columns "
            "come from busy rounds") in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(names)]
    assert len(rows) == 3 and all(row[2].endswith("(busy)") and not row[1].endswith("(busy)") for row in rows)
    for entry in report["backends"].values():  # each round against its two neighbours, from the report's numbers
        runs = entry["decode_tokens_per_s"]["values"]
        per_round = [t * entry["bytes_per_token"] / b for t, b in zip(runs, bounds, strict=True)]
        assert entry["fraction_of_read"] == pytest.approx(np.median(per_round))
        assert entry["roofline_tokens_per_s"] == pytest.approx(max(reads) * 1e9 / entry["bytes_per_token"])
    overhead = report["pipeline_overhead"]  # medians of 3 timed asks after a warm-up, each judged
    assert overhead["runs"] == 3 and overhead["busy"] is None and overhead["overhead_percent"] is not None
    assert overhead["decode_steps"] > 0 and overhead["engine_forward_ms"] > 0
    assert 0 < overhead["engine_forward_ms"] <= overhead["loop_ms"]
    assert report["settings"]["context"] == 3000 and report["settings"]["decode_steps"] == 8


def test_a_cached_model_of_another_shape_is_refused(tiny_checkpoint: Path, quick_bundle: Path,
                                                    tmp_path: Path) -> None:
    work = _cached_work(tmp_path, tiny_checkpoint, quick_bundle)
    result = CliRunner().invoke(bench_group, ["backends", "--width", "tiny", "--layers", "3", "--work", str(work)])
    assert result.exit_code == 2
    assert "use another --work directory" in result.output and "Traceback" not in result.output


def test_latency_report_writes_markdown_json_and_a_breakdown_plot(quick_bundle: Path, tmp_path: Path,
                                                                   small_probes: None) -> None:
    from PIL import Image

    from pulse_edge.benchmarks.perf.latency_report import stage_medians

    report_dir = tmp_path / "report"
    _invoke(["latency", "--model", str(quick_bundle), "--runs", "1", "--warmup", "0", "--sizes", "2200x1700",
             "--max-new-tokens", "4", "--bandwidth-mib", "64", "--report", str(report_dir)])
    markdown = (report_dir / "latency.md").read_text()
    assert "machine:" in markdown and "date:" in markdown and "MEANINGLESS for accuracy" in markdown
    assert "| print | pixels |" in markdown
    assert Image.open(report_dir / "latency.png").size[0] > 600
    row = json.loads((report_dir / "latency.json").read_text())["sizes"][0]
    stages = stage_medians(row)
    assert stages["vision"] == row["timings"]["vision_ms"]["p50"]
    rate = row["timings"].get("decode_tokens_per_s", {}).get("p50")
    expected_decode = 1000.0 * (row["generated_tokens"] - 1) / rate if rate else 0.0
    assert stages["decode"] == pytest.approx(expected_decode)


def test_a_gpu_run_is_held_against_no_host_probe(quick_bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run off this host's CPU (ORT CUDA, TensorRT, torch on a GPU): no probes, fractions or roofline, but the
    bytes a decode step reads and the rate it achieved stay, and bench gpu's report reads them."""
    from pulse_edge.benchmarks.perf import gpu_report, latency

    monkeypatch.setattr(latency, "host_bound", lambda cfg, pipeline: False)
    out = tmp_path / "latency.json"
    printed = _invoke(["latency", "--model", str(quick_bundle), "--runs", "1", "--warmup", "0", "--sizes",
                       "2200x1700", "--max-new-tokens", "6", "--bandwidth-mib", "8", "--json", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["sizes"]
    assert report["probed"] is False and row["probes"] == [] and row["fractions"] == {}
    assert "roofline_tokens_per_s" not in row and row["bytes_per_token"] > 0
    assert "no bounds beside the runs" in printed and "fractions:" not in printed and "roofline at" not in printed
    rate = row["timings"]["decode_tokens_per_s"]["p50"]
    assert row["achieved_gb_s"] == pytest.approx(rate * row["bytes_per_token"] / 1e9)
    fraction, _ = gpu_report._ort_decode({"results": {"ort-cuda": report,
                                                      "torch-decode": {"peaks": {"copy_gbps": 100.0}}}})
    assert fraction == pytest.approx(rate / (100e9 / row["bytes_per_token"]))
