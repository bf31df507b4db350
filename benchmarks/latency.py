"""Latency suite: `pulse-edge bench latency` (one model, real ECG prints) and `bench backends` (side by side).

    bench latency:  ECG print (letter 200/300 dpi, A4 300 dpi) -> Conversation.ask x (warm-up + runs)
                    -> p50/p95 of preprocess, vision, prefill, time to first token, decode tokens/s
                    -> beside it the DESIGN §7 roofline at this machine's measured bandwidth
    bench backends: one random PULSE-shaped model (checkpoint + fp32 bundle made from it), and in ONE process:
                    transformers generate | torch reference | ONNX Runtime, each: vision (5 tiles), prefill
                    (~2950 positions), decode tokens/s at a fixed context, peak RSS, achieved bandwidth;
                    plus the pipeline's own overhead per decode step (ORT)

Absolute times on a shared machine drift; ratios measured in the same run hold,
which is why the backends are measured side by side in one process and the
bandwidth is measured in the same run. torch, transformers and onnxruntime are
imported inside the functions that use them; the CLI imports this module only
when a command runs.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.benchmarks.ecgbench_env import machine_info, model_info
from pulse_edge.benchmarks.roofline import (
    GB,
    GIB,
    Bandwidth,
    achieved_bandwidth,
    bytes_per_token,
    kv_bytes_per_position,
    measure_bandwidth,
    roofline_tokens_per_s,
    vicuna_rooflines,
)
from pulse_edge.errors import ConfigError

# Common ECG print sizes in pixels (width x height): what a cart's scanner or PDF export produces.
PRINT_SIZES = {(2200, 1700): "letter 200 dpi", (3300, 2550): "letter 300 dpi", (3508, 2480): "A4 300 dpi"}
TIMING_FIELDS = ("preprocess_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")
PREFILL_POSITIONS = 2950  # a 2880-image-token prompt plus the llava_v1 text around it (DESIGN §7)
BENCH_IMAGE = (2200, 1700)  # letter at 200 dpi: 672x672 grid, 4 tiles + base = 5 tiles, 2880 image tokens
# Per width: default runs and timed decode steps; chosen so the real-width run stays near 10 minutes on 2 cores.
WIDTH_DEFAULTS = {"tiny": {"runs": 5, "decode_tokens": 32}, "real": {"runs": 3, "decode_tokens": 16}}
WIDTH_SHAPES = {"tiny": {"full_shape": False, "hidden": 64}, "real": {"full_shape": True, "hidden": 4096}}
RU_MAXRSS_UNIT = {"darwin": 1}  # bytes on macOS; KiB on Linux and the BSDs
RSS_NOTE = "peak resident set size (RSS) of the whole benchmark process, from getrusage ru_maxrss"
PEAK_NOTE = ("peak resident set size (RSS) of the process from loading the model to its last run (Linux VmHWM, "
             "reset after the bandwidth probe freed its arrays; what ru_maxrss reports from that point)")
FULL_MODEL_NOTE = ("the full 32-layer PULSE-7B does not fit here in fp32: 6.74 B parameters x 4 bytes = 27 GB of "
                   "weights against {ram} GiB of RAM, so the real width (4096, MLP 11008, vocab 32000, full CLIP "
                   "tower) runs with {layers} decoder layer(s) instead; per-token decoder cost scales with layers")


# ---------------------------------------------------------------- measurement helpers

@dataclass(frozen=True)
class Stat:
    """p50 and p95 (linear interpolation, as numpy.percentile) over the timed runs."""

    p50: float
    p95: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no timed runs")
        p50, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
        return cls(p50=float(p50), p95=float(p95), values=tuple(float(v) for v in values))

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "values": list(self.values)}


def peak_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss): loading, every run, everything."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT.get(sys.platform, 1024)


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def peak_since_reset(reset_worked: bool) -> int:
    """The high-water mark since `_reset_peak` (VmHWM), or the process's ru_maxrss where it could not reset."""
    return (_proc_status_bytes("VmHWM") if reset_worked else None) or peak_rss_bytes()


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dir_size_bytes(path: Path) -> int:
    """Bytes on disk of a bundle or checkpoint directory (the directory itself may be a link)."""
    root = path.resolve()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _gib(value: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below (a tiny model's bundle is a few MiB)."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


# ---------------------------------------------------------------- what one decode step reads

@dataclass(frozen=True)
class DecoderFacts:
    """Bytes one decode step must read: every decoder weight (the embedding table only by one row,
    so it is left out), and the KV cache of every position of context."""

    weight_bytes: int
    kv_bytes_per_position: float
    layers: int
    kv_heads: int
    head_dim: int
    kv_itemsize: int
    hidden_size: int
    source: str

    def bytes_per_token(self, context: int) -> float:
        return bytes_per_token(self.weight_bytes, self.kv_bytes_per_position, context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KV_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def bundle_decoder_facts(bundle: Path) -> DecoderFacts:
    """From the manifest: the decoder graph's files (its initializers live in the external data)."""
    from pulse_edge.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    kv = manifest.kv
    sizes = manifest.graphs["decoder"].sizes
    return DecoderFacts(weight_bytes=int(sum(sizes.values())),
                        kv_bytes_per_position=kv_bytes_per_position(kv.layers, kv.kv_heads, kv.head_dim,
                                                                    KV_ITEMSIZE[kv.dtype]),
                        layers=kv.layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                        kv_itemsize=KV_ITEMSIZE[kv.dtype], hidden_size=manifest.text.hidden_size,
                        source=f"bundle manifest: {', '.join(sizes)} ({manifest.precision})")


def torch_decoder_facts(lm: Any) -> DecoderFacts:
    """From the loaded language model: its parameters (bar the embedding table) x their dtype size."""
    cfg = lm.config
    params = [p for name, p in lm.named_parameters() if "embed_tokens" not in name]
    itemsize = params[0].element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderFacts(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                        kv_bytes_per_position=kv_bytes_per_position(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                                    head_dim, itemsize),
                        layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                        kv_itemsize=itemsize, hidden_size=cfg.hidden_size,
                        source=f"checkpoint: language-model parameters x {itemsize} bytes")


def roofline_entry(facts: DecoderFacts, bandwidth: Bandwidth, context: float, tokens_per_s: float | None,
                   ) -> dict[str, Any]:
    """The bound and what was achieved against it, at one context length."""
    per_token = facts.bytes_per_token(round(context))
    bound = roofline_tokens_per_s(bandwidth.best, facts.weight_bytes, facts.kv_bytes_per_position, round(context))
    achieved = achieved_bandwidth(tokens_per_s, per_token) if tokens_per_s else None
    return {"context": context, "bytes_per_token": per_token, "roofline_tokens_per_s": bound,
            "achieved_gb_s": achieved / GB if achieved is not None else None,
            "fraction_of_bandwidth": achieved / bandwidth.best if achieved is not None else None}


# ---------------------------------------------------------------- bench latency

@dataclass(frozen=True)
class LatencyConfig:
    model: Path
    runs: int = 5
    warmup: int = 1
    sizes: tuple[tuple[int, int], ...] = tuple(PRINT_SIZES)
    max_new_tokens: int = 32
    backend: str = "auto"
    provider: str = "cpu"
    threads: int = 0
    bandwidth_bytes: int = GIB
    question: str | None = None


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'2200x1700,3300x2550' -> ((2200, 1700), (3300, 2550))."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError as e:
            raise ConfigError(f"--sizes takes WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {item!r}") from e
        if width < 1 or height < 1:
            raise ConfigError(f"--sizes: {item!r} is not a positive size")
        sizes.append((width, height))
    if not sizes:
        raise ConfigError("--sizes names no size")
    return tuple(sizes)


def ecg_print(size: tuple[int, int], seed: int = 1) -> Any:
    """A rendered 12-lead sinus-rhythm print of the given pixel size."""
    from pulse_edge.calibration.ecg_render import render_ecg
    from pulse_edge.calibration.ecg_signals import synthesize_ecg

    return render_ecg(synthesize_ecg("sinus", seed=seed), width_px=size[0], height_px=size[1])


def _open(cfg: LatencyConfig) -> tuple[Any, DecoderFacts]:
    from pulse_edge.pipelines import open_pipeline
    from pulse_edge.runtime.ort_engine import SessionConfig
    from pulse_edge.runtime.pipeline import Pipeline as OrtPipeline

    pipeline = open_pipeline(cfg.model, backend=cfg.backend,
                             session=SessionConfig(provider=cfg.provider, threads=cfg.threads))
    if isinstance(pipeline, OrtPipeline):
        return pipeline, bundle_decoder_facts(cfg.model)
    _torch_threads(cfg.threads)
    return pipeline, torch_decoder_facts(pipeline.model.language_model)


def _torch_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _latency_row(pipeline: Any, size: tuple[int, int], cfg: LatencyConfig) -> dict[str, Any]:
    from pulse_edge.runtime.prompt import DEFAULT_QUESTION

    image = ecg_print(size)
    question = cfg.question or DEFAULT_QUESTION
    results = [pipeline.generate(image, question, max_new_tokens=cfg.max_new_tokens)
               for _ in range(cfg.warmup + cfg.runs)][cfg.warmup:]
    timings = [r.timings for r in results]
    stats = {name: Stat.of([getattr(t, name) for t in timings]) for name in TIMING_FIELDS}
    last = results[-1]
    decoded = stats["decode_tokens_per_s"].p50 > 0  # a random model may stop at EOS after its first token
    if not decoded:
        del stats["decode_tokens_per_s"]
    return {"size": f"{size[0]}x{size[1]}", "print": PRINT_SIZES.get(size, "custom"),
            "image_tokens": last.image_tokens, "prompt_tokens": last.prompt_tokens,
            "generated_tokens": last.generated_tokens, "stop_reason": last.stop_reason,
            "timings": {k: v.to_dict() for k, v in stats.items()},
            "decode_context": last.prompt_tokens + last.generated_tokens / 2}  # the mean over the decode steps


def _with_roofline(row: dict[str, Any], facts: DecoderFacts, bandwidth: Bandwidth) -> dict[str, Any]:
    rate = row["timings"].get("decode_tokens_per_s", {}).get("p50")
    return {**row, **roofline_entry(facts, bandwidth, row["decode_context"], rate)}


def bandwidth_probe(array_bytes: int, progress: Callable[[str], None], when: str) -> Bandwidth:
    progress(f"measuring memory bandwidth ({when}, {_gib(array_bytes)} arrays)")
    return measure_bandwidth(array_bytes)


def bandwidth_report(samples: dict[str, Bandwidth]) -> tuple[Bandwidth, dict[str, Any]]:
    """The best sample is what the roofline uses (the machine did at least that); all are reported,
    since other processes on the machine move both."""
    best = max(samples.values(), key=lambda b: b.best)
    return best, {**best.to_dict(), "samples": {when: b.to_dict() for when, b in samples.items()}}


def run_latency(cfg: LatencyConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure one model on each print size; returns the report (see `latency_table`)."""
    started, machine = time.perf_counter(), _machine()
    samples = {"start": bandwidth_probe(cfg.bandwidth_bytes, progress, "start")}
    reset = _reset_peak()  # the probe's arrays are freed: they would otherwise be the peak of a small model
    progress(f"loading {cfg.model}")
    pipeline, facts = _open(cfg)
    rows = []
    for size in cfg.sizes:
        progress(f"{size[0]}x{size[1]}: {cfg.warmup} warm-up + {cfg.runs} runs")
        rows.append(_latency_row(pipeline, size, cfg))
    peak = peak_since_reset(reset)
    samples["end"] = bandwidth_probe(cfg.bandwidth_bytes, progress, "end")
    bandwidth, bandwidth_dict = bandwidth_report(samples)
    return {"kind": "latency", "machine": {**machine, "load_average_end": _load()}, "model": model_info(cfg.model),
            "backend": "ort" if facts.source.startswith("bundle") else "torch", "settings": _latency_settings(cfg),
            "bandwidth": bandwidth_dict, "decoder": facts.to_dict(),
            "model_bytes_on_disk": dir_size_bytes(cfg.model), "peak_rss_bytes": peak,
            "peak_rss_note": PEAK_NOTE if reset else RSS_NOTE,
            "sizes": [_with_roofline(r, facts, bandwidth) for r in rows], "elapsed_s": time.perf_counter() - started}


def _latency_settings(cfg: LatencyConfig) -> dict[str, Any]:
    return {"runs": cfg.runs, "warmup": cfg.warmup, "max_new_tokens": cfg.max_new_tokens, "provider": cfg.provider,
            "threads": cfg.threads, "question": cfg.question or "default"}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _machine() -> dict[str, Any]:
    """ecgbench_env's description, plus the load average: a busy machine explains a slow run."""
    return {**machine_info(), "load_average": _load()}


# ---------------------------------------------------------------- tables

def _pp(stat: dict[str, Any] | None, digits: int = 0) -> str:
    return "n/a" if stat is None else f"{stat['p50']:.{digits}f} / {stat['p95']:.{digits}f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def machine_lines(report: dict[str, Any]) -> list[str]:
    m, bw = report["machine"], report["bandwidth"]
    samples = "; ".join(f"{when}: read {b['read_gb_s']:.1f}, copy {b['copy_gb_s']:.1f}"
                        for when, b in bw["samples"].items())
    return [f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['platform']}; "
            f"python {m['python']}; load average {' '.join(map(str, m['load_average']))} at start, "
            f"{' '.join(map(str, m['load_average_end']))} at end",
            f"memory bandwidth (numpy, {_gib(bw['array_bytes'])} arrays, {bw['threads']} threads, median of "
            f"{bw['repeats']}; GB/s) {samples} -> the roofline uses {bw['best_gb_s']:.1f} GB/s (the best seen)"]


def _decoder_line(facts: dict[str, Any]) -> str:
    return (f"one decode step reads {_gib(facts['weight_bytes'])} of decoder weights ({facts['source']}) "
            f"+ {facts['kv_bytes_per_position'] / 2**10:.1f} KiB of KV per position of context "
            f"({facts['layers']} layers x 2 x {facts['kv_heads']} heads x {facts['head_dim']} x "
            f"{facts['kv_itemsize']} bytes)")


def latency_table(report: dict[str, Any]) -> str:
    model, s = report["model"], report["settings"]
    header = ["print", "pixels", "image tok", "preprocess ms", "vision ms", "prefill ms", "TTFT ms",
              "decode tok/s", "roofline tok/s", "achieved GB/s"]
    rows = [[r["print"], r["size"], str(r["image_tokens"]), _pp(r["timings"]["preprocess_ms"]),
             _pp(r["timings"]["vision_ms"]), _pp(r["timings"]["prefill_ms"]),
             _pp(r["timings"]["time_to_first_token_ms"]), _pp(r["timings"].get("decode_tokens_per_s"), 1),
             _num(r["roofline_tokens_per_s"]), _num(r["achieved_gb_s"])] for r in report["sizes"]]
    return "\n".join([
        *machine_lines(report),
        f"model: {model['name']} ({report['backend']} backend, {model['precision']}, hidden {model['hidden_size']}, "
        f"{model['layers']} layers); on disk {_gib(report['model_bytes_on_disk'])}; "
        f"peak RSS {_gib(report['peak_rss_bytes'])} ({report['peak_rss_note']})",
        _decoder_line(report["decoder"]),
        f"{s['runs']} runs after {s['warmup']} warm-up, up to {s['max_new_tokens']} new tokens, greedy; cells: "
        "p50 / p95; decode tok/s as Conversation.ask times it (the steps after the first token); roofline at the "
        "mean decode context (prompt + half the generated tokens)",
        "", markdown_table(header, rows)])


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
    from pulse_edge.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    if manifest.precision != "fp32" or Path(manifest.source.get("checkpoint", "")) != checkpoint.resolve():
        raise ConfigError(f"{bundle} is not the fp32 bundle of {checkpoint}: use another --work directory")


def _run_cli(args: list[str], what: str, progress: Callable[[str], None]) -> None:
    """One pulse-edge command in a child process, so that this process starts the measurements clean:
    an export leaves gigabytes of freed-but-kept heap behind, which would count in every peak RSS here."""
    done = subprocess.run([sys.executable, "-m", "pulse_edge.cli", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        raise ConfigError(f"{what} failed: {lines[-1]}")
    progress(done.stdout.strip())


def prepare_model(cfg: BackendsConfig, work: Path, progress: Callable[[str], None]) -> PreparedModel:
    """The random checkpoint and its fp32 bundle in `work`, made once (by the project's own make-tiny
    and export commands) and reused when already there."""
    checkpoint, bundle = work / "checkpoint", work / "bundle-fp32"
    started = time.perf_counter()
    if checkpoint.is_dir():
        _check_checkpoint(checkpoint, cfg)
        if bundle.is_dir():
            _check_bundle(checkpoint, bundle)
            return PreparedModel(checkpoint, bundle, time.perf_counter() - started, reused=True)
    else:
        progress(f"writing a random {cfg.width}-width checkpoint with {cfg.layers} decoder layers to {checkpoint}")
        # --full-shape writes bf16 files (half the disk and the write); both backends load the same fp32 values
        full = ["--full-shape"] if WIDTH_SHAPES[cfg.width]["full_shape"] else []
        _run_cli(["make-tiny", str(checkpoint), *full, "--layers", str(cfg.layers), "--seed", str(cfg.seed)],
                 "make-tiny", progress)
    progress(f"exporting the fp32 bundle (quick validation) to {bundle}")
    _run_cli(["export", str(checkpoint), "-o", str(bundle), "--precision", "fp32", "--validation", "quick"],
             "export", progress)
    return PreparedModel(checkpoint, bundle, time.perf_counter() - started, reused=False)


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


# ---------------------------------------------------------------- bench backends: the inputs

@dataclass(frozen=True)
class BenchInputs:
    """The same inputs for every backend: 5 tiles of a letter print, a ~2950-position prompt of real
    embedding rows (random ids, so activations have the model's scale), and the decode tokens."""

    image: Any
    pixel_values: np.ndarray  # [5, 3, 336, 336]
    prompt: np.ndarray  # [1, P, H] float32
    context_ids: np.ndarray  # [C] int64: the decode context for transformers generate
    step_ids: list[int]  # the tokens fed in the timed decode steps


def bench_inputs(bundle: Path, cfg: BackendsConfig) -> BenchInputs:
    from pulse_edge.runtime.manifest import read_manifest
    from pulse_edge.runtime.preprocess import preprocess

    manifest = read_manifest(bundle)
    image = ecg_print(BENCH_IMAGE)
    table = np.load(bundle / manifest.embedding.file, mmap_mode="r")
    rng = np.random.default_rng(cfg.seed)
    prompt_ids = rng.integers(3, table.shape[0], cfg.prefill_positions)
    return BenchInputs(image=image, pixel_values=preprocess(image, manifest.image).pixel_values,
                       prompt=np.asarray(table[prompt_ids], dtype=np.float32)[None],
                       context_ids=rng.integers(3, table.shape[0], cfg.context),
                       step_ids=[int(i) for i in rng.integers(3, table.shape[0], cfg.steps)])


# ---------------------------------------------------------------- bench backends: ONNX Runtime

class _TimedDecoder:
    """Stands in for a DecoderEngine during one `Conversation.ask`: times each bare `forward`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, float]] = []  # (positions, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self.inner.forward(embeds)
        self.calls.append((embeds.shape[1], time.perf_counter() - start))
        return logits


def pipeline_overhead(pipeline: Any, image: Any, max_new_tokens: int) -> dict[str, Any]:
    """What the pipeline adds per decode step outside the engine: the embedding lookup (the splice),
    sampling, streaming detokenization, the loop. One `Conversation.ask` on the ORT pipeline, timed
    as a whole, against the sum of its bare `DecoderEngine.forward` decode steps."""
    from pulse_edge.runtime.prompt import DEFAULT_QUESTION

    engine = pipeline.engine
    timed = _TimedDecoder(engine.decoder)
    engine.decoder = timed
    try:
        start = time.perf_counter()
        result = pipeline.chat().ask(DEFAULT_QUESTION, image, max_new_tokens=max_new_tokens,
                                     on_text=lambda _piece: None)  # a sink: the stream decoder still runs
        total_ms = (time.perf_counter() - start) * 1e3
    finally:
        engine.decoder = timed.inner
    steps_ms = [seconds * 1e3 for positions, seconds in timed.calls if positions == 1]  # the prefill is one pass
    loop_ms = total_ms - result.timings.time_to_first_token_ms
    overhead_ms = loop_ms - sum(steps_ms)
    return {"decode_steps": len(steps_ms), "generated_tokens": result.generated_tokens,
            "stop_reason": result.stop_reason, "loop_ms": loop_ms, "engine_forward_ms": sum(steps_ms),
            "overhead_ms_per_step": overhead_ms / len(steps_ms) if steps_ms else None,
            "overhead_percent": 100 * overhead_ms / loop_ms if steps_ms and loop_ms > 0 else None,
            "end_to_end": asdict(result.timings), "prompt_tokens": result.prompt_tokens}


def _elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class OrtBench:
    """ONNX Runtime: the bundle's VisionEngine and DecoderEngine, as the lean pipeline holds them."""

    key, name = "ort", "onnxruntime (cpu)"

    def __init__(self, bundle: Path, inputs: BenchInputs, cfg: BackendsConfig) -> None:
        from pulse_edge.runtime.ort_engine import SessionConfig
        from pulse_edge.runtime.pipeline import Pipeline

        self.pipeline = Pipeline.from_bundle(bundle, session=SessionConfig(threads=cfg.threads))
        self.engine, self.inputs, self.context = self.pipeline.engine, inputs, cfg.context
        self.steps = self.engine.embed(inputs.step_ids)  # [K, H]

    def vision(self) -> float:
        return _elapsed_ms(lambda: self.engine.vision.run(self.inputs.pixel_values))

    def prefill(self) -> float:
        self.engine.decoder.reset()
        return _elapsed_ms(lambda: self.engine.decoder.forward(self.inputs.prompt))

    def decode(self) -> float:
        """Tokens/s over K steps, each at `context` positions: setting the length is all it takes,
        since a step's cost depends only on the cache length, not on what the cache holds."""
        decoder = self.engine.decoder
        start = time.perf_counter()
        for row in self.steps:
            decoder.length = self.context - 1
            decoder.forward(row[None, None])
        return len(self.steps) / (time.perf_counter() - start)


def random_cache(lm: Any, length: int, seed: int) -> Any:
    """A DynamicCache holding `length` positions of random keys and values in every layer."""
    import torch
    from transformers import DynamicCache

    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (1, cfg.num_key_value_heads, length, head_dim)
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=cfg)
    dtype = lm.get_input_embeddings().weight.dtype
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=generator, dtype=dtype),
                     torch.randn(shape, generator=generator, dtype=dtype), layer)
    return cache


def _crop_to(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class TorchBench:
    """The torch reference: PulseReference's vision, and what TorchEngine.prefill/step run."""

    key, name = "torch", "torch reference"

    def __init__(self, checkpoint: Path, inputs: BenchInputs, cfg: BackendsConfig) -> None:
        import torch

        from pulse_edge.export.checkpoint import load_checkpoint

        self.model = load_checkpoint(checkpoint, dtype=torch.float32, device="cpu").model
        self.lm, self.context, self.tokens = self.model.language_model, cfg.context, inputs.step_ids
        self.pixels, self.prompt = torch.from_numpy(inputs.pixel_values), torch.from_numpy(inputs.prompt)
        self.cache = random_cache(self.lm, cfg.context - 1, cfg.seed)  # shared with GenerateBench

    def vision(self) -> float:
        import torch

        with torch.inference_mode():
            return _elapsed_ms(lambda: self.model.vision_features(self.pixels))

    def prefill(self) -> float:
        from pulse_edge.export.torch_backend import prefill

        return _elapsed_ms(lambda: prefill(self.lm, self.prompt))

    def decode(self) -> float:
        """decode_one_token + logits to numpy (TorchEngine.step) at `context` positions each step. The crop
        back is a view, but DynamicCache then concatenates: it copies the whole cache every step."""
        from pulse_edge.export.torch_backend import decode_one_token

        start = time.perf_counter()
        for token in self.tokens:
            decode_one_token(self.lm, token, self.cache).float().numpy()
            _crop_to(self.cache, self.context - 1)
        return len(self.tokens) / (time.perf_counter() - start)


class _TokenClock:
    """A generate() streamer that only notes when each put arrives: the prompt's before the prefill,
    then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""

    def rate(self) -> float:
        """Tokens/s between the first new token and the last (times[0] is the prompt's put)."""
        steps = len(self.times) - 2
        if steps < 1:
            raise RuntimeError(f"generate streamed {len(self.times) - 1} tokens; the rate needs 2 or more")
        return steps / (self.times[-1] - self.times[1])


class GenerateBench:
    """transformers' own `generate` (greedy, inputs_embeds) on the reference's language model.
    Its vision is the torch reference's: transformers has no class for PULSE's flat layout."""

    key, name = "transformers", "transformers generate"
    vision = None

    def __init__(self, reference: TorchBench, inputs: BenchInputs, cfg: BackendsConfig) -> None:
        import torch

        self.lm, self.cache, self.context, self.steps = reference.lm, reference.cache, cfg.context, cfg.steps
        self.prompt = reference.prompt
        with torch.inference_mode():
            self.context_embeds = self.lm.get_input_embeddings()(torch.from_numpy(inputs.context_ids))[None]

    def _generate(self, embeds: Any, new_tokens: int, cache: Any = None, streamer: Any = None) -> None:
        """Greedy generate (EOS off: always `new_tokens`); with a filled cache only the uncached tail of
        `embeds` is run."""
        import torch

        with torch.inference_mode():
            self.lm.generate(inputs_embeds=embeds, past_key_values=cache, max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer)

    def prefill(self) -> float:
        return _elapsed_ms(lambda: self._generate(self.prompt, 1))

    def decode(self) -> float:
        """generate(K + 1 new tokens) from the context - 1 cache, clocked per token by a streamer: the K
        steps after the first token, with generate's own per-step work (logits processors, stopping
        criteria, bookkeeping), without its setup."""
        clock = _TokenClock()
        self._generate(self.context_embeds, self.steps + 1, self.cache, streamer=clock)
        _crop_to(self.cache, self.context - 1)
        return clock.rate()


def _machine_busy_s() -> float | None:
    """CPU seconds every process on the machine has used so far (/proc/stat; steal counts: the host
    running something else slows us the same), to tell how busy others kept the cores."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class BackendMeter:
    """Memory and CPU of one backend over its own calls only, since the backends' calls interleave.

    `resident`: what its load added to the RSS (its weights; torch's includes the decode cache).
    `working`: the most one of its calls raised the RSS above where it started (activations, arenas).
    resident + working estimates the backend's peak on its own. `cores_used`: process CPU seconds
    per wall second over its calls; `others_cores`: the same for everything else on the machine
    (other processes, the hypervisor's steal), i.e. how contended its numbers are.
    """

    def __init__(self) -> None:
        self.resident = 0
        self.working: int | None = 0
        self.peak = 0
        self.cpu = self.wall = 0.0
        self.others: float | None = 0.0

    def load(self, make: Callable[[], Any]) -> Any:
        reset = _reset_peak()
        before = _proc_status_bytes("VmRSS") or 0
        made = make()
        self.resident = max((_proc_status_bytes("VmRSS") or 0) - before, 0)
        self.peak = max(self.peak, peak_since_reset(reset))
        return made

    def call(self, fn: Callable[[], Any]) -> Any:
        per_call = _reset_peak()
        before = _proc_status_bytes("VmRSS") or 0
        cpu, wall, busy = time.process_time(), time.perf_counter(), _machine_busy_s()
        value = fn()
        cpu = time.process_time() - cpu
        self.cpu += cpu
        self.wall += time.perf_counter() - wall
        self._add_others(busy, cpu)
        peak = peak_since_reset(per_call)
        self.peak = max(self.peak, peak)
        self.working = max(self.working, peak - before) if per_call and self.working is not None else None
        return value

    def _add_others(self, busy_before: float | None, own_cpu: float) -> None:
        busy_after = _machine_busy_s()
        if busy_before is None or busy_after is None or self.others is None:
            self.others = None
        else:
            self.others += max(busy_after - busy_before - own_cpu, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"resident_bytes": self.resident, "working_bytes": self.working, "peak_rss_bytes": self.peak,
                "cores_used": self.cpu / self.wall if self.wall > 0 else None, "busy_s": self.wall,
                "others_cores": self.others / self.wall if self.wall > 0 and self.others is not None else None}


MEASURES = {"vision_ms": "vision", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


def interleaved(benches: Sequence[Any], method: str, cfg: BackendsConfig,
                meters: dict[str, BackendMeter]) -> dict[str, Stat]:
    """Warm every backend up, then time them in turn, run after run: a machine that gets busier or
    quieter during the measurement slows them far more alike than back-to-back phases would. Bursts
    shorter than a run can still skew one backend; its `others_cores` says when."""
    active = [b for b in benches if getattr(b, method) is not None]
    for bench in active:
        for _ in range(cfg.warmup):
            meters[bench.key].call(getattr(bench, method))
    values: dict[str, list[float]] = {b.key: [] for b in active}
    for _ in range(cfg.timed_runs):
        for bench in active:
            values[bench.key].append(meters[bench.key].call(getattr(bench, method)))
    return {key: Stat.of(v) for key, v in values.items()}


METHODS = {  # how each column was measured, printed under the table
    "order": "one process holds ORT and the torch reference (transformers runs on the reference's language "
             "model); each measurement warms every backend up, then times them in turn, run after run, so that "
             "other processes slow them alike (bursts shorter than a run still can skew one: see cores)",
    "vision": "5 tiles of a 2200x1700 print: torch = PulseReference.vision_features (tower + projector); "
              "ORT = VisionEngine.run (vision.onnx); transformers = the torch reference's number (transformers "
              "has no class for PULSE's flat layout; the reference is built from its CLIP and LLaMA blocks)",
    "prefill": "{positions} positions of embedding-table rows (random ids): torch = export.torch_backend.prefill "
               "(what TorchEngine.prefill runs); ORT = DecoderEngine.forward after reset; transformers = "
               "generate(inputs_embeds, max_new_tokens=1, greedy): prefill + one greedy token + generate's setup",
    "decode": "{steps} steps per run at {context} positions of context: ORT = DecoderEngine.forward with "
              "DecoderEngine.length set to {context} - 1 before each step (the cost depends only on the length); "
              "torch = decode_one_token on a DynamicCache of {context} - 1 random positions, cropped back after "
              "each step; transformers = generate({steps} + 1 new tokens) from that cache (inputs_embeds of {context} "
              "positions), clocked per token by a streamer: the {steps} steps after the first token, with "
              "generate's own per-step work",
    "bandwidth": "achieved GB/s = decode tok/s x bytes one step must read (decoder weights + KV at the context); "
                 "% = of the measured bandwidth the roofline uses",
    "memory": "own = what loading the backend added to the process RSS (its weights; torch's includes the random "
              "decode cache) + the most one of its calls raised the RSS (activations, arenas, cache copies): "
              "about its peak on its own; transformers shares the reference's loaded model",
    "cores": "CPU seconds per wall second during the backend's calls, this process / everything else on the "
             "machine (/proc/stat, steal included): others well above 0 means its numbers are contended; "
             "memory traffic from outside this VM does not show there (the bandwidth probes at start and end do)",
}


def _summaries(backends: dict[str, dict[str, Any]], facts: DecoderFacts, bandwidth: Bandwidth,
               context: int) -> dict[str, dict[str, Any]]:
    out = {}
    for key, result in backends.items():
        entry = {k: v.to_dict() if isinstance(v, Stat) else v for k, v in result.items()}
        entry.update(roofline_entry(facts, bandwidth, context, result["decode_tokens_per_s"].p50))
        out[key] = entry
    return out


def run_backends(cfg: BackendsConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare (or reuse) the model, then measure bandwidth and the three backends in this process."""
    started = time.perf_counter()
    with work_dir(cfg.work) as work:
        prepared = prepare_model(cfg, work, progress)
        progress(f"model ready in {prepared.seconds:.0f} s")
        machine = _machine()
        samples = {"start": bandwidth_probe(cfg.bandwidth_bytes, progress, "start")}
        backends, overhead = _measure_backends(prepared, cfg, progress)
        samples["end"] = bandwidth_probe(cfg.bandwidth_bytes, progress, "end")
        model = {**model_info(prepared.checkpoint), "width": cfg.width, "bundle": str(prepared.bundle),
                 "bundle_bytes_on_disk": dir_size_bytes(prepared.bundle), "prepared_s": prepared.seconds,
                 "reused": prepared.reused, "work_kept": cfg.work is not None}
        facts = bundle_decoder_facts(prepared.bundle)
    bandwidth, bandwidth_dict = bandwidth_report(samples)
    # The meters reset the high-water mark around every load and call, so the process's peak (bandwidth
    # probes aside: their 2 GiB of arrays say nothing about the model) is the largest one they saw.
    peak = max(b["meter"]["peak_rss_bytes"] for b in backends.values())
    return {"kind": "backends", "machine": {**machine, "load_average_end": _load()}, "model": model,
            "bandwidth": bandwidth_dict, "decoder": facts.to_dict(), "settings": _settings(cfg),
            "backends": _summaries(backends, facts, bandwidth, cfg.context),
            "pipeline_overhead": overhead, "methods": _methods(cfg),
            "pulse7b_rooflines": vicuna_rooflines(bandwidth.best, cfg.context),
            "notes": _notes(cfg), "peak_rss_bytes": peak, "elapsed_s": time.perf_counter() - started}


def _check_room(prepared: PreparedModel, cfg: BackendsConfig) -> None:
    """Both models stay loaded side by side: refuse up front rather than push the machine into the OOM killer
    (~3 x the bundle: ORT's weights, torch's fp32 copy, and the prefill's activations)."""
    if cfg.context > read_max_length(prepared.bundle):
        raise ConfigError(f"--context {cfg.context} exceeds the bundle's KV length "
                          f"{read_max_length(prepared.bundle)}")
    from pulse_edge.export.checkpoint import mem_available_bytes

    need, available = 3 * dir_size_bytes(prepared.bundle), mem_available_bytes()
    if available is not None and need > available:
        raise ConfigError(f"the side-by-side run needs about {_gib(need)} of free memory, {_gib(available)} is "
                          "available: close other programs or use fewer --layers")


def _measure_backends(prepared: PreparedModel, cfg: BackendsConfig, progress: Callable[[str], None],
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Load ORT and the torch reference side by side, then measure vision, prefill and decode with the
    backends interleaved, then the ORT pipeline's own overhead."""
    import transformers

    transformers.logging.set_verbosity_error()
    _torch_threads(cfg.threads)
    _check_room(prepared, cfg)
    inputs = bench_inputs(prepared.bundle, cfg)
    meters = {key: BackendMeter() for key in ("transformers", "torch", "ort")}
    progress("loading the bundle into onnxruntime")
    ort = meters["ort"].load(lambda: OrtBench(prepared.bundle, inputs, cfg))
    progress("loading the checkpoint into the torch reference")
    reference = meters["torch"].load(lambda: TorchBench(prepared.checkpoint, inputs, cfg))
    benches = [GenerateBench(reference, inputs, cfg), reference, ort]
    results: dict[str, dict[str, Any]] = {b.key: {"name": b.name} for b in benches}
    for measure, method in MEASURES.items():
        progress(f"{method}: {cfg.warmup} warm-up + {cfg.timed_runs} timed runs per backend, interleaved")
        for key, stat in interleaved(benches, method, cfg, meters).items():
            results[key][measure] = stat
    progress("onnxruntime: pipeline overhead (one Conversation.ask)")
    overhead = meters["ort"].call(lambda: pipeline_overhead(ort.pipeline, inputs.image, cfg.steps + 1))
    results["transformers"]["vision_ms"] = results["torch"]["vision_ms"]
    results["transformers"]["vision_note"] = "the torch reference's modules and number"
    for key, meter in meters.items():
        results[key]["meter"] = meter.to_dict()
    return results, overhead


def read_max_length(bundle: Path) -> int:
    from pulse_edge.runtime.manifest import read_manifest

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


def _memory_cell(meter: dict[str, Any], shared: bool) -> str:
    working = "n/a" if meter["working_bytes"] is None else _gib(meter["working_bytes"])
    resident = "shared" if shared else _gib(meter["resident_bytes"])
    return f"{resident} + {working}"


def _backend_row(entry: dict[str, Any]) -> list[str]:
    fraction, meter, shared = entry["fraction_of_bandwidth"], entry["meter"], "vision_note" in entry
    return [entry["name"], _pp(entry["vision_ms"]) + (" (=torch)" if shared else ""),
            _pp(entry["prefill_ms"]), _pp(entry["decode_tokens_per_s"], 1), _num(entry["achieved_gb_s"]),
            "n/a" if fraction is None else f"{100 * fraction:.0f}%", _num(entry["roofline_tokens_per_s"]),
            _memory_cell(meter, shared), f"{_num(meter['cores_used'], 2)} / {_num(meter['others_cores'], 2)}"]


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    e2e = overhead["end_to_end"]
    lines = [f"the same model end to end (ORT, one Conversation.ask, {overhead['prompt_tokens']} prompt positions): "
             f"preprocess {e2e['preprocess_ms']:.0f} ms, vision {e2e['vision_ms']:.0f} ms, prefill "
             f"{e2e['prefill_ms']:.0f} ms, time to first token {e2e['time_to_first_token_ms']:.0f} ms"]
    if overhead["overhead_percent"] is None:
        return [*lines, f"pipeline overhead: not measured (the answer stopped after "
                        f"{overhead['generated_tokens']} token: {overhead['stop_reason']})"]
    return [*lines, f"pipeline overhead outside the engine (embedding splice, sampling, detokenizing, loop): "
                    f"{overhead['overhead_ms_per_step']:.2f} ms per decode step = "
                    f"{overhead['overhead_percent']:.1f}% of the decode loop ({overhead['decode_steps']} steps: "
                    f"loop {overhead['loop_ms']:.0f} ms, bare DecoderEngine.forward "
                    f"{overhead['engine_forward_ms']:.0f} ms)"]


def backends_table(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["model"]
    header = ["backend", "vision ms (5 tiles)", f"prefill ms ({s['prefill_positions']} pos)",
              f"decode tok/s @ {s['context']}", "achieved GB/s", "% of measured BW", "roofline tok/s",
              "memory: loaded + working", "cores: ours / others"]
    rows = [_backend_row(entry) for entry in report["backends"].values()]
    rooflines = ", ".join(f"{p} {v:.1f}" for p, v in report["pulse7b_rooflines"].items())
    return "\n".join([
        *machine_lines(report),
        f"model: random PULSE-shaped, {s['width']} width (hidden {m['hidden_size']}), {m['layers']} decoder layers; "
        f"fp32 bundle {_gib(m['bundle_bytes_on_disk'])} on disk; {'reused' if m['reused'] else 'made'} in "
        f"{m['prepared_s']:.0f} s",
        _decoder_line(report["decoder"]),
        f"{s['runs']} timed runs after {s['warmup']} warm-up per measurement; decode {s['decode_steps']} steps per "
        f"run; threads {s['threads'] or 'one per core'}; cells: p50 / p95",
        "", markdown_table(header, rows), "",
        *_overhead_lines(report["pipeline_overhead"]),
        f"full PULSE-7B decoder (32 layers, fp16 KV) at this bandwidth and {s['context']} positions, roofline "
        f"tok/s: {rooflines}",
        *(f"note: {n}" for n in report["notes"]),
        *(f"{k}: {v}" for k, v in report["methods"].items()),
        f"total {report['elapsed_s']:.0f} s; process peak RSS {_gib(report['peak_rss_bytes'])}"])
