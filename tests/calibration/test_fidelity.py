"""Fidelity metrics and the accuracy gate against independent computations (torch, hand values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pulse_edge.calibration.fidelity import (
    METRICS,
    AccuracyGate,
    Threshold,
    first_divergence,
    format_table,
    greedy_agreement,
    json_safe,
    logit_kl,
    tensor_fidelity,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ----------------------------------------------------------------------------- tensor metrics


def test_tensor_fidelity_matches_torch() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 33, 17)).astype(np.float32)
    got = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    m = tensor_fidelity(got, ref)
    g, r = torch.from_numpy(got).double().flatten(), torch.from_numpy(ref).double().flatten()
    assert m["cosine"] == pytest.approx(float(F.cosine_similarity(g, r, dim=0)), abs=1e-12)
    rel = float(torch.linalg.vector_norm(g - r) / torch.linalg.vector_norm(r))
    assert m["rel_err"] == pytest.approx(rel, rel=1e-12)
    assert m["sqnr_db"] == pytest.approx(-20 * math.log10(rel), rel=1e-12)
    assert m["max_abs_err"] == pytest.approx(float((g - r).abs().max()), rel=1e-12)
    assert set(m) == {"cosine", "rel_err", "sqnr_db", "max_abs_err"}


def test_tensor_fidelity_hand_values() -> None:
    m = tensor_fidelity([3.0, 4.0], [3.0, 3.0])  # diff (0, 1): ||d|| = 1, ||ref|| = sqrt(18)
    assert m["rel_err"] == pytest.approx(1 / math.sqrt(18))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(18))
    assert m["cosine"] == pytest.approx(21 / (5 * math.sqrt(18)))
    assert m["max_abs_err"] == 1.0


def test_tensor_fidelity_edge_cases_and_json() -> None:
    x = np.arange(6.0).reshape(2, 3)
    equal = tensor_fidelity(x, x.copy())
    assert equal["sqnr_db"] == math.inf and equal["rel_err"] == 0.0 and equal["cosine"] == pytest.approx(1.0)
    text = json.dumps(json_safe({"vision": equal, "arr": [np.float32(0.5), -math.inf, math.nan]}), allow_nan=False)
    back = json.loads(text)
    assert back["vision"]["sqnr_db"] == "inf" and float(back["vision"]["sqnr_db"]) == math.inf
    assert back["arr"][0] == 0.5 and back["arr"][1] == "-inf" and back["arr"][2] == "nan"
    zeros = tensor_fidelity(np.zeros(3), np.zeros(3))
    assert zeros["cosine"] == 1.0 and zeros["rel_err"] == 0.0 and zeros["sqnr_db"] == math.inf
    assert tensor_fidelity(np.zeros(3), np.ones(3))["cosine"] == 0.0
    assert math.isnan(tensor_fidelity([1.0, math.nan], [1.0, 2.0])["cosine"])
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_fidelity(np.zeros((2, 3)), np.zeros((3, 2)))


# ----------------------------------------------------------------------------- logits


def _torch_kl(ref: np.ndarray, got: np.ndarray) -> float:
    r = torch.from_numpy(ref).double().reshape(-1, ref.shape[-1])
    g = torch.from_numpy(got).double().reshape(-1, got.shape[-1])
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q); batchmean = mean over rows
    return float(F.kl_div(F.log_softmax(g, -1), F.log_softmax(r, -1), reduction="batchmean", log_target=True))


def test_logit_kl_matches_torch() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 5, 1000)) * 4
    got = ref + rng.standard_normal(ref.shape) * 0.3
    assert logit_kl(ref, got) == pytest.approx(_torch_kl(ref, got), rel=1e-10)
    assert logit_kl(ref, ref) == pytest.approx(0.0, abs=1e-15)
    assert logit_kl(ref, got) > 0


def test_logit_kl_is_stable_and_handles_masked_tokens() -> None:
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((4, 50)) * 3
    got = ref + rng.standard_normal(ref.shape) * 0.2
    want = logit_kl(ref, got)
    # softmax is shift invariant; 1e4 would overflow a naive exp
    assert logit_kl(ref + 1e4, got - 1e4) == pytest.approx(want, rel=1e-6)
    masked_ref, masked_got = ref.copy(), got.copy()
    masked_ref[:, :5] = -np.inf
    masked_got[:, :5] = -np.inf
    assert logit_kl(masked_ref, masked_got) == pytest.approx(
        _torch_kl(masked_ref[:, 5:], masked_got[:, 5:]), rel=1e-10
    )
    ruled_out = got.copy()
    ruled_out[0, 0] = -np.inf  # the reference allows a token `got` cannot emit
    assert logit_kl(ref, ruled_out) == math.inf
    with pytest.raises(ValueError):
        logit_kl(ref, got[:, :10])



@pytest.mark.parametrize("poison", [np.nan, np.inf, "all -inf"])
def test_a_reference_that_is_no_distribution_gives_no_kl_a_gate_passes(poison: float | str) -> None:
    """NaN, +inf or no finite logit in a reference row masked every term: KL 0, and `kl<=0.05` passed."""
    ref = np.zeros((2, 4))
    if poison == "all -inf":
        ref[1] = -np.inf
    else:
        ref[1, 2] = poison
    kl = logit_kl(ref, np.zeros((2, 4)))
    assert math.isnan(kl) and AccuracyGate.from_string("kl<=0.05").check({"kl": kl}) == ["kl nan (needs <= 0.05)"]
    assert math.isnan(logit_kl(np.zeros((2, 4)), ref))  # on the other side too


def test_a_sign_flipped_output_has_cosine_minus_one_and_its_error_in_full() -> None:
    """|cosine| would pass a negated graph; a signed max would record a smaller error than the worst."""
    x = np.array([1.0, -2.0, 3.0])
    assert tensor_fidelity(-x, x)["cosine"] == pytest.approx(-1.0)
    assert tensor_fidelity([0.0], [1.0])["max_abs_err"] == 1.0


def test_every_metric_takes_the_bounds_of_its_direction() -> None:
    """"vision_cosine>=0.99" was refused as bounding the wrong side when one metric's direction was flipped."""
    for metric, direction in METRICS.items():
        good, bad = (">=", "<=") if direction == "higher is better" else ("<=", ">=")
        assert AccuracyGate.from_string(f"{metric}{good}0.5").thresholds == (Threshold(metric, good, 0.5),)
        with pytest.raises(ValueError, match="bounds the wrong side"):
            AccuracyGate.from_string(f"{metric}{bad}0.5")


