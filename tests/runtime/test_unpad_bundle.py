"""spatial_unpad bundles: the numpy merge against the torch reference, export, serving, and bad manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pulse_edge.export.build.bundle import ExportOptions, export_bundle
from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint
from pulse_edge.export.model.checkpoint import LoadedCheckpoint, load_checkpoint
from pulse_edge.export.model.torch_backend import TorchPipeline
from pulse_edge.export.validate.parity import ValidationPlan
from pulse_edge.runtime.bundle.manifest import MANIFEST_FILE, BundleError, Manifest, read_manifest
from pulse_edge.runtime.bundle.names import MANIFEST_VERSION, NEWLINE_FILE
from pulse_edge.runtime.bundle.seal import seal
from pulse_edge.runtime.ecg.render import render_ecg
from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
from pulse_edge.runtime.engines.bundle_engine import MERGES_SERVED
from pulse_edge.runtime.image.merge import MERGE_FUNCTIONS, flat_merge, unpad_merge
from pulse_edge.runtime.image.preprocess import MERGES, image_token_count, preprocess, select_best_resolution
from pulse_edge.runtime.pipeline import Pipeline

# (width, height): a landscape letter print, a portrait one, a square photo, a half-page strip
NAMED_SIZES = {"landscape": (2200, 1700), "portrait": (1700, 2200), "square": (1000, 1000), "strip": (1400, 700)}
# Every pinpoint, both sides of each aspect ratio, tiny and extreme images, sizes where unpad's float
# products land near integers (the 7-decimal rounding), and an image so flat its map keeps no rows.
EDGE_SIZES = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (3300, 2550), (2550, 3300),
              (3000, 400), (300, 1200), (200, 150), (1, 1), (999, 1001), (1001, 999), (5000, 3), (7, 2400),
              (176, 198), (205, 656)]  # the last two: LLaVA truncates 26.99999..., transformers rounds it up
LAYOUTS = ("llava", "llava_next")


@pytest.fixture(scope="module")
def unpad_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("unpad-ckpt")
    return {layout: make_tiny_checkpoint(base / layout, TinySpec(seed=5, merge="spatial_unpad", layout=layout))
            for layout in LAYOUTS}


@pytest.fixture(scope="module")
def unpad_models(unpad_checkpoints: dict[str, Path]) -> dict[str, LoadedCheckpoint]:
    return {layout: load_checkpoint(path) for layout, path in unpad_checkpoints.items()}


@pytest.fixture(scope="module")
def unpad_bundles(unpad_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported with the quick plan; its greedy check (ORT tokens == torch tokens, fp32) runs the merge too."""
    base = tmp_path_factory.mktemp("unpad-bundle")
    return {layout: export_bundle(path, base / layout, ExportOptions(plan=ValidationPlan.quick()))
            for layout, path in unpad_checkpoints.items()}


@pytest.fixture(scope="module")
def unpad_bundle(unpad_bundles: dict[str, Path]) -> Path:
    return unpad_bundles["llava"]


