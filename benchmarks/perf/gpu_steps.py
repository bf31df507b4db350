"""The measuring steps of `pulse-edge bench gpu`, each run in a process of its own by gpu_check.py:

    python -m pulse_edge.benchmarks.perf.gpu_steps versions --json FILE
    python -m pulse_edge.benchmarks.perf.gpu_steps make-model DIR [--layers N] --json FILE
    python -m pulse_edge.benchmarks.perf.gpu_steps torch-decode --model DIR [--dtype fp16|bf16] --json FILE

versions      the device, driver, CUDA runtime and the versions of every library the checks touch
make-model    a random real-width PULSE checkpoint (hidden 4096, the full CLIP tower, N decoder layers, bf16),
              made as `pulse-edge make-tiny --full-shape --layers N` makes it: seconds, peak RSS, bytes on disk
torch-decode  the torch backend on that checkpoint on CUDA, as TorchPipeline/TorchEngine run it (eager):

                  projector   mm_projector on the tower's real output [5, 576, 1024] (T = 2880): fused vs plain
                              torch, CUDA events, L2 flushed (benchmarks/perf/projector.py's method)
                  vision      TorchEngine.image_features on a 5-tile 12-lead print, fused vs plain projector
                  prefill     the decoder over PREFILL_POSITIONS embedding rows, a new DynamicCache each run
                  decode      decode_one_token + logits to the host (TorchEngine.step), from that prefill on
                  bounds      the bf16 matmul peak and the device copy bandwidth measured in this process;
                              decode tokens/s against copy bandwidth / bytes read per token (roofline.py)

One process per step: a crash or a hang in CUDA ends that step alone, under its own timeout. Every step writes
its JSON (the report reads it back) and prints a few lines. torch is imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.measure import Stat, dir_size_bytes, ecg_print, peak_rss_bytes
from pulse_edge.benchmarks.perf.projector import L2_FLUSH_BYTES
from pulse_edge.errors import ConfigError

# Distributions whose versions decide what the checks exercise (absent ones are reported as absent).
PACKAGES = ("torch", "triton", "transformers", "tokenizers", "safetensors", "sentencepiece", "numpy", "pillow",
            "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-rtx", "cupy-cuda13x", "cupy-cuda12x",
            "cuda-bindings", "cuda-python", "nvidia-ml-py", "pytest", "pytest-timeout", "click", "pulse-edge")
BENCH_IMAGE = (2200, 1700)  # letter at 200 dpi: 4 tiles + the base image, 2880 image tokens
PREFILL_POSITIONS = 2950  # a 2880-image-token prompt and the llava_v1 text around it
DTYPES = ("fp16", "bf16", "fp32")  # fp16: the torch backend's default on a GPU
GIB, GIGA, TERA, MS = 2**30, 1e9, 1e12, 1e-3
NO_CUDA_GRAPHS = ("the torch backend (export/model/torch_backend.py) runs eager, one launch per op, with "
                  "transformers' DynamicCache growing by concatenation: it has no CUDA-graph path")


# ---------------------------------------------------------------- versions

def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver() -> dict[str, Any]:
    """Driver version and GPU names from nvidia-smi (it ships with the driver); None where it is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"driver": None, "nvidia_smi": "not found"}
    query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return {"driver": None, "nvidia_smi": f"failed: {e}"}
    rows = [[cell.strip() for cell in line.split(",")] for line in done.stdout.strip().splitlines()]
    return {"driver": rows[0][1] if rows and len(rows[0]) > 1 else None, "nvidia_smi": rows}


