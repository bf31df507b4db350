"""Decode a user's ECG (an image, a PDF page, or a digital recording rendered as the standard print) into one
RGB image: `load_input(source) -> EcgInput`."""

from pulse_edge.runtime.inputs.load import INPUT_KINDS, RECORDING_KINDS, EcgInput, load_input

__all__ = ["INPUT_KINDS", "RECORDING_KINDS", "EcgInput", "load_input"]
