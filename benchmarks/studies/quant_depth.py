"""`pulse-edge bench depth`: how a block-wise weight recipe's error grows with the decoder's depth.

    checkpoint (its own dtype, memory-mapped) -> random-token embeddings [1, S, H]
      -> one forward in fp32, one with every decoder Linear fake-quantized as MatMulNBits stores it
         (quant_math.fake_quant_blockwise; optionally int8 activation blocks, as MLAS computes at
         accuracy level 4)
      -> after each depth L, the last position's logits read out in fp32 (= the first L layers + norm
         + lm_head), and at full depth once more with lm_head quantized too (as bundles do)
      -> cosine against the fp32 logits per depth

Torch only, no ONNX: the curve is the recipe's own error, so a bundle's validation figure that sits
on it is no export defect, and one far below it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pulse_edge.benchmarks.common.output import REPORT_PATH, write_json
from pulse_edge.calibration.quant_math import fake_quant_blockwise
from pulse_edge.choices import BLOCK_SIZE_CHOICES, DEFAULT_BLOCK_SIZE, WEIGHT_BITS


@dataclass
class _Switch:
    """Whether the swapped Linears quantize right now (the read-out switches it off)."""

    on: bool = False


@dataclass(frozen=True)
class DepthConfig:
    checkpoint: Path
    bits: int = 4
    block_size: int = 128
    positions: int = 64
    act_quant: bool = True
    seed: int = 0


def act_blocks_int8(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [..., K] through symmetric int8 per block of K (scale = block absmax / 127), back to float.

    K is zero padded to whole blocks, as MatMulNBits pads its weights (zeros never raise a block's max)."""
    *lead, k = x.shape
    padded = F.pad(x, (0, -k % block_size))
    blocks = padded.reshape(*lead, -1, block_size)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(padded.shape)[..., :k]


def _forward(linear: nn.Linear, switch: _Switch, config: DepthConfig) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, x = linear.weight.float(), x.float()  # [N, K], [..., K]
        if switch.on:
            weight = torch.from_numpy(fake_quant_blockwise(weight.T.contiguous().numpy(), config.bits,
                                                           config.block_size)).T
            x = act_blocks_int8(x, config.block_size) if config.act_quant else x
        return F.linear(x, weight, None if linear.bias is None else linear.bias.float())
    return forward


@contextmanager
def swapped_linears(model: nn.Module, config: DepthConfig) -> Iterator[_Switch]:
    """Every Linear computes in fp32, fake-quantized while the yielded switch is on; restored on exit
    (an instance-level forward that was there before, such as another tool's hook, is put back)."""
    switch = _Switch()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    saved = {id(m): vars(m)["forward"] for m in linears if "forward" in vars(m)}
    for linear in linears:
        linear.forward = _forward(linear, switch, config)
    try:
        yield switch
    finally:
        for linear in linears:
            if id(linear) in saved:
                linear.forward = saved[id(linear)]
            else:
                del linear.forward  # the class's forward shows through again


@contextmanager
def layer_outputs(lm: Any) -> Iterator[list[torch.Tensor]]:
    """The last position's output of each decoder layer, in order, for the forwards run inside.

    Hooks rather than output_hidden_states: transformers 5 ties the last hidden state to the final
    norm's output, which a read-out through the norm would normalise twice."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # [1, S, H]
        captured.append(hidden[:, -1:].float())

    handles = [layer.register_forward_hook(hook) for layer in lm.model.layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def depth_curve(lm: Any, config: DepthConfig) -> dict[str, Any]:
    """Logit cosine (quantized vs fp32) after each depth; lm is a LlamaForCausalLM."""
    table = lm.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (config.positions,), generator=torch.Generator().manual_seed(config.seed))
    embeds = table[ids].float()[None]  # [1, S, H]
    logits: dict[bool, list[np.ndarray]] = {}
    with torch.inference_mode(), swapped_linears(lm, config) as switch:
        for quantized in (False, True):
            with layer_outputs(lm) as hidden:  # L x [1, 1, H]
                switch.on = quantized
                lm.model(inputs_embeds=embeds)
                switch.on = False  # the read-out of every depth in fp32: the layers' error alone
            logits[quantized] = [lm.lm_head(lm.model.norm(h))[0, 0].double().numpy() for h in hidden]
        switch.on = True
        full = lm.lm_head(lm.model.norm(hidden[-1]))[0, 0].double().numpy()
    cosines = [_cosine(a, b) for a, b in zip(logits[False], logits[True], strict=True)]
    return {"bits": config.bits, "block_size": config.block_size, "act_quant": config.act_quant,
            "positions": config.positions, "cosine_by_depth": cosines,
            "cosine_with_lm_head": _cosine(logits[False][-1], full)}


def run_depth(config: DepthConfig) -> dict[str, Any]:
    from pulse_edge.export.build.memory import reference_dtype
    from pulse_edge.export.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(config.checkpoint, dtype=reference_dtype(config.checkpoint))
    return depth_curve(loaded.model.language_model, config)


def depth_table(report: dict[str, Any]) -> str:
    acts = "int8 activation blocks" if report["act_quant"] else "float activations"
    lines = [f"int{report['bits']} weights, block {report['block_size']}, {acts}; logits of the last of "
             f"{report['positions']} positions vs fp32", "depth  cosine"]
    lines += [f"{depth:5d}  {cos:.4f}" for depth, cos in enumerate(report["cosine_by_depth"], start=1)]
    lines.append(f"all layers and lm_head quantized: {report['cosine_with_lm_head']:.4f}")
    return "\n".join(lines)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--bits", type=click.Choice([str(b) for b in WEIGHT_BITS]), default="4", show_default=True)
@click.option("--block-size", type=click.Choice(BLOCK_SIZE_CHOICES), default=str(DEFAULT_BLOCK_SIZE), show_default=True)
@click.option("--positions", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--act-quant/--no-act-quant", default=True, show_default=True,
              help="Also quantize activations to int8 per block, as MatMulNBits does at accuracy level 4.")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def main(checkpoint: Path, bits: str, block_size: str, positions: int, act_quant: bool,
                  json_path: Path | None) -> None:
    """How a block-wise weight recipe's logit error grows with depth (torch only): tells a recipe's own
    error from an export defect in a bundle's validation figures."""
    from pulse_edge.benchmarks.studies.quant_depth import DepthConfig, depth_table, run_depth

    report = run_depth(DepthConfig(checkpoint=checkpoint, bits=int(bits), block_size=int(block_size),
                                   positions=positions, act_quant=act_quant))
    click.echo(depth_table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
