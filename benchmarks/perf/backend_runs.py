"""`bench backends`' benches: the same inputs for every backend, one bench per backend, and the meter.

OrtBench (the bundle's VisionEngine and DecoderEngine), TorchBench (the torch
reference) and GenerateBench (transformers' generate on the reference's language
model) each time vision, prefill and decode; `interleaved` runs them in turn,
and a BackendMeter per backend notes memory and CPU over its own calls only;
`pipeline_overhead` times what the ORT pipeline adds outside the engine. torch,
transformers and onnxruntime are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pulse_edge.benchmarks.common.host import HostWindow, busy_reason, host_sample
from pulse_edge.benchmarks.common.measure import Stat, ecg_print, peak_since_reset, proc_status_bytes, reset_peak
from pulse_edge.benchmarks.common.rounds import quiet_median

if TYPE_CHECKING:
    from pulse_edge.benchmarks.perf.backends import BackendsConfig

BENCH_IMAGE = (2200, 1700)  # letter at 200 dpi: 672x672 grid, 4 tiles + base = 5 tiles, 2880 image tokens


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
    from pulse_edge.runtime.bundle.arrays import open_npy
    from pulse_edge.runtime.bundle.manifest import read_manifest
    from pulse_edge.runtime.image.preprocess import preprocess

    manifest = read_manifest(bundle)
    image = ecg_print(BENCH_IMAGE)
    table = open_npy(bundle / manifest.embedding.file)  # a damaged table: one line, before the load would say it
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


def _one_ask(pipeline: Any, image: Any, max_new_tokens: int) -> dict[str, Any]:
    """One `Conversation.ask` timed as a whole, against the sum of its bare `DecoderEngine.forward` decode steps."""
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

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
    return {"decode_steps": len(steps_ms), "generated_tokens": result.generated_tokens,
            "stop_reason": result.stop_reason, "loop_ms": loop_ms, "engine_forward_ms": sum(steps_ms),
            "overhead_ms": loop_ms - sum(steps_ms), "end_to_end": asdict(result.timings),
            "prompt_tokens": result.prompt_tokens}


def pipeline_overhead(pipeline: Any, image: Any, max_new_tokens: int, *, runs: int = 3, warmup: int = 1
                      ) -> dict[str, Any]:
    """What the pipeline adds per decode step outside the engine: the embedding lookup (the splice),
    sampling, streaming detokenization, the loop. `warmup` untimed asks on the ORT pipeline, then `runs`
    timed ones, each with its host window; the figures are medians over the quiet asks (the overhead share is
    a ratio: None, with "busy" saying why, where too few were quiet)."""
    for _ in range(warmup):
        _one_ask(pipeline, image, max_new_tokens)
    asks, windows = [], []
    for _ in range(runs):
        before = host_sample()
        asks.append(_one_ask(pipeline, image, max_new_tokens))
        windows.append(HostWindow.between(before, host_sample()))
    last, busy = asks[-1], busy_reason(windows)
    steps = last["decode_steps"]
    median = {key: float(np.median([a[key] for a in asks])) for key in ("loop_ms", "engine_forward_ms", "overhead_ms")}
    stages = {key: float(np.median([a["end_to_end"][key] for a in asks])) for key in last["end_to_end"]}
    share = quiet_median([100 * a["overhead_ms"] / a["loop_ms"] for a in asks], windows) if steps else None
    return {"decode_steps": steps, "generated_tokens": last["generated_tokens"], "stop_reason": last["stop_reason"],
            "runs": runs, "warmup": warmup, "busy": busy, "loop_ms": median["loop_ms"],
            "engine_forward_ms": median["engine_forward_ms"],
            "overhead_ms_per_step": median["overhead_ms"] / steps if steps else None,
            "overhead_percent": share, "end_to_end": stages, "prompt_tokens": last["prompt_tokens"]}


def _elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class OrtBench:
    """ONNX Runtime: the bundle's VisionEngine and DecoderEngine, as the lean pipeline holds them."""

    key, name = "ort", "onnxruntime (cpu)"

    def __init__(self, bundle: Path, inputs: BenchInputs, cfg: BackendsConfig, session: Any = None,
                 **load: Any) -> None:
        """session: the SessionConfig (default: cfg's threads); load: more Pipeline.from_bundle options."""
        from pulse_edge.runtime.engines.ort import SessionConfig
        from pulse_edge.runtime.pipeline import Pipeline

        self.pipeline = Pipeline.from_bundle(bundle, session=session or SessionConfig(threads=cfg.threads), **load)
        self.engine, self.inputs, self.context = self.pipeline.engine, inputs, cfg.context
        self.steps = self.engine.embed(inputs.step_ids)  # [K, H]

    def vision(self) -> float:
        return _elapsed_ms(lambda: self.engine.vision.run(self.inputs.pixel_values))

    def prefill(self) -> float:
        """The prompt in the runtime's own chunks (BundleEngine.prefill_chunk), on whichever decoder graph
        the runtime picks for them (a bundle's prefill graph when it has one)."""
        decoder, prompt = self.engine.decoder, self.inputs.prompt
        chunk = self.engine.prefill_chunk or prompt.shape[1]

        def run() -> None:
            decoder.reset()
            for start in range(0, prompt.shape[1], chunk):
                decoder.forward(prompt[:, start:start + chunk])
        return _elapsed_ms(run)

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

        from pulse_edge.export.model.checkpoint import load_checkpoint

        self.model = load_checkpoint(checkpoint, dtype=torch.float32, device="cpu").model
        self.lm, self.context, self.tokens = self.model.language_model, cfg.context, inputs.step_ids
        self.pixels, self.prompt = torch.from_numpy(inputs.pixel_values), torch.from_numpy(inputs.prompt)
        self.cache = random_cache(self.lm, cfg.context - 1, cfg.seed)  # shared with GenerateBench

    def vision(self) -> float:
        import torch

        with torch.inference_mode():
            return _elapsed_ms(lambda: self.model.vision_features(self.pixels))

    def prefill(self) -> float:
        from pulse_edge.export.model.torch_backend import prefill

        return _elapsed_ms(lambda: prefill(self.lm, self.prompt))

    def decode(self) -> float:
        """decode_one_token + logits to numpy (TorchEngine.step) at `context` positions each step. The crop
        back is a view, but DynamicCache then concatenates: it copies the whole cache every step."""
        from pulse_edge.export.model.torch_backend import decode_one_token

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