def _cuda() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"available": torch.cuda.is_available(), "runtime": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if info["available"]:
        from pulse_edge.benchmarks.perf.projector import describe_device

        info.update(device_count=torch.cuda.device_count(), device=describe_device())
    return info


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def _commit(root: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def versions() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    return {"python": platform.python_version(), "platform": platform.platform(), "commit": _commit(root),
            **_driver(), "cuda": _cuda(), "ort_providers": _ort_providers(),
            "packages": {name: _version(name) for name in PACKAGES}}


def versions_lines(info: dict[str, Any]) -> list[str]:
    cuda, device = info["cuda"], info["cuda"].get("device") or {}
    present = ", ".join(f"{name} {v}" for name, v in info["packages"].items() if v)
    absent = ", ".join(name for name, v in info["packages"].items() if not v)
    return [f"device: {device.get('name', 'no CUDA device')} (sm {device.get('capability', '-')}, "
            f"{device.get('sms', '-')} SMs, {device.get('memory_gib', '-')} GiB, L2 {device.get('l2_mib', '-')} MiB)",
            f"driver {info['driver']}; CUDA runtime {cuda['runtime']}; cuDNN {cuda['cudnn']}; python "
            f"{info['python']}; {info['platform']}; commit {info['commit']}",
            f"onnxruntime providers: {', '.join(info['ort_providers'] or ['(onnxruntime absent)'])}",
            f"packages: {present}", f"absent: {absent or 'none'}"]


# ---------------------------------------------------------------- make-model

def make_model(out: Path, layers: int, seed: int = 0) -> dict[str, Any]:
    """The real-width checkpoint (reused when `out` already holds one of that shape)."""
    import torch

    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint

    info = model_info(out) if (out / "config.json").is_file() else None
    reused = info is not None and (info["hidden_size"], info["layers"]) == (4096, layers)
    start = time.perf_counter()
    if not reused:
        make_tiny_checkpoint(out, TinySpec(seed=seed, full_shape=True, layers=layers, dtype=torch.bfloat16))
    return {"path": str(out), "layers": layers, "reused": reused, "seconds": time.perf_counter() - start,
            "peak_rss_bytes": peak_rss_bytes(), "bytes_on_disk": dir_size_bytes(out),
            "disk_free_bytes": shutil.disk_usage(out).free}


# ---------------------------------------------------------------- torch-decode

class Clock:
    """Timing on one device: `wall` as the backend sees a stage (synchronised after each call), `kernel` for
    one module (CUDA events with the L2 flushed, as bench projector times it), `peaks` for the ceilings. On a CPU
    (the test path: no GPU figure) everything is wall-clock and the ceilings are small probes."""

    def __init__(self, device: Any, runs: int, warmup: int) -> None:
        import torch

        self.device, self.runs, self.warmup = device, runs, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES if self.cuda else 1, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self, fn: Callable[[], Any], runs: int | None = None) -> Stat:
        times = []
        for i in range(self.warmup + (runs or self.runs)):
            start = time.perf_counter()
            fn()
            self.sync()
            if i >= self.warmup:
                times.append((time.perf_counter() - start) / MS)
        return Stat.of(times)

    def kernel(self, fn: Callable[[], Any], runs: int) -> Stat:
        if not self.cuda:
            return self.wall(fn, runs)
        from pulse_edge.benchmarks.perf.projector import time_cuda

        return Stat.of([t / MS for t in time_cuda(fn, runs, self.warmup, self.flush)])

    def peaks(self) -> dict[str, float]:
        import torch

        if self.cuda:
            from pulse_edge.benchmarks.perf.projector import measure_peaks

            return measure_peaks(10, 3, self.flush)
        n, copy_bytes = 512, 64 * 2**20
        a = torch.randn(n, n, dtype=torch.bfloat16)
        src = torch.randn(copy_bytes // 4)
        dst = torch.empty_like(src)
        matmul, copy = self.wall(lambda: a @ a, 3).p50 * MS, self.wall(lambda: dst.copy_(src), 3).p50 * MS
        return {"bf16_matmul_tflops": 2 * n**3 / matmul / TERA, "copy_gbps": 2 * copy_bytes / copy / GIGA,
                "matmul_size": n, "copy_bytes": copy_bytes}


def _describe(device: Any) -> dict[str, Any]:
    if device.type == "cuda":
        from pulse_edge.benchmarks.perf.projector import describe_device

        return describe_device()
    return {"name": "cpu (the test path: no GPU figure)", "capability": "-", "sms": 0, "memory_gib": 0}


def _projector(model: Any, pixels: Any, clock: Clock) -> dict[str, Any]:
    """The projector on the tower's real output, fused (as the backend runs it) and as plain torch."""
    from pulse_edge.kernels.fused_module import FusedProjector, fuse_projector, unfuse_projector

    hidden = model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]  # [5, 576, 1024], a strided view
    fused = isinstance(model.mm_projector, FusedProjector)
    runs = 4 * clock.runs  # a short call: more runs for the same time
    out: dict[str, Any] = {"tokens": hidden.shape[0] * hidden.shape[1], "fused_in_backend": fused}
    if fused:
        y = model.mm_projector(hidden)
        out["fused_ms"] = clock.kernel(lambda: model.mm_projector(hidden), runs).to_dict()
    unfuse_projector(model)
    plain = model.mm_projector(hidden)
    out["eager_ms"] = clock.kernel(lambda: model.mm_projector(hidden), runs).to_dict()
    if fused:
        out["rel_err_vs_eager"] = ((y.float() - plain.float()).norm() / plain.float().norm()).item()
        fuse_projector(model)
    return out


