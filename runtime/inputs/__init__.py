"""Decode a user's ECG file into one RGB image."""
