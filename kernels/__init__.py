"""Fused Triton kernels for the vision projector and tile preprocessing (issue 6), each with a plain-torch twin.

    projector.mlp2x_gelu / mlp2x_gelu_int8 / mlp2x_gelu_fp8   y = W2 gelu(W1 x + b1) + b2, two fused GEMMs
    preprocess.normalize_tiles                               uint8 HWC tiles -> normalised CHW
    quant                                                    int8 / fp8 weights and scales for the above
    reference                                                the twins: the test oracle and the fallback
    fuse_projector / unfuse_projector                        swap the fused projector into a PulseReference
    dispatch                                                 Triton on CUDA, the interpreter, or the twin

Triton is optional (`pip install -e .[kernels]`); importing this package does not import it. Where
Triton or a CUDA GPU is absent, the twins run and a log warning says so once per reason.
"""

from pulse_edge.kernels.dispatch import Choice
from pulse_edge.kernels.fused_module import FusedProjector, fuse_projector, projector_choice, unfuse_projector

__all__ = ["Choice", "FusedProjector", "fuse_projector", "projector_choice", "unfuse_projector"]
