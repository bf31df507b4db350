"""`pulse-edge bench backends`: the backends side by side on one random PULSE-shaped model.

    one random PULSE-shaped model (checkpoint + fp32 bundle made from it), and in ONE process:
    transformers generate | torch reference | ONNX Runtime, each: vision (5 tiles), prefill
    (~2950 positions), decode tokens/s at a fixed context, peak RSS, achieved bandwidth;
    plus the pipeline's own overhead per decode step (ORT)

Absolute times on a shared machine drift; ratios measured in the same run hold,
which is why the backends are measured side by side in one process and the
bandwidth is measured in the same run. This module makes the model, runs the
measurements and prints the table; the per-backend benches and the meter are in
backend_runs.py. torch, transformers and onnxruntime are imported inside the
functions that use them; the CLI imports this module only when a command runs.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.host import HostWindow, busy_reason
from pulse_edge.benchmarks.common.machine import machine_info, model_info
from pulse_edge.benchmarks.common.made import ensure_made
from pulse_edge.benchmarks.common.measure import (
    Stat,
    bandwidth_probe,
    bandwidth_report,
    dir_size_bytes,
    load_average,
    machine_with_load,
    torch_threads,
)
from pulse_edge.benchmarks.common.probes import READ, Probes
from pulse_edge.benchmarks.common.roofline import (
    GB,
    GIB,
    Bandwidth,
    DecoderFacts,
    bundle_decoder_facts,
    roofline_entry,
    vicuna_rooflines,
)
from pulse_edge.benchmarks.common.rounds import RoundProber, best_read, round_bounds, round_fractions
from pulse_edge.benchmarks.common.tables import (
    BUSY_MARK,
    decoder_line,
    gib,
    machine_lines,
    markdown_table,
    num,
    percent,
    pp,
)
from pulse_edge.benchmarks.perf.backend_runs import (
    BackendMeter,
    GenerateBench,
    OrtBench,
    TorchBench,
    bench_inputs,
    interleaved,
    pipeline_overhead,
)
from pulse_edge.errors import ConfigError

PREFILL_POSITIONS = 2950  # a 2880-image-token prompt plus the llava_v1 text around it
# Per width: default runs and timed decode steps; chosen so the real-width run stays near 10 minutes on 2 cores.
WIDTH_DEFAULTS = {"tiny": {"runs": 5, "decode_tokens": 32}, "real": {"runs": 3, "decode_tokens": 16}}
WIDTH_SHAPES = {"tiny": {"full_shape": False, "hidden": 64}, "real": {"full_shape": True, "hidden": 4096}}
FULL_MODEL_NOTE = ("the full 32-layer PULSE-7B does not fit here in fp32: 6.74 B parameters x 4 bytes = 27 GB of "
                   "weights against {ram} GiB of RAM, so the real width (4096, MLP 11008, vocab 32000, full CLIP "
                   "tower) runs with {layers} decoder layer(s) instead; per-token decoder cost scales with layers")


# ---------------------------------------------------------------- bench backends: the model

@dataclass(frozen=True)
class BackendsConfig:
    width: str = "tiny"
    layers: int = 2
    runs: int | None = None  # None: WIDTH_DEFAULTS
    warmup: int = 1
    context: int = 3000
    decode_tokens: int | None = None  # None: WIDTH_DEFAULTS
    prefill_positions: int = PREFILL_POSITIONS
    work: Path | None = None
    threads: int = 0
    seed: int = 0
    bandwidth_bytes: int = GIB

    def __post_init__(self) -> None:
        if self.width not in WIDTH_DEFAULTS:
            raise ConfigError(f"--width {self.width!r} is not one of {', '.join(WIDTH_DEFAULTS)}")

    @property
    def timed_runs(self) -> int:
        return self.runs or WIDTH_DEFAULTS[self.width]["runs"]

    @property
    def steps(self) -> int:
        return self.decode_tokens or WIDTH_DEFAULTS[self.width]["decode_tokens"]


@dataclass(frozen=True)
class PreparedModel:
    checkpoint: Path
    bundle: Path
    seconds: float
    reused: bool


def _check_checkpoint(checkpoint: Path, cfg: BackendsConfig) -> None:
    """A cached checkpoint must have the asked shape."""
    info = model_info(checkpoint)
    expected = (WIDTH_SHAPES[cfg.width]["hidden"], cfg.layers)
    if (info["hidden_size"], info["layers"]) != expected:
        raise ConfigError(f"{checkpoint} holds hidden {info['hidden_size']} x {info['layers']} layers, not the "
                          f"asked {expected[0]} x {expected[1]}: use another --work directory")


def _check_bundle(checkpoint: Path, bundle: Path) -> None:
    """A cached bundle must be the fp32 export of that very checkpoint: the backends compare one model."""
    from pulse_edge.runtime.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    if manifest.precision != "fp32" or Path(manifest.source.checkpoint) != checkpoint.resolve():
        raise ConfigError(f"{bundle} is not the fp32 bundle of {checkpoint}: use another --work directory")


def run_cli(args: list[str], what: str, progress: Callable[[str], None]) -> None:
    """One pulse-edge command in a child process, so that this process starts the measurements clean:
    an export leaves gigabytes of freed-but-kept heap behind, which would count in every peak RSS here."""
    done = subprocess.run([sys.executable, "-m", "pulse_edge.cli.main", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        raise ConfigError(f"{what} failed: {lines[-1]}")
    progress(done.stdout.strip())


def prepare_model(cfg: BackendsConfig, work: Path, progress: Callable[[str], None]) -> PreparedModel:
    """The random checkpoint and its fp32 bundle in `work`, made by the project's own make-tiny and export commands,
    and reused where made so already (benchmarks/common/made.py)."""
    checkpoint, bundle = work / "checkpoint", work / "bundle-fp32"
    started = time.perf_counter()
    # --full-shape writes bf16 files (half the disk and the write); both backends load the same fp32 values
    full = ["--full-shape"] if WIDTH_SHAPES[cfg.width]["full_shape"] else []
    make = ["make-tiny", str(checkpoint), *full, "--layers", str(cfg.layers), "--seed", str(cfg.seed)]
    export = ["export", str(checkpoint), "-o", str(bundle), "--precision", "fp32", "--validation", "quick"]
    reused = ensure_made(checkpoint, make, partial(run_cli, what="make-tiny", progress=progress), progress,
                         saying=f"writing a random {cfg.width}-width checkpoint with {cfg.layers} decoder layers "
                         f"to {checkpoint}")
    _check_checkpoint(checkpoint, cfg)
    reused &= ensure_made(bundle, export, partial(run_cli, what="export", progress=progress), progress, inputs=make,
                          saying=f"exporting the fp32 bundle (quick validation) to {bundle}")
    _check_bundle(checkpoint, bundle)
    return PreparedModel(checkpoint, bundle, time.perf_counter() - started, reused=reused)


@contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    """The given directory (kept), or a temporary one removed at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    temp = Path(tempfile.mkdtemp(prefix="pulse-edge-bench-"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- bench backends: the measurements

MEASURES = {"vision_ms": "vision", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


METHODS = {  # how each column was measured, printed under the table
    "order": "one process holds ORT and the torch reference (transformers runs on the reference's language "
             "model); each measurement warms every backend up, then times them in turn, run after run, so that "
             "other processes slow them alike (bursts shorter than a run still can skew one: see cores)",
    "vision": "5 tiles of a 2200x1700 print: torch = PulseReference.vision_features (tower + projector); "
              "ORT = VisionEngine.run (vision.onnx); transformers = the torch reference's number (transformers "
              "has no class for PULSE's flat layout; the reference is built from its CLIP and LLaMA blocks)",
    "prefill": "{positions} positions of embedding-table rows (random ids): torch = export.torch_backend.prefill "
               "(what TorchEngine.prefill runs); ORT = DecoderEngine.forward after reset, in the runtime's chunks; "
               "transformers = generate(inputs_embeds, max_new_tokens=1, greedy): prefill + one greedy token + "
               "generate's setup",
    "decode": "{steps} steps per run at {context} positions of context: ORT = DecoderEngine.forward with "
              "DecoderEngine.length set to {context} - 1 before each step (the cost depends only on the length); "
              "torch = decode_one_token on a DynamicCache of {context} - 1 random positions, cropped back after "
              "each step; transformers = generate({steps} + 1 new tokens) from that cache (inputs_embeds of {context} "
              "positions), clocked per token by a streamer: the {steps} steps after the first token, with "
              "generate's own per-step work",
    "bandwidth": "achieved GB/s = decode tok/s x bytes one step must read (decoder weights + KV at the context); "
                 "% of read BW = median over the quiet decode rounds of the round's achieved GB/s against the "
                 "better of the read probes taken just before and just after that round (common/rounds.py); the "
                 "roofline is drawn at the best of those probes",
    "memory": "own = what loading the backend added to the process RSS (its weights; torch's includes the random "
              "decode cache) + the most one of its calls raised the RSS (activations, arenas, cache copies): "
              "about its peak on its own; transformers shares the reference's loaded model",
    "cores": "CPU seconds per wall second during the backend's calls, this process / everything else on the "
             "machine (/proc/stat, steal included): others well above 0 means its numbers are contended; "
             "memory traffic from outside this VM does not show there (the read probes beside the rounds do)",
}


def _summaries(backends: dict[str, dict[str, Any]], facts: DecoderFacts, context: int, rounds: DecodeRounds,
               read: Bandwidth) -> dict[str, dict[str, Any]]:
    """Each backend's decode against the read bound: the roofline at the best probe beside the decode rounds, and
    each round over the better of its two neighbouring probes (the median over quiet rounds, or None: busy)."""
    out, per_step, bounds = {}, facts.bytes_per_token(context), round_bounds(rounds.probes, "read")
    for key, result in backends.items():
        entry = {k: v.to_dict() if isinstance(v, Stat) else v for k, v in result.items()}
        decode = result["decode_tokens_per_s"]
        entry.update(roofline_entry(facts, read, context, decode.p50))
        entry["fraction_of_read"] = round_fractions([t * per_step for t in decode.values], bounds, rounds.windows)
        out[key] = entry
    return out


def run_backends(cfg: BackendsConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare (or reuse) the model, then measure bandwidth and the three backends in this process."""
    started = time.perf_counter()
    with work_dir(cfg.work) as work:
        prepared = prepare_model(cfg, work, progress)
        progress(f"model ready in {prepared.seconds:.0f} s")
        machine = machine_with_load()
        samples = {"start": bandwidth_probe(cfg.bandwidth_bytes, progress, "start", threads=cfg.threads)}
        backends, overhead, rounds = _measure_backends(prepared, cfg, progress)
        gc.collect()  # the backends are unreachable now: free them before the end probe allocates its arrays
        samples["end"] = bandwidth_probe(cfg.bandwidth_bytes, progress, "end", threads=cfg.threads)
        model = {**model_info(prepared.checkpoint), "width": cfg.width, "bundle": str(prepared.bundle),
                 "bundle_bytes_on_disk": dir_size_bytes(prepared.bundle), "prepared_s": prepared.seconds,
                 "reused": prepared.reused, "work_kept": cfg.work is not None}
        facts = bundle_decoder_facts(prepared.bundle)
    # The meters reset the high-water mark around every load and call, so the process's peak (bandwidth
    # probes aside: their 2 GiB of arrays say nothing about the model) is the largest one they saw.
    peak = max(b["meter"]["peak_rss_bytes"] for b in backends.values())
    read = best_read(rounds.probes)  # a probe before each decode round and after the last: never none
    return {"kind": "backends", "machine": {**machine, "load_average_end": load_average()}, "model": model,
            "bandwidth": bandwidth_report(samples)[1], "decoder": facts.to_dict(), "settings": _settings(cfg),
            "backends": _summaries(backends, facts, cfg.context, rounds, read),
            "decode_round_read_gb_s": [p.read / GB for p in rounds.probes],
            "decode_host": {"rounds": [w.to_dict() for w in rounds.windows], "busy": busy_reason(rounds.windows)},
            "host": {phase: {"rounds": [w.to_dict() for w in windows], "busy": busy_reason(windows)}
                     for phase, windows in rounds.phases.items()},
            "pipeline_overhead": overhead, "methods": _methods(cfg),
            "pulse7b_rooflines": vicuna_rooflines(read.read, cfg.context),
            "notes": _notes(cfg), "peak_rss_bytes": peak, "elapsed_s": time.perf_counter() - started}


def _check_room(prepared: PreparedModel, cfg: BackendsConfig) -> None:
    """Both models stay loaded side by side: refuse up front rather than push the machine into the OOM killer
    (~3 x the bundle: ORT's weights, torch's fp32 copy, and the prefill's activations)."""
    if cfg.context > read_max_length(prepared.bundle):
        raise ConfigError(f"--context {cfg.context} exceeds the bundle's KV length "
                          f"{read_max_length(prepared.bundle)}")
    from pulse_edge.runtime.engines.memory import mem_available_bytes

    need, available = 3 * dir_size_bytes(prepared.bundle), mem_available_bytes()
    if available is not None and need > available:
        raise ConfigError(f"the side-by-side run needs about {gib(need)} of free memory, {gib(available)} is "
                          "available: close other programs or use fewer --layers")


@dataclass(frozen=True)
class DecodeRounds:
    """The read probes beside the decode rounds (one before each, one after the last) and the host over every
    phase's rounds (vision, prefill, decode)."""

    probes: list[Probes]
    phases: dict[str, list[HostWindow]]

    @property
    def windows(self) -> list[HostWindow]:
        """The decode rounds' host windows, which the read fractions are judged by."""
        return self.phases["decode"]


def _measure_backends(prepared: PreparedModel, cfg: BackendsConfig, progress: Callable[[str], None],
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], DecodeRounds]:
    """Load ORT and the torch reference side by side, then measure vision, prefill and decode with the
    backends interleaved, then the ORT pipeline's own overhead."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch_threads(cfg.threads)
    _check_room(prepared, cfg)
    inputs = bench_inputs(prepared.bundle, cfg)
    meters = {key: BackendMeter() for key in ("transformers", "torch", "ort")}
    progress("loading the bundle into onnxruntime")
    ort = meters["ort"].load(lambda: OrtBench(prepared.bundle, inputs, cfg))
    progress("loading the checkpoint into the torch reference")
    reference = meters["torch"].load(lambda: TorchBench(prepared.checkpoint, inputs, cfg))
    benches = [GenerateBench(reference, inputs, cfg), reference, ort]
    results: dict[str, dict[str, Any]] = {b.key: {"name": b.name} for b in benches}
    prober = RoundProber("decode", (READ,), cfg.timed_runs, cfg.bandwidth_bytes, cfg.threads, progress)
    hosts: dict[str, list[HostWindow]] = {method: [] for method in MEASURES.values()}  # was each round quiet?
    for measure, method in MEASURES.items():
        decode = method == "decode"
        progress(f"{method}: {cfg.warmup} warm-up + {cfg.timed_runs} timed runs per backend, interleaved"
                 + (", a read probe before each round and after the last" if decode else ""))
        stats = interleaved(benches, method, cfg, meters, before_round=prober if decode else None,
                            windows=hosts[method])
        if decode:
            prober()
        for key, stat in stats.items():
            results[key][measure] = stat
    progress("onnxruntime: pipeline overhead (1 warm-up + 3 timed Conversation.ask)")
    overhead = meters["ort"].call(lambda: pipeline_overhead(ort.pipeline, inputs.image, cfg.steps + 1))
    results["transformers"]["vision_ms"] = results["torch"]["vision_ms"]
    results["transformers"]["vision_note"] = "the torch reference's modules and number"
    for key, meter in meters.items():
        results[key]["meter"] = meter.to_dict()
    return results, overhead, DecodeRounds(prober.taken, hosts)


def read_max_length(bundle: Path) -> int:
    from pulse_edge.runtime.bundle.manifest import read_manifest

    return read_manifest(bundle).kv.max_length


def _settings(cfg: BackendsConfig) -> dict[str, Any]:
    return {"width": cfg.width, "layers": cfg.layers, "runs": cfg.timed_runs, "warmup": cfg.warmup,
            "context": cfg.context, "decode_steps": cfg.steps, "prefill_positions": cfg.prefill_positions,
            "threads": cfg.threads, "seed": cfg.seed}


def _methods(cfg: BackendsConfig) -> dict[str, str]:
    values = {"positions": cfg.prefill_positions, "steps": cfg.steps, "context": cfg.context}
    return {key: text.format(**values) for key, text in METHODS.items()}


def _notes(cfg: BackendsConfig) -> list[str]:
    notes = ["random weights: these numbers are about speed and memory only, never accuracy"]
    if cfg.width == "real":
        notes.append(FULL_MODEL_NOTE.format(ram=machine_info()["ram_gib"], layers=cfg.layers))
    return notes


# ---------------------------------------------------------------- bench backends: the table

def _memory_cell(meter: dict[str, Any], shared: bool) -> str:
    working = "n/a" if meter["working_bytes"] is None else gib(meter["working_bytes"])
    resident = "shared" if shared else gib(meter["resident_bytes"])
    return f"{resident} + {working}"


def _backend_row(entry: dict[str, Any], busy: set[str]) -> list[str]:
    """One backend's cells; those of a phase whose rounds were busy (`busy`: the phases) are marked, as the
    table sets the backends side by side."""
    meter, shared = entry["meter"], "vision_note" in entry
    return [entry["name"], pp(entry["vision_ms"], busy="vision" in busy) + (" (=torch)" if shared else ""),
            pp(entry["prefill_ms"], busy="prefill" in busy), pp(entry["decode_tokens_per_s"], 1, busy="decode" in busy),
            num(entry["achieved_gb_s"]),
            "busy" if entry["fraction_of_read"] is None else percent(entry["fraction_of_read"]),
            num(entry["roofline_tokens_per_s"]),
            _memory_cell(meter, shared), f"{num(meter['cores_used'], 2)} / {num(meter['others_cores'], 2)}"]


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    e2e, busy = overhead["end_to_end"], overhead["busy"]
    how = f"median of {overhead['runs']} Conversation.ask after {overhead['warmup']} warm-up{BUSY_MARK if busy else ''}"
    lines = [f"the same model end to end (ORT, {how}, {overhead['prompt_tokens']} prompt positions): "
             f"preprocess {e2e['preprocess_ms']:.0f} ms, vision {e2e['vision_ms']:.0f} ms, prefill "
             f"{e2e['prefill_ms']:.0f} ms, time to first token {e2e['time_to_first_token_ms']:.0f} ms"]
    if not overhead["decode_steps"]:
        return [*lines, f"pipeline overhead: not measured (the answer stopped after "
                        f"{overhead['generated_tokens']} token: {overhead['stop_reason']})"]
    share = "busy" if overhead["overhead_percent"] is None else f"{overhead['overhead_percent']:.1f}%"
    return [*lines, f"pipeline overhead outside the engine (embedding splice, sampling, detokenizing, loop): "
                    f"{overhead['overhead_ms_per_step']:.2f} ms per decode step = {share} of the decode loop "
                    f"({overhead['decode_steps']} steps: loop {overhead['loop_ms']:.0f} ms, bare "
                    f"DecoderEngine.forward {overhead['engine_forward_ms']:.0f} ms)"
                    + (f"; {busy}" if busy else "")]


def backends_table(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["model"]
    header = ["backend", "vision ms (5 tiles)", f"prefill ms ({s['prefill_positions']} pos)",
              f"decode tok/s @ {s['context']}", "achieved GB/s", "% of read BW", "roofline tok/s",
              "memory: loaded + working", "cores: ours / others"]
    busy_phases = {phase for phase, host in report["host"].items() if host["busy"]}
    busy_phases |= {"decode"} if report["decode_host"]["busy"] else set()
    rows = [_backend_row(entry, busy_phases) for entry in report["backends"].values()]
    rooflines = ", ".join(f"{p} {v:.1f}" for p, v in report["pulse7b_rooflines"].items())
    busy = report["decode_host"]["busy"]
    return "\n".join([
        *machine_lines(report, use="a description of the machine; the decode bound is the read probes beside the "
                                   "decode rounds (below)"),
        f"model: random PULSE-shaped, {s['width']} width (hidden {m['hidden_size']}), {m['layers']} decoder layers; "
        f"fp32 bundle {gib(m['bundle_bytes_on_disk'])} on disk; {'reused' if m['reused'] else 'made'} in "
        f"{m['prepared_s']:.0f} s",
        decoder_line(report["decoder"]),
        "read bandwidth probed before each decode round and after the last (GB/s, one array): "
        + ", ".join(f"{v:.1f}" for v in report["decode_round_read_gb_s"]),
        *([f"no fraction: decode {busy}"] if busy else []),
        *(f"{phase}: {host['busy']}; its columns come from busy rounds: no ratio between backends holds"
          for phase, host in report["host"].items() if phase != "decode" and host["busy"]),
        f"{s['runs']} timed runs after {s['warmup']} warm-up per measurement; decode {s['decode_steps']} steps per "
        f"run; threads {s['threads'] or 'one per core'}; cells: p50 / p95",
        "", markdown_table(header, rows), "",
        *_overhead_lines(report["pipeline_overhead"]),
        f"full PULSE-7B decoder (32 layers; the KV cache each precision's CPU bundle stores: fp32, fp16, int8, "
        f"int8) at this bandwidth and {s['context']} positions, roofline tok/s: {rooflines}",
        *(f"note: {n}" for n in report["notes"]),
        *(f"{k}: {v}" for k, v in report["methods"].items()),
        f"total {report['elapsed_s']:.0f} s; process peak RSS {gib(report['peak_rss_bytes'])}"])
