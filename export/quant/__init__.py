"""Applying a quantization recipe: scales into quantized weights and graphs, settings, the accuracy gate."""
