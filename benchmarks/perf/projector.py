"""`pulse-edge bench projector`: the fused Triton projector against torch eager and torch.compile, on one CUDA GPU.

For T tokens (576 = one tile, 2880 = a 12-lead print, 5 x 2880 = a batch of five prints) and each
precision (bf16; weight-only int8 on bf16 activations; fp8 E4M3 on compute capability >= 8.9):

    fused     pulse_edge.kernels.projector: two Triton GEMMs with fused epilogues
    eager     torch: Linear, GELU, Linear (int8: dequantize the weights, then the same; fp8: torch._scaled_mm
              with row-wise scales around a separate bias + GELU)
    compiled  torch.compile of the eager function (default mode)

Timing (docs/performance.md, method): CUDA events around each call, warm-up first (autotuning, compilation),
the L2 flushed before every timed call by writing a buffer larger than any L2 (the projector's weights,
40 MiB in bf16, would otherwise stay in H100/H200's 50 MB L2 between calls), the median of the runs.
Work counted per call: FLOP = 2 T (1024 x 4096 + 4096 x 4096); bytes = the fewest a call must move
(x and the weights, scales and biases read once, y written once; h's round trip is not counted).
Ceilings measured in the same run: a bf16 8192^3 matmul (torch/cuBLAS) and a 1 GiB device copy
(read + write counted). fp8 rows are set against the bf16 peak too: Hopper's dense fp8 rate is twice it.
Every candidate's output is compared with the twin (kernels/reference.py); the error is in the report.
Without a CUDA GPU (or without triton) the benchmark refuses: it prints no numbers it did not measure.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pulse_edge.benchmarks.common.tables import markdown_table, num
from pulse_edge.errors import ConfigError

TOKENS = (576, 2880, 5 * 2880)
PRECISIONS = ("bf16", "int8", "fp8")
IMPLS = ("fused", "eager", "compiled")
IN_FEATURES, HIDDEN = 1024, 4096
PEAK_MATMUL_SIZE = 8192
COPY_BYTES = 2**30
L2_FLUSH_BYTES = 256 * 2**20  # above every L2 on the GPUs PULSE targets (H100/H200: 50 MB)
FP8_MIN_CAPABILITY = (8, 9)
TERA, GIGA, MS = 1e12, 1e9, 1e-3


@dataclass(frozen=True)
class ProjectorBenchConfig:
    tokens: tuple[int, ...] = TOKENS
    precisions: tuple[str, ...] = PRECISIONS
    runs: int = 20
    warmup: int = 5
    compile: bool = True


def parse_list(text: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if not items or unknown:
        raise ConfigError(f"{text!r}: expected a comma-separated list of {', '.join(allowed or ['integers'])}")
    return items


def parse_tokens(text: str) -> tuple[int, ...]:
    items = parse_list(text)
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ConfigError(f"--tokens {text!r}: expected positive integers, e.g. 576,2880,14400")
    return tuple(int(item) for item in items)


def require_gpu() -> None:
    """One clear line where this cannot measure anything: no torch, no CUDA GPU, no triton."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ConfigError("bench projector needs torch with CUDA: pip install -e .[export,kernels]")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("bench projector needs a CUDA GPU and torch sees none; no numbers are made on a CPU")
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("triton not installed: pip install -e .[kernels]")


def projector_flops(tokens: int) -> float:
    return 2.0 * tokens * (IN_FEATURES * HIDDEN + HIDDEN * HIDDEN)


def projector_bytes(tokens: int, precision: str) -> float:
    """Fewest bytes per call: x (bf16) and y (bf16), the weights at their storage width, fp32 scales, bf16 biases."""
    weight_itemsize = {"bf16": 2, "int8": 1, "fp8": 1}[precision]
    scales = 0 if precision == "bf16" else 2 * HIDDEN * 4
    activations = 2.0 * tokens * (IN_FEATURES + HIDDEN)
    return activations + weight_itemsize * HIDDEN * (IN_FEATURES + HIDDEN) + scales + 2 * 2 * HIDDEN


def describe_device() -> dict[str, Any]:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version()}


