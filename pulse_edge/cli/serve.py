"""`pulse-edge serve`: one bundle behind an OpenAI-compatible and an ECG-native HTTP API.

The web stack is the `serve` extra; it is imported only when the command runs, so the rest of the CLI works
without it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import click

from pulse_edge.choices import ATTENTION_MODES, DECODE_STEPS, PREFILL_GRAPH_MODES, PROVIDERS
from pulse_edge.cli import progress
from pulse_edge.click_types import FiniteFloatRange
from pulse_edge.errors import ConfigError

# Module names of the `serve` extra's packages (python-multipart parses uploads).
SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client", "python_multipart")
API_KEY_ENV = "PULSE_EDGE_API_KEY"  # what `--api-key env` reads
MIN_API_KEY_CHARS = 16


def _require_extra() -> None:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"`pulse-edge serve` needs the serve extra (missing: {', '.join(missing)}): "
                          "pip install 'pulse-edge[serve]'")


def resolve_api_key(value: str | None) -> str | None:
    """`env` reads $PULSE_EDGE_API_KEY (keeps the key out of the process list); anything else is the key."""
    if value is None:
        return None
    key = os.environ.get(API_KEY_ENV, "") if value == "env" else value
    if not key.strip():
        raise ConfigError(f"--api-key env: ${API_KEY_ENV} is not set or empty" if value == "env"
                          else "--api-key must not be empty")
    if key != key.strip() or any(not c.isprintable() for c in key):
        raise ConfigError("the API key must be printable text without leading or trailing spaces")
    if len(key) < MIN_API_KEY_CHARS:  # "a" or "1234" guards a cart's answers about as well as no key
        raise ConfigError(f"the API key has {len(key)} characters; use at least {MIN_API_KEY_CHARS} random ones "
                          "(e.g. the output of `openssl rand -hex 16`)")
    return key


def _allowed_root(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_dir():
        raise ConfigError(f"--allow-dir {path}: not an existing directory")
    return path.resolve()


@click.command("serve")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A bundle (from `pulse-edge export`); served by ONNX Runtime.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback is reachable from other machines (warned).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0 picks a free port (printed at start).")
@click.option("--api-key", default=None, metavar="KEY|env",
              help=f"Require 'Authorization: Bearer KEY' (all but /health); 'env' reads ${API_KEY_ENV}.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait behind the one generating; more get 503 with Retry-After.")
@click.option("--allow-dir", type=click.Path(path_type=Path), default=None,
              help="Requests may name files under this directory (symlinks resolved); none without it.")
# 32 MiB: a 600-dpi scan as PNG, base64-encoded in a data URI, with room to spare.
@click.option("--max-body-mb", type=FiniteFloatRange(min=0.001), default=32.0, show_default=True,
              help="Largest request body in MiB (413 beyond).")
# 600 s: the 7B on a 2-core CPU takes ~1 min to the first token and ~2 min more for 1024 tokens.
@click.option("--timeout", "timeout_s", type=FiniteFloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds per request, queueing included; past it the generation is cancelled (504).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Intra-op threads (0 = one per core).")
@click.option("--prefill-graph", type=click.Choice(PREFILL_GRAPH_MODES), default="auto", show_default=True,
              help="A CPU bundle's prefill graph; auto: loaded when memory holds it (see infer --help).")
@click.option("--prefill-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="The prefill's attention: pulse-edge's CPU kernel where it runs (see infer --help).")
@click.option("--decode-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="A decode step's attention: pulse-edge's CPU kernel where it runs (see infer --help).")
@click.option("--decode-step", type=click.Choice(DECODE_STEPS), default="auto", show_default=True,
              help="Decode steps on pulse-edge's own CPU kernels where they run (see infer --help).")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="Let ONNX Runtime copy the weights into its packed layout (faster); --no-prepack keeps them "
                   "mapped from the file, for a machine whose memory cannot hold the copy (see infer --help).")
def serve(model_dir: Path, host: str, port: int, api_key: str | None, max_queue: int, allow_dir: Path | None,
          max_body_mb: float, timeout_s: float, provider: str, threads: int, prefill_graph: str,
          prefill_attention: str, decode_attention: str, decode_step: str, prepack: bool) -> None:
    """Serve a bundle over HTTP: OpenAI-compatible /v1/chat/completions, ECG-native /v1/ecg/interpret,
    /health and /metrics. One model in memory, one generation at a time."""
    _require_extra()
    key, root = resolve_api_key(api_key), _allowed_root(allow_dir)
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.server.launch import serve as run_server
    from pulse_edge.runtime.server.state import ServerConfig

    config = ServerConfig(bundle=model_dir, host=host, port=port, api_key=key, max_queue=max_queue,
                          allow_dir=root, max_body_bytes=int(max_body_mb * 2**20), timeout_s=timeout_s,
                          session=SessionConfig(provider=provider, threads=threads, prefill_graph=prefill_graph,
                                                prepack=prepack,
                                                prefill_attention=prefill_attention,
                                                decode_attention=decode_attention, decode_step=decode_step),
                          quiet=progress.quiet())
    run_server(config, say=lambda line: click.echo(f"pulse-edge: {line}", err=True))