# ---------------------------------------------------------------- bench backends: memory and CPU per backend

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
        reset = reset_peak()
        before = proc_status_bytes("VmRSS") or 0
        made = make()
        self.resident = max((proc_status_bytes("VmRSS") or 0) - before, 0)
        self.peak = max(self.peak, peak_since_reset(reset))
        return made

    def call(self, fn: Callable[[], Any]) -> Any:
        per_call = reset_peak()
        before = proc_status_bytes("VmRSS") or 0
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


def round_order(items: Sequence[Any], r: int) -> list[Any]:
    """Round r's order: reversed every other round, rotated one step every two. Rotation alone keeps each item's
    successor (a, b, c / b, c, a / c, a, b: c is always followed by a); this way every item takes every place
    and follows every other equally often over 2 x len(items) rounds, and no pair dominates before that (two
    items: ABBA; three: abc, cba, bca, bac, cab, acb)."""
    n = len(items)
    if n == 0:
        return []
    base = list(items) if r % 2 == 0 else list(items)[::-1]
    shift = (r // 2) % n
    return base[shift:] + base[:shift]


def interleaved(benches: Sequence[Any], method: str, cfg: BackendsConfig, meters: dict[str, BackendMeter],
                before_round: Callable[[], object] | None = None,
                windows: list[HostWindow] | None = None) -> dict[str, Stat]:
    """Warm every backend up, then time them in turn, run after run: a machine that gets busier or
    quieter during the measurement slows them far more alike than back-to-back phases would. The order
    changes each round (round_order), so no backend always runs right after another's (an ORT session's spinning
    threads slowed whichever ran next by 45-70%: benchmarks/studies/plain_decoder.py). Bursts
    shorter than a run can still skew one backend; its `others_cores` says when. `before_round` runs
    untimed before each round (a bandwidth probe to pair with the round's runs); `windows` gets the
    host's state over each round (benchmarks/common/host.py: was it quiet?)."""
    active = [b for b in benches if getattr(b, method) is not None]
    for bench in active:
        for _ in range(cfg.warmup):
            meters[bench.key].call(getattr(bench, method))
    values: dict[str, list[float]] = {b.key: [] for b in active}
    for round_ in range(cfg.timed_runs):
        if before_round is not None:
            before_round()
        start = host_sample()
        for bench in round_order(active, round_):
            values[bench.key].append(meters[bench.key].call(getattr(bench, method)))
        if windows is not None:
            windows.append(HostWindow.between(start, host_sample()))
    return {key: Stat.of(v) for key, v in values.items()}