def time_cuda(fn: Callable[[], Any], runs: int, warmup: int, flush: Any) -> list[float]:
    """Seconds per call by CUDA events, after `warmup` untimed calls; L2 flushed before each timed call."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * MS)
    return times


def measure_peaks(runs: int, warmup: int, flush: Any) -> dict[str, float]:
    """The two ceilings, measured here: bf16 matmul TFLOP/s and device copy GB/s (read + write)."""
    import torch

    a = torch.randn(PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    matmul = statistics.median(time_cuda(lambda: a @ b, runs, warmup, flush))
    src = torch.randn(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    copy = statistics.median(time_cuda(lambda: dst.copy_(src), runs, warmup, flush))
    return {"bf16_matmul_tflops": 2 * PEAK_MATMUL_SIZE**3 / matmul / TERA, "copy_gbps": 2 * COPY_BYTES / copy / GIGA,
            "matmul_size": PEAK_MATMUL_SIZE, "copy_bytes": COPY_BYTES}


# ---------------------------------------------------------------- the candidates

@dataclass
class Case:
    """The candidates for one (T, precision), and the twin's output they are checked against."""

    candidates: dict[str, Callable[[], Any]]
    twin: Any

    def error(self, out: Any) -> float:
        return ((out.float() - self.twin.float()).norm() / self.twin.float().norm()).item()


def make_case(tokens: int, precision: str, compile_: bool) -> Case:
    """Fresh random inputs of PULSE's projector shape on the GPU (bf16 activations), and the three candidates."""
    import torch

    x = torch.randn(tokens, IN_FEATURES, device="cuda", dtype=torch.bfloat16)
    fc1 = torch.nn.Linear(IN_FEATURES, HIDDEN, device="cuda", dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16)
    fused, eager, twin = _BUILDERS[precision](x, fc1, fc2)
    candidates = {"fused": fused, "eager": lambda: eager(x)}
    if compile_:
        compiled = torch.compile(eager)
        candidates["compiled"] = lambda: compiled(x)
    return Case(candidates, twin)


def _bf16(x: Any, fc1: Any, fc2: Any) -> tuple[Callable[[], Any], Callable[[Any], Any], Any]:
    import torch

    from pulse_edge.kernels import reference
    from pulse_edge.kernels.projector import mlp2x_gelu

    weights = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    module = torch.nn.Sequential(fc1, torch.nn.GELU(), fc2)
    return (lambda: mlp2x_gelu(x, *weights, impl="triton")), module, reference.mlp2x_gelu_ref(x, *weights)


def _int8(x: Any, fc1: Any, fc2: Any) -> tuple[Callable[[], Any], Callable[[Any], Any], Any]:
    import torch.nn.functional as F

    from pulse_edge.kernels.projector import run_int8
    from pulse_edge.kernels.quant import quantize_projector_int8

    q = quantize_projector_int8(fc1, fc2)

    def eager(inputs: Any) -> Any:  # what weight-only int8 costs without a kernel: dequantize on every call
        w1 = q.w1.to(inputs.dtype) * q.s1[:, None].to(inputs.dtype)
        w2 = q.w2.to(inputs.dtype) * q.s2[:, None].to(inputs.dtype)
        return F.linear(F.gelu(F.linear(inputs, w1, q.b1)), w2, q.b2)

    return (lambda: run_int8(x, q, impl="triton")), eager, run_int8(x, q, impl="reference")


def _fp8(x: Any, fc1: Any, fc2: Any) -> tuple[Callable[[], Any], Callable[[Any], Any], Any]:
    from pulse_edge.kernels.projector import run_fp8
    from pulse_edge.kernels.quant import quantize_projector_fp8

    q = quantize_projector_fp8(fc1, fc2, x)
    twin = run_fp8(x, q, impl="reference")
    return (lambda: run_fp8(x, q, impl="triton")), (lambda inputs: _fp8_eager(inputs, q)), twin


def _scaled_linear(a: Any, a_scale: Any, w: Any, w_scale: Any, bias: Any) -> Any:
    """fp32 (a @ w^T) x scales + bias by torch._scaled_mm with row-wise scales (cuBLASLt; Hopper)."""
    import torch

    rows = a_scale.reshape(1, 1).expand(a.shape[0], 1).contiguous()
    acc = torch._scaled_mm(a, w.t(), scale_a=rows, scale_b=w_scale.reshape(1, -1), out_dtype=torch.bfloat16)
    return acc.float() + bias.float()


def _fp8_eager(x: Any, q: Any) -> Any:
    from torch.nn import functional as F

    from pulse_edge.kernels.quant import to_fp8

    h = F.gelu(_scaled_linear(to_fp8(x.float() / q.x_scale), q.x_scale, q.w1, q.s1, q.b1))
    y = _scaled_linear(to_fp8(h / q.h_scale), q.h_scale, q.w2, q.s2, q.b2)
    return y.to(x.dtype)


