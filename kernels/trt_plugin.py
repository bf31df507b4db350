"""How the fused projector enters a TensorRT engine: the design, and the one piece of it built here.

Status: design. No TensorRT and no GPU exist where this was written, so no engine with the plugin
has been built or run. What is built and tested (tests/kernels/test_kernels_aot.py) is the kernel side: the
PTX/cubin per GPU and the launch description below (`plugin_kernel`). The TensorRT facts marked
[doc] are from NVIDIA's TensorRT 10 Python-plugin documentation (tensorrt.plugin: register,
aot_impl, autotune, KernelLaunchParams); everything marked [unverified] has not been tried.

Why two plugin layers per projector
    A TensorRT AOT plugin layer launches one kernel [doc]. The projector is two launches of one GEMM
    kernel (kernels/projector.py), so it becomes two plugin layers, `pulse_edge::linear_gelu` and
    `pulse_edge::linear`, with h [T, 4096] an ordinary engine tensor between them (fp8 for the fp8
    recipe): TensorRT allocates and reuses it like any activation.

Route A: Quick Deployable Plugins with AOT Triton (aot_impl is in TensorRT 10.9's plugin guide; Python at build only)
    1. Export: onnx_vision.py writes the projector as two custom nodes (domain `pulse_edge`) instead
       of Gemm/Gelu/Gemm, the weights, biases and scales as initializers feeding them, when the
       bundle asks for the fused projector. [not done; the ONNX parser's mapping of a custom node
       to a QDP registered under the same "namespace::name" is [unverified] for AOT plugins]
    2. Build: before parsing, import a module that declares, per layer, `@trtp.register` (output
       [M, N] from the inputs' shape expressions, dtype per recipe) and `@trtp.aot_impl` returning
       (kernel name, PTX, KernelLaunchParams, extra args) [doc: only PTX is accepted at present].
       `plugin_kernel` below produces exactly those pieces. The kernel's argument order is already
       the one TensorRT launches with [doc]: tensor inputs, then the integer scalars, then the
       output (triton_src.linear_kernel). Plugin attributes are not serialised for AOT plugins
       [doc]: every run-time value is an input tensor (weights, biases, scales) or an integer
       extra arg (M, N, K, row strides); the recipe flags are compile-time constants, one plugin
       name or tactic per variant.
    3. `@trtp.autotune` offers one tactic per triton_src.TUNING_CONFIGS entry; TensorRT times them
       at build time, replacing Triton's autotuner [doc]. The PTX is serialised into the engine,
       which then runs without Python or triton [doc: Torch-TensorRT's AOT plugin example], which
       is what the lean runtime needs.
    Caveats [unverified]: (a) Triton >= 3.3 appends two pointer parameters (global and profile
    scratch) after the output; they are never read when their sizes are 0 (checked here: 0), but
    TensorRT passes only inputs + extra args + outputs, so the launch has two parameters fewer
    than the PTX declares. If TensorRT rejects that, strip them from the PTX entry or take route
    B. (b) The candidates use 32-180 KiB of dynamic shared memory; above 48 KiB a launch needs
    cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), which the AOT launcher may or may not do:
    if not, offer only tactics <= 48 KiB (num_stages 2) or take route B. (c) PTX is JIT-compiled by
    the driver at engine load: triton 3.9 emits PTX ISA 8.8 for sm_80-89 and 9.4 for sm_90a, which
    needs a CUDA 12.9 / 13.x driver; JetPack 6's CUDA 12.6 driver cannot load either.

Route B: a C++ IPluginV3 around cubins (TensorRT 10.0+, Jetson included)
    aot.compile_linear(...).asm["cubin"] per target (sm_87 Orin, sm_89 Ada, sm_90 Hopper) and per
    tactic, embedded in a small plugin library (the way triton's tools/compile.py emits a C stub).
    enqueue(): cuModuleLoadData once, cuFuncSetAttribute for the shared memory, cuLaunchKernel on
    TensorRT's stream with grid, block and all 16 PTX parameters (the two scratch pointers null);
    getValidTactics() lists the configs; supportsFormatCombination() allows linear fp16/bf16 (and
    int8 weights, fp8 E4M3 on >= 8.9); serialise the variant and the tactic. It avoids every
    route-A caveat at the price of C++ and a build per TensorRT version. Cubins from triton 3.9's
    bundled ptxas (CUDA 12.9 below sm_90, 13.4 for sm_90) still need a driver of that CUDA major
    [unverified on JetPack 6: CUDA 12 minor-version compatibility should load 12.9 cubins].

What remains
    the export switch and custom nodes (1); the plugin declarations for route A and their build
    test on a GPU with TensorRT; route B's C++ library for Jetson; an engine-vs-reference parity
    test (the twin is the oracle, as everywhere here); timings on Orin, an RTX card and the H200.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from pulse_edge.kernels import aot

# Triton >= 3.3 appends these to every kernel's parameters (see the caveat above).
TRITON_SCRATCH_PARAMETERS = 2
_INTEGER_ARGS = ("M", "N", "K", "stride_am", "stride_bn", "stride_cm", "M_BUCKET")


@dataclass(frozen=True)
class PluginKernel:
    """What a TensorRT aot_impl returns for one GEMM layer, before the shape-dependent parts are filled in."""

    name: str
    ptx: str
    block_x: int  # threads per block
    shared_mem: int  # dynamic shared memory, bytes
    block_m: int
    block_n: int

    def grid_x(self, m: int, n: int) -> int:
        """One program per output tile (the kernel maps program ids to tiles itself)."""
        return -(-m // self.block_m) * -(-n // self.block_n)

    @staticmethod
    def integer_args(m: int, n: int, k: int) -> dict[str, int]:
        """The extra (scalar) arguments, in order, for row-major x [M, K], weights [N, K] and y [M, N]."""
        return dict(zip(_INTEGER_ARGS, (m, n, k, k, k, n, 1 << max(m - 1, 0).bit_length()), strict=True))


def plugin_kernel(variant: aot.LinearVariant, capability: int, config: triton.Config) -> PluginKernel:
    """The PTX and launch description of one projector GEMM for sm_<capability> and one tuning config."""
    compiled = aot.compile_linear(variant, capability, config)
    return PluginKernel(name=compiled.metadata.name, ptx=compiled.asm["ptx"],
                        block_x=compiled.metadata.num_warps * aot.WARP_SIZE, shared_mem=compiled.metadata.shared,
                        block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"])