def _vision(engine: Any, model: Any, pre: Any, clock: Clock) -> dict[str, Any]:
    """TorchEngine.image_features with the projector the backend chose and, where that is fused, plain torch."""
    from pulse_edge.kernels.fused_module import FusedProjector, fuse_projector, unfuse_projector

    out = {}
    if isinstance(model.mm_projector, FusedProjector):
        out["fused"] = clock.wall(lambda: engine.image_features(pre)).to_dict()
        unfuse_projector(model)
        out["eager"] = clock.wall(lambda: engine.image_features(pre)).to_dict()
        fuse_projector(model)
    else:
        out["eager"] = clock.wall(lambda: engine.image_features(pre)).to_dict()
    return out


def prefill_flops(layer_params: float, layers: int, hidden: int, positions: int) -> float:
    """2 x decoder-layer parameters x positions (the lm_head runs on the last position only) plus causal
    attention's QK^T and PV: 2 x 2 x positions^2 / 2 x hidden per layer."""
    return 2.0 * layer_params * positions + 2.0 * layers * positions**2 * hidden


def _decode(lm: Any, embeds: Any, tokens: Sequence[int], clock: Clock) -> Stat:
    """Tokens/s over `tokens` steps from a fresh prefill each run; the logits reach the host every step."""
    from pulse_edge.export.model.torch_backend import decode_one_token, prefill

    rates = []
    for i in range(clock.warmup + clock.runs):
        _, cache = prefill(lm, embeds)
        clock.sync()
        start = time.perf_counter()
        for token in tokens:
            decode_one_token(lm, token, cache).float().cpu()
        if i >= clock.warmup:
            rates.append(len(tokens) / (time.perf_counter() - start))
    return Stat.of(rates)


def _inputs(pipe: Any, positions: int, decode_tokens: int, seed: int) -> tuple[Any, list[int], Any]:
    """Prompt ids (random rows of the vocabulary: activations of the model's scale), decode tokens, a 12-lead print."""
    import torch

    from pulse_edge.runtime.image.preprocess import preprocess

    vocab = pipe.model.language_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (positions,), generator=gen)
    tokens = [int(t) for t in torch.randint(3, vocab, (decode_tokens,), generator=gen)]
    return ids, tokens, preprocess(ecg_print(BENCH_IMAGE), pipe.loaded.config.image)


