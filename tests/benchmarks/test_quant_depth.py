"""The quant-depth study: the per-depth logit cosine of a fake-quantized decoder, on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from pulse_edge.benchmarks.studies.quant_depth import (
    DepthConfig,
    act_blocks_int8,
    depth_curve,
    layer_outputs,
    swapped_linears,
)
from pulse_edge.benchmarks.studies.quant_depth import main as study_main
from pulse_edge.export.model.checkpoint import load_checkpoint


def test_int8_activation_blocks_round_to_a_127_step_grid_per_block() -> None:
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    y = act_blocks_int8(x, 128)
    for block in range(2):
        xs, ys = x[:, block * 128:(block + 1) * 128], y[:, block * 128:(block + 1) * 128]
        step = xs.abs().amax(-1, keepdim=True) / 127
        assert torch.allclose(ys / step, torch.round(ys / step), atol=1e-4)  # on the grid
        assert (ys - xs).abs().max() <= step.max() / 2 + 1e-6  # rounding, not clipping
    ragged = torch.randn(2, 200, generator=torch.Generator().manual_seed(2))  # K not a whole number of blocks
    assert act_blocks_int8(ragged, 128).shape == ragged.shape
    assert torch.equal(act_blocks_int8(ragged, 128)[:, 128:], act_blocks_int8(ragged[:, 128:], 128))


def test_the_last_depth_reads_out_exactly_the_models_logits(tiny_checkpoint: Path) -> None:
    """The hooks see each layer's output before the final norm: read out through norm + lm_head, the last
    depth must give the model's own logits (transformers' tied last hidden state would be normalised twice)."""
    lm = load_checkpoint(tiny_checkpoint).model.language_model
    embeds = torch.randn(1, 6, lm.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), layer_outputs(lm) as hidden:
        logits = lm(inputs_embeds=embeds).logits[0, -1]
        read_out = lm.lm_head(lm.model.norm(hidden[-1]))[0, 0]
    assert len(hidden) == lm.config.num_hidden_layers
    assert torch.allclose(read_out, logits, atol=1e-5, rtol=1e-5)


def test_depth_curve_orders_recipes_and_restores_the_model(tiny_checkpoint: Path) -> None:
    lm = load_checkpoint(tiny_checkpoint).model.language_model
    embeds = torch.randn(1, 8, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = lm(inputs_embeds=embeds).logits
    int4 = depth_curve(lm, DepthConfig(checkpoint=tiny_checkpoint, bits=4, block_size=16, positions=16))
    int8 = depth_curve(lm, DepthConfig(checkpoint=tiny_checkpoint, bits=8, block_size=16, positions=16))
    assert len(int4["cosine_by_depth"]) == lm.config.num_hidden_layers
    assert all(0.0 < c <= 1.0 + 1e-9 for c in int4["cosine_by_depth"] + int8["cosine_by_depth"])
    assert int8["cosine_with_lm_head"] > int4["cosine_with_lm_head"]
    assert int8["cosine_by_depth"][-1] > 0.999  # int8 per block of 16 is close to lossless
    with torch.inference_mode():
        assert torch.equal(lm(inputs_embeds=embeds).logits, before)  # the swap left nothing behind
    with swapped_linears(lm, DepthConfig(checkpoint=tiny_checkpoint)) as switch:
        assert not switch.on
    assert all("forward" not in vars(m) for m in lm.modules())
    marker = lm.lm_head.forward = lambda x: x  # another tool's instance-level forward survives the swap
    with swapped_linears(lm, DepthConfig(checkpoint=tiny_checkpoint)):
        assert lm.lm_head.forward is not marker
    assert lm.lm_head.forward is marker


def test_the_depth_study_prints_a_row_per_layer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`python -m pulse_edge.benchmarks.studies.quant_depth CKPT ...` (a study, not a CLI command)."""
    out = tmp_path / "depth.json"
    result = CliRunner().invoke(study_main, [str(tiny_checkpoint), "--block-size", "16",
                                       "--positions", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = [line for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == len(report["cosine_by_depth"]) >= 1
    assert "all layers and lm_head quantized" in result.output
