"""The allowed values of pulse-edge's settings, each listed once.

Imported by the command line (so `pulse-edge --help` needs nothing heavier than this module) and by the code
that acts on the values, which keeps its own tables keyed by these names (an engine's provider names, a
precision's numpy dtype). Standard library only; the lowest layer of the package.
"""

from __future__ import annotations

# Who serves a model: the lean runtime on ONNX Runtime or on TensorRT engines (`build-engines`), or the torch
# reference (checkpoints only).
BUNDLE_BACKENDS = ("ort", "trt")  # what serves a bundle: its ONNX graphs in ORT, or its TensorRT engines
BACKENDS = ("auto", *BUNDLE_BACKENDS, "torch")
# ONNX Runtime execution providers, by pulse-edge's short names.
PROVIDERS = ("cpu", "cuda", "tensorrt")
# Whether the runtime loads a CPU bundle's prefill graph: when this machine's memory holds it, always, never.
PREFILL_GRAPH_MODES = ("auto", "on", "off")
# a graph cut for a CPU attention kernel (the prefill graph, the decode graph): the kernel where it runs, the kernel
# or an error, the whole graph
ATTENTION_MODES = ("auto", "kernel", "graph")
# Who computes a decode step (runtime/engines/native.py): pulse-edge's own kernels from the decode graph's weights
# (native), or ONNX Runtime running the decode graph (onnx); auto: native where it runs
DECODE_STEPS = ("auto", "native", "onnx")
# ONNX Runtime graph optimisation levels, lowest first (a graph may cap the level it runs at).
OPT_LEVELS = ("disable", "basic", "extended", "all")

# What `export --target` writes graphs for: ONNX Runtime (its fused contrib ops), or TensorRT (standard ONNX only,
# which ONNX Runtime runs too). `--trt-ops`: the opset-24 LLM ops (TensorRT >= 10.15, TensorRT-RTX) or explicit
# ops of opset 18 (21 with int4 blocks) for TensorRT 10.3 (JetPack 6).
EXPORT_TARGETS = ("ort", "tensorrt")
TRT_OPS = ("native", "explicit")
# How a decoder graph writes its KV cache: ORT's GroupQueryAttention, or a standard scatter at `write_index`.
KV_UPDATES = ("gqa", "scatter")
# What `build-engines --target` builds for: TensorRT-RTX (RTX GPUs, ahead of time on any machine), JetPack's
# TensorRT on a Jetson (on the device itself), or whichever of the two is installed.
ENGINE_TARGETS = ("rtx", "jetson", "auto")
# The compute capabilities TensorRT-RTX compiles for (Turing .. Blackwell; no Jetson Orin 8.7).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")

# Precisions a bundle is exported in; quantized ones go through a calibration recipe.
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")
FLOAT_PRECISIONS = ("fp32", "fp16")
QUANTIZED_PRECISIONS = ("int8", "int4", "fp8")
# Precisions a graph in a bundle may carry (a graph's own, e.g. an int8 vision graph in an int4 bundle).
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
# Element types of the tensors a bundle names, as numpy spells them.
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "int8")
# Where the torch backend runs: these, or "cuda:N" for the N-th GPU ("auto": cuda when torch sees one).
TORCH_DEVICES = ("auto", "cpu", "cuda")
# Seeds of the random generators (numpy's and torch's both take any of these).
SEED_RANGE = (0, 2**32 - 1)
# The torch backend's compute dtype ("auto": fp16 on a GPU, fp32 on a CPU).
TORCH_DTYPES = ("auto", "fp32", "bf16", "fp16")
# Calibration loads the reference in one of these ("auto": fp32 when it fits, else the checkpoint's bf16).
CALIBRATION_DTYPES = ("auto", "fp32", "bf16")

# Quantization.
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes (a power of two >= 16)
DEFAULT_BLOCK_SIZE = 128
BLOCK_SIZE_CHOICES = tuple(str(b) for b in BLOCK_SIZES)  # as command-line options spell them
WEIGHT_BITS = (4, 8)
INT8_DECODER_MODES = ("weight-only", "w8a8")
KV_CACHES = ("float", "fp16", "int8")  # how a bundle stores its KV cache: the graphs' float type (fp32 on the
# CPU, fp16 for TensorRT), fp16 in an fp32 graph (ORT CPU), or int8 with calibrated per-channel scales (ORT CPU,
# quantized recipes: the scales come from calibration)
INT4_METHODS = ("awq", "rtn")

# Export validation plans.
VALIDATION_PLANS = ("standard", "quick")

# Rhythms the synthetic 12-lead generator draws (render-ecg, synthetic calibration samples).
RHYTHMS = ("sinus", "tachycardia", "bradycardia", "afib", "first_degree_av_block")

# Voltage units of a CSV or NPY recording, which does not store its own (runtime/ecg/units.py knows more spellings).
VOLTAGE_UNITS = ("uV", "mV", "V")

# Checkpoint shapes make-tiny writes.
MERGES = ("flat", "spatial_unpad")
CHECKPOINT_LAYOUTS = ("llava", "llava_next")
TOWER_PLACEMENTS = ("inside", "separate")


def is_torch_device(name: str) -> bool:
    """One of TORCH_DEVICES, or cuda:N."""
    if name in TORCH_DEVICES:
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()
