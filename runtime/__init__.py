"""The lean runtime: inputs, preprocessing, tokenizer and prompt, sampling.

Imports numpy, pillow and tokenizers only (never torch, transformers or
triton); `tests/test_lean_runtime.py` checks this in a fresh interpreter.
"""
