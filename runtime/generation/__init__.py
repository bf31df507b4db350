"""The generation loop: conversation turns, sampling, the result record."""