def _numpy_merge(loaded: LoadedCheckpoint, features: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    newline = loaded.model.image_newline.detach().numpy()
    return unpad_merge(features.numpy(), size, loaded.config.image, newline)


def _tiles(size: tuple[int, int], loaded: LoadedCheckpoint) -> int:
    width, height = select_best_resolution(size, loaded.config.image.grid_pinpoints)
    return 1 + (width // 336) * (height // 336)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(NAMED_SIZES))
def test_numpy_merge_equals_the_reference_on_real_features(unpad_models: dict[str, LoadedCheckpoint],
                                                           layout: str, name: str) -> None:
    """The vision tower's own features of an ECG print: the twin copies them into exactly the same places."""
    loaded = unpad_models[layout]
    assert loaded.config.layout == layout and loaded.config.image.merge == "spatial_unpad"
    size = NAMED_SIZES[name]
    pre = preprocess(render_ecg(synthesize_ecg("sinus", seed=3), width_px=size[0], height_px=size[1]),
                     loaded.config.image)
    with torch.inference_mode():
        features = loaded.model.vision_features(torch.from_numpy(pre.pixel_values))
        expected = loaded.model.merge(features, pre.image_size).numpy()
    ours = _numpy_merge(loaded, features, pre.image_size)
    assert ours.shape == expected.shape == (pre.num_image_tokens, loaded.config.text.hidden_size)
    np.testing.assert_array_equal(ours, expected)  # a merge only moves values: bit-equal, not close


@pytest.mark.parametrize("layout", LAYOUTS)
def test_numpy_merge_equals_the_reference_on_edge_sizes(unpad_models: dict[str, LoadedCheckpoint],
                                                        layout: str) -> None:
    loaded = unpad_models[layout]
    generator = torch.Generator().manual_seed(0)
    for size in [*NAMED_SIZES.values(), *EDGE_SIZES]:
        features = torch.randn(_tiles(size, loaded), 576, loaded.config.text.hidden_size, generator=generator)
        with torch.inference_mode():
            expected = loaded.model.merge(features, size).numpy()
        ours = _numpy_merge(loaded, features, size)
        assert ours.shape[0] == image_token_count(size, loaded.config.image), size
        np.testing.assert_array_equal(ours, expected, err_msg=str(size))


def test_numpy_flat_merge_equals_the_reference(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    features = torch.randn(5, 576, loaded.config.text.hidden_size)
    with torch.inference_mode():
        expected = loaded.model.merge(features, (2200, 1700)).numpy()
    np.testing.assert_array_equal(flat_merge(features.numpy(), (2200, 1700), loaded.config.image), expected)
    assert expected.shape[0] == image_token_count((2200, 1700), loaded.config.image)


def test_every_merge_a_layout_allows_is_served() -> None:
    assert set(MERGE_FUNCTIONS) == set(MERGES) == set(MERGES_SERVED)


def test_unpad_merge_refuses_what_it_cannot_merge(unpad_models: dict[str, LoadedCheckpoint]) -> None:
    layout = unpad_models["llava"].config.image
    features = np.zeros((5, 576, 8), np.float32)  # a letter print's 2x2 tiles + base
    with pytest.raises(ValueError, match="needs the image_newline vector"):
        unpad_merge(features, (2200, 1700), layout, None)
    with pytest.raises(ValueError, match=r"needs features \[3, 576, H\] \(2x1 tiles \+ base\), got \[5, 576, 8\]"):
        unpad_merge(features, (1400, 700), layout, np.zeros(8, np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_unpad_bundle_passes_validation(unpad_bundles: dict[str, Path],
                                                 unpad_models: dict[str, LoadedCheckpoint], layout: str) -> None:
    bundle = unpad_bundles[layout]
    manifest = read_manifest(bundle)
    assert manifest.version == MANIFEST_VERSION and manifest.image.merge == "spatial_unpad"
    assert manifest.image.unpad == {"llava": "llava", "llava_next": "transformers"}[layout]  # its code's rule
    assert manifest.image_newline == NEWLINE_FILE
    validation = manifest.validation
    assert validation["pass"] is True and validation["tolerance_level"] == "fp32"
    assert validation["greedy"]["required_equal"] is True and validation["greedy"]["all_equal"] is True
    assert manifest.source.layout == layout
    newline = np.load(bundle / NEWLINE_FILE)
    assert newline.dtype == np.float32 and newline.shape == (manifest.text.hidden_size,)
    reference = unpad_models[layout].model.image_newline.detach().numpy()
    np.testing.assert_array_equal(newline, reference)
    assert np.abs(reference).max() > 0  # a zero vector would let a dropped newline pass unnoticed


def test_ort_image_features_match_the_reference(unpad_bundle: Path, unpad_models: dict[str, LoadedCheckpoint]) -> None:
    loaded = unpad_models["llava"]
    engine = Pipeline.from_bundle(unpad_bundle).engine
    pre = preprocess(render_ecg(synthesize_ecg("afib", seed=4), width_px=1700, height_px=2200), loaded.config.image)
    ours = engine.image_features(pre)
    with torch.inference_mode():
        expected = loaded.model.merge(loaded.model.vision_features(torch.from_numpy(pre.pixel_values)),
                                      pre.image_size).numpy()
    assert ours.shape == expected.shape == (pre.num_image_tokens, loaded.config.text.hidden_size)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("rhythm", "size", "question"), [("sinus", (2200, 1700), "What is the rhythm?"),
                                                          ("afib", (1400, 700), "Is there ST elevation in V2?")])
def test_ort_greedy_tokens_equal_torch(unpad_bundles: dict[str, Path], unpad_checkpoints: dict[str, Path],
                                       layout: str, rhythm: str, size: tuple[int, int], question: str) -> None:
    image = render_ecg(synthesize_ecg(rhythm, seed=21), width_px=size[0], height_px=size[1])
    ours = Pipeline.from_bundle(unpad_bundles[layout]).generate(image, question, max_new_tokens=16)
    ref = TorchPipeline.from_checkpoint(unpad_checkpoints[layout], dtype="fp32", device="cpu").generate(
        image, question, max_new_tokens=16)
    assert ours.token_ids == ref.token_ids and len(ours.token_ids) > 1
    assert (ours.image_tokens, ours.prompt_tokens, ours.text) == (ref.image_tokens, ref.prompt_tokens, ref.text)
    assert ours.image_tokens == image_token_count(size, read_manifest(unpad_bundles[layout]).image)


def _manifest_dict(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def test_unpad_manifest_without_newline_is_one_clear_line(unpad_bundle: Path) -> None:
    d = _manifest_dict(unpad_bundle)
    del d["image_newline"]
    with pytest.raises(BundleError, match=r"the spatial_unpad merge needs 'image_newline'") as info:
        Manifest.from_dict(seal(d))
    assert "\n" not in str(info.value)


def test_unpad_bundle_without_the_newline_file_is_refused(unpad_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(unpad_bundle, tmp_path / "b"))
    (copy / NEWLINE_FILE).unlink()
    with pytest.raises(BundleError, match=rf"{NEWLINE_FILE} named in {MANIFEST_FILE} is missing"):
        read_manifest(copy)


def test_a_newline_of_the_wrong_shape_is_refused(unpad_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(unpad_bundle, tmp_path / "b"))
    np.save(copy / NEWLINE_FILE, np.zeros(3, np.float32))
    with pytest.raises(BundleError, match=r"holds float32 \[3\], not the image_newline vector \(float \[64\]\)"):
        Pipeline.from_bundle(copy)


def test_flat_manifests_name_no_newline(unpad_bundle: Path) -> None:
    d = _manifest_dict(unpad_bundle)
    d["image"]["merge"] = "flat"
    with pytest.raises(BundleError, match="'image_newline' belongs to the spatial_unpad merge, not 'flat'"):
        Manifest.from_dict(seal(d))
    del d["image_newline"]
    flat = Manifest.from_dict(seal(d))
    assert flat.image_newline is None and "image_newline" not in flat.to_dict()  # flat manifests stay unchanged
    unpad = Manifest.from_dict(_manifest_dict(unpad_bundle))
    assert Manifest.from_dict(json.loads(json.dumps(unpad.to_dict()))) == unpad

