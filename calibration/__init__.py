"""Calibration sample sources; the synthetic 12-lead ECG generator and print renderer."""
