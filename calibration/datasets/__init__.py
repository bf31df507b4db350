"""Readers of the datasets that calibration and evaluation draw ECG samples from."""
