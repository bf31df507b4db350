"""`pulse-edge build-engines`: TensorRT engines from a bundle's TensorRT-ready graphs (no torch needed)."""
