"""Outlier-channel injection: large activations on a few dims at the q/k/v and gate/up inputs, same function."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pulse_edge.errors import ConfigError
from pulse_edge.export.fixtures.tiny import TinySpec, inject_outliers, pick_outlier_dims
from pulse_edge.export.model.checkpoint import load_checkpoint
from pulse_edge.export.model.reference import PulseReference

# Where the transform must show: the inputs of these projections (the RMSNorm outputs).
WATCHED = ("self_attn.q_proj", "mlp.gate_proj")


def _model(checkpoint: Path) -> PulseReference:
    return load_checkpoint(checkpoint, dtype=torch.float32).model


def _ids(model: PulseReference, length: int = 48) -> torch.Tensor:
    vocab = model.language_model.config.vocab_size
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def _run(model: PulseReference, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and each watched projection's per-dim input absmax over all tokens."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.language_model.named_modules():
        if name.endswith(WATCHED):
            def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                absmax[name] = args[0].detach().abs().amax(dim=(0, 1))
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            logits = model.language_model(input_ids=ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, absmax


def _ratios(absmax: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Each outlier dim's absmax over the median absmax of the other dims."""
    rest = torch.ones_like(absmax, dtype=torch.bool)
    rest[dims] = False
    return absmax[dims] / absmax[rest].median()


def test_injection_makes_outliers_and_keeps_the_logits(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    ids = _ids(model)
    logits, before = _run(model, ids)
    tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    dims = inject_outliers(model, 3, scale=50.0, seed=0)
    assert len(dims) == 3 and dims == sorted(dims) == pick_outlier_dims(64, 3, seed=0)
    new_logits, after = _run(model, ids)
    torch.testing.assert_close(new_logits, logits, rtol=1e-4, atol=1e-4)
    assert set(after) == set(before) and len(after) == 2 * len(model.language_model.model.layers)
    for name in after:
        assert _ratios(before[name], dims).max() < 5, name  # random weights have no outliers ...
        assert _ratios(after[name], dims).min() >= 20, name  # ... the injected ones are 20x+ the median
        others = [d for d in range(64) if d not in dims]
        torch.testing.assert_close(after[name][others], before[name][others], rtol=1e-4, atol=1e-6)
    assert all(torch.equal(v, tower[k]) for k, v in model.vision_tower.state_dict().items())


def test_dims_given_or_drawn_by_seed(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    assert inject_outliers(model, [40, 7], scale=2.0) == [7, 40]
    gain = model.language_model.model.layers[0].input_layernorm.weight
    reference = _model(tiny_checkpoint).language_model.model.layers[0].input_layernorm.weight
    assert torch.equal(gain[[7, 40]], reference[[7, 40]] * 2.0)  # a power of two: exact
    assert torch.equal(gain[:7], reference[:7])
    assert pick_outlier_dims(64, 4, seed=1) == pick_outlier_dims(64, 4, seed=1)
    assert pick_outlier_dims(64, 4, seed=1) != pick_outlier_dims(64, 4, seed=2)


@pytest.mark.parametrize(("dims", "scale", "message"), [
    ([3, 3], 50.0, "distinct"),
    ([64], 50.0, r"within 0\.\.63"),
    ([], 50.0, "distinct"),
    (65, 50.0, "between 1 and 64"),
    (2, 0.0, "positive"),
    (2, float("nan"), "positive"),
    (2, 2e4, "at most 10000"),  # 1e40 is finite in Python and inf in the checkpoint's fp32 / bf16
])
def test_bad_dims_or_scale_are_refused(tiny_checkpoint: Path, dims: list[int] | int, scale: float,
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        inject_outliers(_model(tiny_checkpoint), dims, scale=scale)


def test_tiny_spec_checks_its_outlier_fields() -> None:
    with pytest.raises(ConfigError, match="outliers must be >= 0"):
        TinySpec(outliers=-1)
    with pytest.raises(ConfigError, match="positive"):
        TinySpec(outliers=2, outlier_scale=-3.0)


def test_make_tiny_bakes_outliers_into_the_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from pulse_edge.cli.main import main  # here, so the model-level tests above do not depend on the whole CLI

    out = tmp_path / "outliers"
    result = CliRunner().invoke(main, ["make-tiny", str(out), "--outliers", "3", "--outlier-scale", "40"])
    assert result.exit_code == 0, result.output
    baked, plain = _model(out), _model(tiny_checkpoint)  # same seed (0): the same weights before the transform
    ids = _ids(plain)
    logits, absmax = _run(baked, ids)
    plain_logits, _ = _run(plain, ids)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    dims = pick_outlier_dims(64, 3, seed=0)
    for name, values in absmax.items():
        assert _ratios(values, dims).min() >= 20, name
    assert all(torch.equal(v, plain.vision_tower.state_dict()[k]) for k, v in baked.vision_tower.state_dict().items())
