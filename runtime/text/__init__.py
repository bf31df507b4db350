"""Tokenizer and the llava_v1 prompt."""
