"""The plain torch.onnx export (the baseline the direct builder is measured against) is a correct decoder.

Its logits must match the torch reference for a prefill from an empty cache, a second chunk
prefilled on top of a past (the mask and positions with both dimensions > 1), and a few
greedy decode steps; otherwise the benchmark would compare against a broken graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")

REL_TOL = 1e-4  # fp32: observed ~5e-7 relative to the largest logit


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from pulse_edge.benchmarks.studies.plain_decoder import export_plain_decoder
    from pulse_edge.export.model.checkpoint import load_checkpoint

    lm = load_checkpoint(tiny_checkpoint, dtype=torch.float32).model.language_model
    return lm, export_plain_decoder(lm, tmp_path_factory.mktemp("plain"))


def _rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    ref_np = ref.float().numpy()
    return float(np.max(np.abs(got - ref_np)) / np.max(np.abs(ref_np)))


def test_graph_is_plain_and_loadable_by_this_ort(exported) -> None:
    import onnx

    _, path = exported
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version <= 10
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not [n.op_type for n in model.graph.node if n.domain == "com.microsoft"]  # nothing fused by hand
    assert (path.parent / f"{path.name}.data").is_file()  # weights as external data


def test_plain_export_matches_torch_prefill_chunk_and_decode(exported) -> None:
    from pulse_edge.benchmarks.studies.plain_decoder import PlainDecoder
    from pulse_edge.export.model.torch_backend import decode_one_token, prefill

    lm, path = exported
    runner = PlainDecoder(path)
    table = lm.get_input_embeddings().weight.detach()
    ids = torch.randint(0, table.shape[0], (20,), generator=torch.Generator().manual_seed(0))
    embeds = table[ids][None]
    errors = []
    with torch.inference_mode():
        got = runner.forward(embeds[:, :13].numpy())
        ref, cache = prefill(lm, embeds[:, :13])
        errors.append(_rel_err(got, ref))
        got = runner.forward(embeds[:, 13:].numpy())  # 7 positions on top of a 13-long past
        ref, cache = prefill(lm, embeds[:, 13:], cache)
        errors.append(_rel_err(got, ref))
        for _ in range(3):
            token = int(torch.argmax(ref))
            assert int(np.argmax(got)) == token
            ref = decode_one_token(lm, token, cache)
            got = runner.forward(table[token].numpy()[None, None])
            errors.append(_rel_err(got, ref))
    assert runner.length == 23
    assert max(errors) < REL_TOL, errors


def test_the_table_prints_a_ratio_only_from_a_quiet_host() -> None:
    """The study's closing line: plain / direct per phase, or why not, never a ratio from busy rounds."""
    from pulse_edge.benchmarks.studies.plain_decoder import report_table

    row = {"prefill_runs_ms": [1.0], "decode_runs_ms": [1.0], "load_rss_bytes": 0, "prefill_working_bytes": 0,
           "nodes": {"total": 1, "MatMul": 1}, "nodes_after_ort": 1}
    report = {"date": "d", "machine": {"cpu": "c", "cores": 2, "ram_gib": 1}, "load_average": [[0.1], [0.2]],
              "settings": {"runs": 3, "decode_runs": 3, "warmup": 1, "prefill": 8, "context": 9},
              "rows": [{**row, "graph": "plain", "prefill_ms": 120.0, "decode_ms": 10.0},
                       {**row, "graph": "direct", "prefill_ms": 100.0, "decode_ms": 20.0}],
              "busy": {"prefill": None, "decode": "host busy: 0 of 3 rounds quiet (need 3)"},
              "ratio": {"prefill": 1.35, "decode": None},  # per-round, quiet-only: not the rows' 120 / 100
              "rss_before_runs_bytes": 0, "peak_rss_runs_bytes": 0,
              "prefill_logits_agreement": {"max_abs": 0.0, "ref_max": 1.0, "cosine": 1.0, "argmax_equal": True}}
    line = next(s for s in report_table(report).splitlines() if s.startswith("direct over plain"))
    assert "prefill 1.35x" in line and "decode not printed (host busy: 0 of 3 rounds quiet" in line
