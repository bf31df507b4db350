"""The projector kernels compiled ahead of time for the GPUs PULSE targets, on a machine without one.

Triton's compiler and the cuobjdump in its wheel need no GPU: these tests build the cubins for
Ampere (sm_80), Orin (sm_87), Ada (sm_89) and Hopper (sm_90), and read back what a GPU run would
depend on: the matrix instructions (Hopper's wgmma shows as HGMMA / QGMMA in SASS, the older
mma.sync as HMMA / QMMA), shared memory against each chip's limit, and register spills (stack).
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton", reason="triton not installed: pip install -e .[kernels]")

from pulse_edge.kernels import aot, triton_src  # noqa: E402

# The instruction each (capability, operand kind) must use: anything else is a slower path.
MMA = {(80, "16"): "HMMA", (87, "16"): "HMMA", (89, "16"): "HMMA", (89, "fp8"): "QMMA",
       (90, "16"): "HGMMA", (90, "fp8"): "QGMMA"}
SAFE_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8,
                            num_stages=3)
QUICK = [("fp16", 80), ("bf16", 90), ("bf16", 89), ("int8-fp16", 87), ("int8-bf16", 90), ("fp8-bf16", 90),
         ("fp8-fp16", 89)]
MODE = {"fp16": "fp", "bf16": "fp"}


def _mma_kinds(cubin: bytes) -> set[str]:
    return set(re.findall(r"\b([A-Z]*MMA)\b", aot.sass(cubin)))


def _expected_mma(name: str, capability: int) -> str:
    return MMA[(capability, "fp8" if name.startswith("fp8") else "16")]


@pytest.mark.parametrize(("name", "capability"), QUICK, ids=[f"{n}-sm{c}" for n, c in QUICK])
def test_projector_compiles_to_tensor_core_code_that_fits(name: str, capability: int) -> None:
    for variant in aot.PROJECTOR_VARIANTS[name]:
        kernel = aot.compile_linear(variant, capability, SAFE_CONFIG)
        usage = aot.resource_usage(kernel.asm["cubin"])
        assert _mma_kinds(kernel.asm["cubin"]) == {_expected_mma(name, capability)}
        assert kernel.metadata.shared <= aot.MAX_SHARED_BYTES[capability]
        assert usage["stack"] == 0, f"{variant} spills registers: {usage}"


SWEEP = [(name, cap) for name in aot.PROJECTOR_VARIANTS for cap in (80, 87, 89, 90)
         if not (name.startswith("fp8") and cap < 89)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "capability"), SWEEP, ids=[f"{n}-sm{c}" for n, c in SWEEP])
def test_every_target_keeps_a_tuning_candidate_that_fits_without_spilling(name: str, capability: int) -> None:
    """All candidates compile; for each launch at least one fits the chip's shared memory with no spills."""
    for variant in aot.PROJECTOR_VARIANTS[name]:
        viable = []
        for config in triton_src.TUNING_CONFIGS[MODE.get(name, name.split("-")[0])]:
            kernel = aot.compile_linear(variant, capability, config)
            assert _expected_mma(name, capability) in _mma_kinds(kernel.asm["cubin"])
            fits = kernel.metadata.shared <= aot.MAX_SHARED_BYTES[capability]
            viable.append(fits and aot.resource_usage(kernel.asm["cubin"])["stack"] == 0)
        assert any(viable), f"{variant} on sm_{capability}: no candidate fits without spilling"


def test_plugin_kernel_has_tensorrts_argument_order() -> None:
    """TensorRT AOT plugins launch with (tensor inputs, integer extra args, outputs); Triton adds 2 scratch pointers."""
    from pulse_edge.kernels.trt_plugin import TRITON_SCRATCH_PARAMETERS, PluginKernel, plugin_kernel

    kernel = plugin_kernel(aot.PROJECTOR_VARIANTS["fp8-bf16"][0], 90, SAFE_CONFIG)
    entry = kernel.ptx[kernel.ptx.index(f".entry {kernel.name}("):]
    params = re.findall(r"\.param \.(u64|u32)", entry[:entry.index(")")])
    integers = PluginKernel.integer_args(2880, 4096, 1024)
    assert params == ["u64"] * 6 + ["u32"] * len(integers) + ["u64"] * (1 + TRITON_SCRATCH_PARAMETERS)
    assert list(integers.values()) == [2880, 4096, 1024, 1024, 1024, 4096, 4096]
    assert kernel.block_x == 8 * 32 and 0 < kernel.shared_mem <= aot.MAX_SHARED_BYTES[90]
    assert kernel.grid_x(2880, 4096) == 23 * 32  # ceil(2880 / 128) x 4096 / 128