_BUILDERS = {"bf16": _bf16, "int8": _int8, "fp8": _fp8}


# ---------------------------------------------------------------- rows and the table

def _row(tokens: int, precision: str, impl: str, times: list[float] | None, error: float | None,
         peaks: dict[str, float], failure: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"tokens": tokens, "precision": precision, "impl": impl, "rel_error_vs_twin": error,
                           "failure": failure, "times_ms": None if times is None else [t / MS for t in times]}
    if times:
        median = statistics.median(times)
        tflops = projector_flops(tokens) / median / TERA
        gbps = projector_bytes(tokens, precision) / median / GIGA
        row.update(median_ms=median / MS, tflops=tflops, gbps=gbps,
                   frac_bf16_peak=tflops / peaks["bf16_matmul_tflops"], frac_copy_bw=gbps / peaks["copy_gbps"])
    return row


def _bench_one(tokens: int, precision: str, config: ProjectorBenchConfig, peaks: dict[str, float],
               flush: Any, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each candidate checked against the twin and warmed up, then timed round by round: one call of each per
    round, the order reversed every other round, so that a clock or a neighbour that moves during the run moves
    every candidate alike and a ratio can pair round r with round r."""
    case = make_case(tokens, precision, config.compile)
    errors: dict[str, float | None] = {}
    failures: dict[str, str] = {}
    for impl, fn in case.candidates.items():
        progress(f"T={tokens} {precision} {impl}: checked and warmed up")
        try:
            errors[impl] = case.error(fn())
            time_cuda(fn, 0, config.warmup, flush)
        except Exception as e:  # a baseline this torch lacks (_scaled_mm's row-wise scales) is reported, not fatal
            failures[impl] = f"{type(e).__name__}: {e}"
    live = [impl for impl in case.candidates if impl not in failures]
    times: dict[str, list[float]] = {impl: [] for impl in live}
    progress(f"T={tokens} {precision}: {config.runs} rounds of {', '.join(live)}, interleaved")
    for r in range(config.runs):
        for impl in live if r % 2 == 0 else live[::-1]:
            times[impl] += time_cuda(case.candidates[impl], 1, 0, flush)
    return [_row(tokens, precision, impl, times.get(impl), errors.get(impl), peaks, failures.get(impl))
            for impl in case.candidates]


def run_projector_bench(config: ProjectorBenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    require_gpu()
    import torch

    device = describe_device()
    precisions = [p for p in config.precisions
                  if p != "fp8" or torch.cuda.get_device_capability(0) >= FP8_MIN_CAPABILITY]
    skipped = sorted(set(config.precisions) - set(precisions))
    if skipped:
        progress(f"skipping {', '.join(skipped)}: fp8 needs compute capability 8.9, this GPU is {device['capability']}")
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    progress("measuring the bf16 matmul peak and the copy bandwidth")
    with torch.inference_mode():
        peaks = measure_peaks(config.runs, config.warmup, flush)
        rows = [row for tokens in config.tokens for precision in precisions
                for row in _bench_one(tokens, precision, config, peaks, flush, progress)]
    return {"device": device, "peaks": peaks, "config": asdict(config), "skipped_precisions": skipped,
            "rows": rows}


def projector_table(report: dict[str, Any]) -> str:
    d, p = report["device"], report["peaks"]
    header = ["T", "precision", "impl", "median ms", "TFLOP/s", "GB/s", "of bf16 peak", "of copy BW", "rel err"]
    rows = [[str(r["tokens"]), r["precision"], r["impl"], *_measured(r)] for r in report["rows"]]
    lines = [f"device: {d['name']} (sm {d['capability']}, {d['sms']} SMs, {d['memory_gib']} GiB); torch {d['torch']}, "
             f"CUDA {d['cuda']}, triton {d['triton']}",
             f"measured ceilings: bf16 matmul {p['bf16_matmul_tflops']:.0f} TFLOP/s ({p['matmul_size']}^3), "
             f"copy {p['copy_gbps']:.0f} GB/s (read + write)", "", markdown_table(header, rows)]
    return "\n".join(lines)


def _measured(row: dict[str, Any]) -> list[str]:
    if row.get("failure"):
        return ["failed: " + row["failure"][:60], "", "", "", "", ""]
    error = row["rel_error_vs_twin"]
    return [num(row["median_ms"], 3), num(row["tflops"], 0), num(row["gbps"], 0), f"{row['frac_bf16_peak']:.0%}",
            f"{row['frac_copy_bw']:.0%}", "n/a" if error is None else f"{error:.1e}"]