def torch_decode(model_dir: Path, dtype: str = "fp16", runs: int = 5, warmup: int = 2, decode_tokens: int = 32,
                 positions: int = PREFILL_POSITIONS, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    import torch

    from pulse_edge.benchmarks.common.roofline import torch_decoder_facts
    from pulse_edge.export.model.torch_backend import TorchEngine, TorchPipeline, prefill

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("torch-decode needs a CUDA GPU and torch sees none; --device cpu is the test path")
    start = time.perf_counter()
    pipe = TorchPipeline.from_checkpoint(model_dir, dtype=dtype, device=device)
    load_s = time.perf_counter() - start
    model, lm = pipe.model, pipe.model.language_model
    clock = Clock(model.device, runs, warmup)
    ids, tokens, pre = _inputs(pipe, positions, decode_tokens, seed)
    with torch.inference_mode():
        peaks = clock.peaks()
        embeds = lm.get_input_embeddings()(ids.to(model.device))[None]  # [1, P, H]
        pixels = torch.from_numpy(pre.pixel_values).to(model.device, model.dtype)
        projector = _projector(model, pixels, clock)
        vision = _vision(TorchEngine(model), model, pre, clock)
        prefill_ms = clock.wall(lambda: prefill(lm, embeds))
        decode = _decode(lm, embeds, tokens, clock)
    facts = torch_decoder_facts(lm)
    context = positions + decode_tokens / 2  # the mean context over the decode steps
    per_token = facts.bytes_per_token(round(context))
    bound = peaks["copy_gbps"] * GIGA / per_token
    layer_params = sum(p.numel() for n, p in lm.named_parameters() if ".layers." in n)
    flops = prefill_flops(layer_params, facts.layers, facts.hidden_size, positions)
    return {"device": _describe(model.device), "peaks": peaks, "model": model_info(model_dir), "dtype": dtype,
            "projector_choice": pipe.projector.reason if pipe.projector else None, "load_s": load_s,
            "runs": runs, "warmup": warmup, "projector": projector, "vision_ms": vision,
            "prefill": {"positions": positions, "ms": prefill_ms.to_dict(), "flops": flops,
                        "tflops": flops / (prefill_ms.p50 * MS) / TERA},
            "decode": {"steps": decode_tokens, "context": context, "tokens_per_s": decode.to_dict(),
                       "bytes_per_token": per_token, "bound_tokens_per_s": bound,
                       "fraction_of_bound": decode.p50 / bound, "decoder": facts.to_dict()},
            "cuda_graphs": {"available": False, "reason": NO_CUDA_GRAPHS},
            "gpu_memory_peak_gib": torch.cuda.max_memory_allocated() / GIB if clock.cuda else None}


def torch_decode_lines(r: dict[str, Any]) -> list[str]:
    d, proj, dec = r["decode"], r["projector"], r["decode"]["tokens_per_s"]
    vision = ", ".join(f"{k} {v['p50']:.2f} ms" for k, v in r["vision_ms"].items())
    fused = f"fused {proj['fused_ms']['p50']:.3f} ms, " if "fused_ms" in proj else ""
    return [f"{r['device']['name']}: bf16 matmul {r['peaks']['bf16_matmul_tflops']:.0f} TFLOP/s, copy "
            f"{r['peaks']['copy_gbps']:.0f} GB/s; {r['dtype']}, projector: {r['projector_choice']}",
            f"projector T={proj['tokens']}: {fused}eager {proj['eager_ms']['p50']:.3f} ms; vision: {vision}",
            f"prefill {r['prefill']['positions']} positions: {r['prefill']['ms']['p50']:.2f} ms "
            f"({r['prefill']['tflops']:.0f} TFLOP/s)",
            f"decode: {dec['p50']:.1f} tok/s, bound {d['bound_tokens_per_s']:.1f} tok/s "
            f"({d['fraction_of_bound']:.0%}); CUDA graphs: {r['cuda_graphs']['reason']}"]


# ---------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pulse_edge.benchmarks.perf.gpu_steps",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("versions").add_argument("--json", type=Path, required=True)
    make = sub.add_parser("make-model")
    make.add_argument("out", type=Path)
    make.add_argument("--layers", type=int, default=2, choices=range(1, 33), metavar="1..32")
    make.add_argument("--json", type=Path, required=True)
    decode = sub.add_parser("torch-decode")
    decode.add_argument("--model", type=Path, required=True)
    decode.add_argument("--dtype", choices=DTYPES, default="fp16")
    decode.add_argument("--runs", type=int, default=5)
    decode.add_argument("--warmup", type=int, default=2)
    decode.add_argument("--decode-tokens", type=int, default=32)
    decode.add_argument("--positions", type=int, default=PREFILL_POSITIONS, help="prefill positions")
    decode.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the test path (tiny checkpoints), no GPU figure")
    decode.add_argument("--json", type=Path, required=True)
    return parser


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    if args.step == "versions":
        info = versions()
        return info, versions_lines(info)
    if args.step == "make-model":
        made = make_model(args.out, args.layers)
        return made, [f"{'reused' if made['reused'] else 'made'} {made['path']} in {made['seconds']:.1f} s: "
                      f"{made['bytes_on_disk'] / GIB:.2f} GiB on disk, peak RSS "
                      f"{made['peak_rss_bytes'] / GIB:.2f} GiB, {made['disk_free_bytes'] / GIB:.0f} GiB free"]
    report = torch_decode(args.model, args.dtype, args.runs, args.warmup, args.decode_tokens, args.positions,
                          args.device)
    return report, torch_decode_lines(report)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report, lines = run(args)
    except ConfigError as e:
        print(f"pulse-edge: error: {e}", file=sys.stderr)
        return e.exit_code
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
