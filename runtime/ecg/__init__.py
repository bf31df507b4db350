"""ECG signals: the 12 leads, a synthetic generator with known labels, and the standard 12-lead print renderer."""
