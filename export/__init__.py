"""The torch side: checkpoint loading, the reference model, tokenizer conversion, fixtures.

Imports torch and transformers; never imported by `pulse_edge.runtime`.
"""
