"""Fused Triton kernels for the vision projector (issue 6); nothing here yet."""
