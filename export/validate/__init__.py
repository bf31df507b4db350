"""Validation of exported graphs: parity with the torch reference, greedy tokens, fidelity against fp32."""
