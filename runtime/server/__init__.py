"""`pulse-edge serve`: one bundle behind an OpenAI-compatible and an ECG-native HTTP API (Starlette + uvicorn).

The only part of the runtime that imports the web stack (the `serve` extra); everything else stays lean.
"""
