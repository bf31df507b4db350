"""ONNX graph writers: the vision graph (tower + projector) and the decoder, float and quantized."""
