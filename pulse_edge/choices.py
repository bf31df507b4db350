"""The allowed values of pulse-edge's settings, each listed once.

Imported by the command line (so `pulse-edge --help` needs nothing heavier than this module) and by the code
that acts on the values, which keeps its own tables keyed by these names (an engine's provider names, a
precision's numpy dtype). Standard library only; the lowest layer of the package.
"""

from __future__ import annotations

# Who serves a model: the lean runtime on ONNX Runtime, or the torch reference (checkpoints only).
BACKENDS = ("auto", "ort", "torch")
# ONNX Runtime execution providers, by pulse-edge's short names.
PROVIDERS = ("cpu", "cuda", "tensorrt")
# ONNX Runtime graph optimisation levels, lowest first (a graph may cap the level it runs at).
OPT_LEVELS = ("disable", "basic", "extended", "all")

# Precisions a bundle is exported in; quantized ones go through a calibration recipe.
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int4", "fp8")
FLOAT_PRECISIONS = ("fp32", "fp16")
QUANTIZED_PRECISIONS = ("int8", "int4", "fp8")
# Precisions a graph in a bundle may carry (a graph's own, e.g. an int8 vision graph in an int4 bundle).
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
# Element types of the tensors a bundle names, as numpy spells them.
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "int8")
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
KV_CACHES = ("fp32", "int8")  # how a CPU bundle stores its KV cache (int8: calibrated per-channel scales)
INT4_METHODS = ("awq", "rtn")

# Export validation plans.
VALIDATION_PLANS = ("standard", "quick")

# Rhythms the synthetic 12-lead generator draws (render-ecg, synthetic calibration samples).
RHYTHMS = ("sinus", "tachycardia", "bradycardia", "afib", "first_degree_av_block")

# Checkpoint shapes make-tiny writes.
MERGES = ("flat", "spatial_unpad")
CHECKPOINT_LAYOUTS = ("llava", "llava_next")
TOWER_PLACEMENTS = ("inside", "separate")