# ----------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [], None),
     ([], [4], 0), ([9, 2], [1, 2], 0)],
)
def test_first_divergence(a: list[int], b: list[int], want: int | None) -> None:
    assert first_divergence(a, b) == want
    assert first_divergence(b, a) == want


def test_greedy_agreement() -> None:
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5]) == {
        "agreement": 0.75, "first_divergence": 2, "ref_len": 4, "got_len": 5,
    }
    assert greedy_agreement([7, 8], [7, 8])["agreement"] == 1.0
    assert greedy_agreement([], [])["agreement"] == 1.0
    assert greedy_agreement([], [1])["agreement"] == 0.0
    assert greedy_agreement(np.array([3, 3, 3]), np.array([3, 0, 3]))["agreement"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- accuracy gate


def test_metric_directions() -> None:
    higher = {m for m, d in METRICS.items() if d == "higher is better"}
    lower = {m for m, d in METRICS.items() if d == "lower is better"}
    assert higher == {"cosine", "vision_cosine", "sqnr_db", "agreement"}
    assert lower == {"rel_err", "kl", "max_abs_err"}
    assert higher | lower == set(METRICS)


def test_gate_parses_and_checks() -> None:
    gate = AccuracyGate.from_string(" cosine >= 0.99, kl<=0.05 ,agreement>0.9")
    assert gate.thresholds == (Threshold("cosine", ">=", 0.99), Threshold("kl", "<=", 0.05),
                               Threshold("agreement", ">", 0.9))
    assert AccuracyGate.from_string(str(gate)) == gate
    assert gate.check({"cosine": 0.995, "kl": 0.01, "agreement": 0.95}) == []
    assert gate.check({"cosine": 0.98, "kl": 0.083, "agreement": 0.9}) == [
        "cosine 0.98 < 0.99", "kl 0.083 > 0.05", "agreement 0.9 <= 0.9",
    ]
    assert gate.check({"cosine": 0.999}) == ["kl missing (needs <= 0.05)", "agreement missing (needs > 0.9)"]
    assert gate.check({"cosine": math.nan, "kl": 0.0, "agreement": 1.0}) == ["cosine nan (needs >= 0.99)"]
    assert AccuracyGate.from_string("sqnr_db>=20").check({"sqnr_db": math.inf}) == []
    # a bound met exactly passes where it is inclusive: "agreement>=1" takes a perfect export
    assert AccuracyGate.from_string("agreement>=1, kl<=0").check({"agreement": 1.0, "kl": 0.0}) == []


def test_gate_reads_a_json_file(tmp_path) -> None:
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"cosine": ">=0.99", "kl": "<= 0.05"}))
    gate = AccuracyGate.from_string(str(path))
    assert gate.thresholds == (Threshold("cosine", ">=", 0.99), Threshold("kl", "<=", 0.05))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        AccuracyGate.from_string(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        AccuracyGate.from_string(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("text", "detail"),
    [("", "empty"), ("cosine", "cannot read"), ("accuracy>=0.9", "unknown metric 'accuracy'"),
     ("cosine=>0.9", "cannot read"), ("cosine==0.9", "cannot read"), ("kl<=abc", "not a number"),
     ("kl<=nan", "NaN"), ("kl>=0.05", "wrong side"), ("cosine<0.5", "wrong side"), ("cosine>=0.9,", "cannot read")],
)
def test_gate_errors_are_one_line_with_the_allowed_forms(text: str, detail: str) -> None:
    with pytest.raises(ValueError, match=detail) as info:
        AccuracyGate.from_string(text)
    message = str(info.value)
    assert "\n" not in message
    assert all(m in message for m in METRICS)
    assert all(op in message for op in (">=", "<=", ">", "<"))


# ----------------------------------------------------------------------------- table


def test_format_table() -> None:
    rows = [{"recipe": "int8", "cosine": 0.99912, "kl": 0.0123456, "agree": 1},
            {"recipe": "int4-awq", "cosine": 0.98, "kl": None, "agree": 12}]
    assert format_table(rows, ["recipe", "cosine", "kl", "agree", "note"]).split("\n") == [
        "recipe    cosine       kl  agree  note",
        "--------  ------  -------  -----  ----",
        "int8      0.9991  0.01235      1  -",
        "int4-awq    0.98        -     12  -",
    ]
    assert format_table([], ["a"]) == "a\n-"


def test_a_held_out_sample_that_is_the_image_alone_is_asked_the_default_question() -> None:
    """ECGInstruct items may prompt with the image alone; the API refuses a blank question, and the export's
    fidelity run must not stop there after hours of calibration and export."""
    from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, SyntheticEcg
    from pulse_edge.export.validate.fidelity import greedy_fidelity
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

    asked = []

    class Model:
        def generate(self, image, question, *, max_new_tokens):
            asked.append(question)
            return type("R", (), {"token_ids": [1, 2]})()

    image = SyntheticEcg("sinus", seed=1, heart_rate_bpm=70, width_px=880, height_px=680)
    samples = [CalibrationSample(id=i, source="synthetic", task="other", turns=((q, "a"),), synthetic=image)
               for i, q in (("blank", " "), ("asked", "What is the rhythm? "))]
    report = greedy_fidelity(Model(), Model(), samples, tokens=2)
    assert asked == [DEFAULT_QUESTION, DEFAULT_QUESTION, "What is the rhythm? ", "What is the rhythm? "]
    assert report["agreement"] == 1.0
