"""pulse-edge: run PULSE, the multimodal LLM that reads ECG images, on edge devices."""

__version__ = "0.1.0"
