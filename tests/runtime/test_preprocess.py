"""LLaVA-1.6 anyres preprocessing: pinpoint choice, padding, tile order, normalisation, token counts.

Expected values are worked out by hand in the comments (pinpoints are, in order,
336x672, 672x336, 672x672, 1008x336, 336x1008 as width x height), never by calling
the code under test.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.image.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PULSE_PINPOINTS,
    ImageLayout,
    anyres_tiles,
    image_token_count,
    normalize,
    preprocess,
    resize_and_pad,
    select_best_resolution,
    tile_count,
)

FLAT = ImageLayout()
UNPAD = ImageLayout(merge="spatial_unpad")  # transformers' llava_next rule
UNPAD_LLAVA = ImageLayout(merge="spatial_unpad", unpad="llava")  # LLaVA's own code: the original checkpoint layout
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)

# (width, height), best pinpoint, grid (columns, rows), flat tokens = 576 * (1 + columns * rows)
SIZES = [
    # Letter landscape at 200 dpi. Every pinpoint is smaller than 3.74 Mpx, so effective = fitted area:
    # 336x672: s=336/2200 -> 336x259 = 87024; 672x336: s=336/1700 -> 434x336 = 145824;
    # 672x672: s=672/2200 -> 672x519 = 348768; 1008x336: s=336/1700 -> 434x336; 336x1008: 336x259.
    # Best 672x672 -> 2x2 tiles + base = 5 -> 2880.
    ((2200, 1700), (672, 672), (2, 2), 2880),
    # Portrait mirror: 672x672 fits 519x672 = 348768, far above 336x434 = 145824.
    ((1700, 2200), (672, 672), (2, 2), 2880),
    # Letter at 300 dpi, same 1.294 aspect: 672x672 -> 672x519 again.
    ((3300, 2550), (672, 672), (2, 2), 2880),
    # A4 landscape at 300 dpi: 336x672 -> 336x237 = 79632; 672x336: s=336/2480 -> 475x336 = 159600;
    # 672x672: s=672/3508 -> 672x475 = 319200; 1008x336 -> 475x336 = 159600. Best 672x672.
    ((3508, 2480), (672, 672), (2, 2), 2880),
    # Wide strip (aspect 3.75): 336x672 -> 336x89 = 29904; 672x336: s=0.224 -> 672x179 = 120288;
    # 672x672: also 672x179 (same effective, more waste: loses the tie); 1008x336: s=0.336 -> 1008x268
    # = 270144. Best 1008x336 -> 3x1 tiles + base = 4 -> 2304.
    ((3000, 800), (1008, 336), (3, 1), 2304),
    # Tall strip, mirror image of the above: 336x1008 -> 268x1008 = 270144 wins; 1x3 tiles.
    ((800, 3000), (336, 1008), (1, 3), 2304),
    # Tiny (30000 px): every pinpoint upscales, so effective is capped at 30000 for all five; the
    # waste is 225792-30000 for both 336x672 and 672x336 (equal), larger for the rest. Only a strictly
    # smaller waste replaces the incumbent, so the FIRST pinpoint, 336x672 (portrait!), wins for this
    # landscape image: 1x2 tiles + base = 3 -> 1728.
    ((200, 150), (336, 672), (1, 2), 1728),
    # Exactly a pinpoint: 672x672 keeps all 451584 px; 336x672 / 672x336 / 1008x336 only 336x336.
    ((672, 672), (672, 672), (2, 2), 2880),
    # One tile's worth: 336x672, 672x336 and 1008x336 all keep all 112896 px; 336x672 and 672x336
    # waste the same 112896 and 336x672 comes first; 1008x336 wastes more. -> 1x2 tiles, 1728.
    ((336, 336), (336, 672), (1, 2), 1728),
    # Exactly 1008x336: keeps all 338688 px; 672x336 would keep 672x224 = 150528. -> 3x1, 2304.
    ((1008, 336), (1008, 336), (3, 1), 2304),
    # 35 Mpx (a 600-dpi-class scan): 336x672 -> 336x240 = 80640; 672x336: s=0.0672 -> 470x336 = 157920;
    # 672x672: s=0.096 -> 672x480 = 322560; 1008x336 -> 470x336; 336x1008 -> 336x240. Best 672x672.
    ((7000, 5000), (672, 672), (2, 2), 2880),
]

# spatial_unpad: 576 (base) + h' * (w' + 1), the stitched feature map being (rows*24) x (columns*24).
UNPAD_SIZES = [
    # 2x2 -> 48x48; 2200/1700 > 1, so the height is cropped: int(1700*48/2200) = int(37.09) = 37,
    # pad = (48-37)//2 = 5, h' = 48-10 = 38 -> 576 + 38*49 = 2438.
    ((2200, 1700), 2438),
    # Portrait: width cropped: int(1700*48/2200) = 37, pad 5, w' = 38 -> 576 + 48*39 = 2448.
    ((1700, 2200), 2448),
    # A4: int(2480*48/3508) = int(33.93) = 33, pad = 7, h' = 34 -> 576 + 34*49 = 2242.
    ((3508, 2480), 2242),
    # 3x1 -> 24 high, 72 wide; 3.75 > 3: int(800*72/3000) = int(19.2) = 19, pad 2, h' = 20
    # -> 576 + 20*73 = 2036.
    ((3000, 800), 2036),
    # 1x2 -> 48 high, 24 wide; 1.33 > 0.5: int(150*24/200) = 18, pad = 15, h' = 18 -> 576 + 18*25 = 1026.
    ((200, 150), 1026),
    # 1x2, square image: int(336*24/336) = 24, pad = 12, h' = 24 -> 576 + 24*25 = 1176.
    ((336, 336), 1176),
    # 2x2, square image into a square map: nothing to crop -> 576 + 48*49 = 2928.
    ((672, 672), 2928),
]


def solid(size: tuple[int, int], colour: tuple[int, int, int] = WHITE) -> Image.Image:
    return Image.new("RGB", size, colour)


def quadrants(size: tuple[int, int], colours: list[list[tuple[int, int, int]]]) -> Image.Image:
    """An image split into len(colours) rows and len(colours[0]) columns of solid colour."""
    width, height = size
    rows, columns = len(colours), len(colours[0])
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(columns):
            rows_slice = slice(r * height // rows, (r + 1) * height // rows)
            array[rows_slice, c * width // columns : (c + 1) * width // columns] = colours[r][c]
    return Image.fromarray(array)


def mean_colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(round(float(v)) for v in np.asarray(image, dtype=np.float64).mean(axis=(0, 1)))


# --- pinpoint choice and token counts -------------------------------------------------------


@pytest.mark.parametrize(("size", "best", "grid", "tokens"), SIZES)
def test_best_resolution_grid_and_flat_tokens(size, best, grid, tokens):
    assert select_best_resolution(size, PULSE_PINPOINTS) == best
    assert image_token_count(size, FLAT) == tokens


@pytest.mark.parametrize(("size", "best", "grid", "tokens"), [s for s in SIZES if s[0][0] * s[0][1] < 5e6])
def test_preprocess_shapes_follow_the_grid(size, best, grid, tokens):
    out = preprocess(solid(size), FLAT)
    columns, rows = grid
    assert out.grid == grid
    assert out.image_size == size
    assert out.pixel_values.shape == (1 + columns * rows, 3, 336, 336)
    assert out.pixel_values.dtype == np.float32
    assert out.pixel_values.flags["C_CONTIGUOUS"]
    assert out.num_image_tokens == tokens == 576 * out.pixel_values.shape[0]
    assert tile_count(size, FLAT) == out.pixel_values.shape[0]  # what the tower runs
    assert tile_count(size, UNPAD) == preprocess(solid(size), UNPAD).pixel_values.shape[0]  # fewer tokens, same tiles


@pytest.mark.parametrize(("size", "tokens"), UNPAD_SIZES)
def test_spatial_unpad_token_counts(size, tokens):
    assert image_token_count(size, UNPAD) == tokens


def test_token_count_matches_llava_merge_done_with_tensors():
    """Count tokens by running LLaVA-1.6's spatial_unpad merge on dummy features with torch."""
    torch = pytest.importorskip("torch")
    side = 24
    for width, height in [size for size, _ in UNPAD_SIZES] + [(1234, 567), (501, 1999), (640, 480)]:
        best_w, best_h = select_best_resolution((width, height), PULSE_PINPOINTS)
        columns, rows = best_w // 336, best_h // 336
        features = torch.zeros(1 + columns * rows, side * side, 1)
        tiles = features[1:].view(rows, columns, side, side, 1)
        stitched = tiles.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [1, rows*24, columns*24]
        cur_h, cur_w = stitched.shape[1:]
        if width / height > cur_w / cur_h:
            pad = (cur_h - int(height * (cur_w / width))) // 2
            stitched = stitched[:, pad : cur_h - pad, :]
        else:
            pad = (cur_w - int(width * (cur_h / height))) // 2
            stitched = stitched[:, :, pad : cur_w - pad]
        newline = torch.zeros(1, 1, 1).expand(*stitched.shape[:-1], 1)
        merged = torch.cat((stitched, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        assert image_token_count((width, height), UNPAD_LLAVA) == side * side + merged.shape[0], (width, height)


def test_select_best_resolution_agrees_with_transformers():
    image_processing_utils = pytest.importorskip("transformers.image_processing_utils")
    hf_pinpoints = [[h, w] for w, h in PULSE_PINPOINTS]  # transformers speaks (height, width)
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 8000, size=(3000, 2)).tolist():
        hf_h, hf_w = image_processing_utils.select_best_resolution((height, width), hf_pinpoints)
        assert select_best_resolution((width, height), PULSE_PINPOINTS) == (hf_w, hf_h)


def test_unpad_counts_agree_with_transformers_llava_next():
    """transformers rounds to 7 decimals before int() where LLaVA truncates; compare where both agree."""
    torch = pytest.importorskip("torch")
    llava_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
    rng = np.random.default_rng(1)
    compared = 0
    for width, height in rng.integers(20, 6000, size=(300, 2)).tolist():
        best_w, best_h = select_best_resolution((width, height), PULSE_PINPOINTS)
        feat_w, feat_h = best_w // 336 * 24, best_h // 336 * 24
        kept = height * (feat_w / width) if width / height > feat_w / feat_h else width * (feat_h / height)
        if int(kept) != int(round(kept, 7)):
            continue
        unpadded = llava_next.unpad_image(torch.zeros(1, feat_h, feat_w), (height, width))
        expected = 576 + unpadded.shape[1] * (unpadded.shape[2] + 1)
        assert image_token_count((width, height), UNPAD) == expected, (width, height)
        compared += 1
    assert compared > 250


def test_a_size_where_floats_land_just_under_a_whole_row_counts_and_merges_by_the_checkpoints_code():
    """176 x 198 on a 1 x 2 grid: 198 x 24 / 176 is 26.999999999999996 in floats. Rounded to 27 before int(), as
    transformers' llava_next does, the feature map keeps 28 rows: 576 + 28 x 25 = 1276 tokens; truncated to 26, as
    LLaVA's own unpad_image does (it runs checkpoints of the original layout), 26 rows: 1226 (every layout was
    counted the transformers way). The count the prompt reserves and the merge's rows must agree on it."""
    from pulse_edge.runtime.image.merge import unpad_merge

    features = np.zeros((3, 576, 8), dtype=np.float32)  # the base tile and a 1 x 2 grid
    for layout, tokens in ((UNPAD, 576 + 28 * 25), (UNPAD_LLAVA, 576 + 26 * 25)):
        assert image_token_count((176, 198), layout) == tokens
        assert unpad_merge(features, (176, 198), layout, np.zeros(8, dtype=np.float32)).shape == (tokens, 8)


def test_the_unpad_rule_is_written_only_where_the_merge_unpads():
    assert "unpad" not in ImageLayout().to_dict()  # a flat manifest reads in runtimes from before the field
    assert ImageLayout.from_dict(UNPAD_LLAVA.to_dict()) == UNPAD_LLAVA
    with pytest.raises(ConfigError, match="image unpad rule 'nearest' is not supported; allowed: llava, transformers"):
        ImageLayout(merge="spatial_unpad", unpad="nearest")


def test_select_best_resolution_rejects_empty_image():
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 10), PULSE_PINPOINTS)


# --- padding and the base view ---------------------------------------------------------------


def black_rows(canvas: Image.Image) -> np.ndarray:
    return np.flatnonzero(np.asarray(canvas).max(axis=(1, 2)) == 0)


def black_columns(canvas: Image.Image) -> np.ndarray:
    return np.flatnonzero(np.asarray(canvas).max(axis=(0, 2)) == 0)


def test_landscape_is_letterboxed_top_and_bottom():
    # 2200x1700 into 672x672: width-limited, height ceil(1700*672/2200) = ceil(519.27) = 520,
    # pasted at y = (672-520)//2 = 76: black rows 0..75 and 596..671, content rows 76..595.
    canvas = resize_and_pad(solid((2200, 1700)), (672, 672))
    assert canvas.size == (672, 672)
    assert black_rows(canvas).tolist() == [*range(76), *range(596, 672)]
    assert black_columns(canvas).size == 0
    assert np.asarray(canvas)[76:596].min() == 255


def test_portrait_is_pillarboxed_left_and_right():
    # Mirror image: width ceil(1700*672/2200) = 520 at x = 76.
    canvas = resize_and_pad(solid((1700, 2200)), (672, 672))
    assert black_columns(canvas).tolist() == [*range(76), *range(596, 672)]
    assert black_rows(canvas).size == 0


def test_odd_padding_puts_the_extra_row_at_the_bottom():
    # 3000x800 into 1008x336: height ceil(800*0.336) = ceil(268.8) = 269, y = (336-269)//2 = 33:
    # 33 black rows on top, 336-33-269 = 34 below.
    canvas = resize_and_pad(solid((3000, 800)), (1008, 336))
    assert black_rows(canvas).tolist() == [*range(33), *range(302, 336)]


def test_small_image_is_upscaled_into_the_tie_break_winner():
    # 200x150 into 336x672: width-limited (1.68 < 4.48), height ceil(150*1.68) = 252 at y = (672-252)//2
    # = 210; content rows 210..461.
    canvas = resize_and_pad(solid((200, 150)), (336, 672))
    assert black_rows(canvas).tolist() == [*range(210), *range(462, 672)]


def test_exact_fit_has_no_padding():
    canvas = resize_and_pad(solid((672, 672)), (672, 672))
    assert black_rows(canvas).size == 0
    assert black_columns(canvas).size == 0


def test_padded_content_is_centred():
    # A red left half and blue right half survive the fit in the same place, between the bands.
    canvas = np.asarray(resize_and_pad(quadrants((2200, 1700), [[RED, BLUE]]), (672, 672)))
    assert tuple(canvas[336, 100]) == RED
    assert tuple(canvas[336, 572]) == BLUE
    assert tuple(canvas[10, 336]) == BLACK


def test_base_view_is_squashed_not_padded():
    # The whole 2200x1700 image squashed to 336x336: halves stay halves, and no black band appears
    # (a letterboxed base would have 336 - ceil(1700*336/2200) = 76 black rows).
    base = np.asarray(anyres_tiles(quadrants((2200, 1700), [[RED, BLUE]]), FLAT)[0])
    assert base.shape == (336, 336, 3)
    assert (base[:, :160] == RED).all()
    assert (base[:, 176:] == BLUE).all()
    assert black_rows(Image.fromarray(base)).size == 0


# --- tile order ------------------------------------------------------------------------------


def test_tiles_are_row_major():
    # 672x672 -> 2x2 grid, no padding: tile k is exactly quadrant k, read left to right, top to bottom.
    image = quadrants((672, 672), [[RED, GREEN], [BLUE, WHITE]])
    tiles = anyres_tiles(image, FLAT)
    assert len(tiles) == 5
    assert [mean_colour(t) for t in tiles[1:]] == [RED, GREEN, BLUE, WHITE]


def test_wide_tiles_go_left_to_right_and_tall_tiles_top_to_bottom():
    wide = anyres_tiles(quadrants((1008, 336), [[RED, GREEN, BLUE]]), FLAT)
    tall = anyres_tiles(quadrants((336, 1008), [[RED], [GREEN], [BLUE]]), FLAT)
    assert [mean_colour(t) for t in wide[1:]] == [RED, GREEN, BLUE]
    assert [mean_colour(t) for t in tall[1:]] == [RED, GREEN, BLUE]


def test_pixel_values_keep_tile_order():
    out = preprocess(quadrants((672, 672), [[RED, GREEN], [BLUE, WHITE]]), FLAT)
    # Red tile: channel 0 at 1.0 is (1 - mean) / std, channels 1 and 2 at 0.0 are -mean / std.
    red_tile = out.pixel_values[1]
    assert red_tile[0].mean() == pytest.approx((1 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-5)
    assert red_tile[1].mean() == pytest.approx(-CLIP_MEAN[1] / CLIP_STD[1], abs=1e-5)
    assert out.pixel_values[3][2].mean() == pytest.approx((1 - CLIP_MEAN[2]) / CLIP_STD[2], abs=1e-5)


# --- normalisation ---------------------------------------------------------------------------


def random_tile(seed: int, size: int = 336) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_normalize_matches_an_independent_float64_computation():
    tiles = [random_tile(1), random_tile(2)]
    got = normalize(tiles, FLAT)
    assert got.shape == (2, 3, 336, 336)
    assert got.dtype == np.float32
    for k, tile in enumerate(tiles):
        pixels = np.asarray(tile, dtype=np.float64)
        for channel in range(3):
            expected = (pixels[:, :, channel] / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
            assert np.abs(got[k, channel] - expected).max() < 1e-6


def test_normalize_extremes():
    got = normalize([solid((336, 336), BLACK), solid((336, 336), WHITE)], FLAT)
    for channel in range(3):
        assert got[0, channel].max() == pytest.approx(-CLIP_MEAN[channel] / CLIP_STD[channel], abs=1e-6)
        assert got[1, channel].min() == pytest.approx((1 - CLIP_MEAN[channel]) / CLIP_STD[channel], abs=1e-6)


def clip_image_processor():
    """transformers' CLIP processor built from explicit arguments (no download).

    transformers 5 backs `CLIPImageProcessor` with torchvision and falls back to the PIL
    backend without it; ask for the PIL backend by name when it exists.
    """
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        return cls(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            do_convert_rgb=True,
        )
    except ImportError as exc:  # a torchvision-only image processor without torchvision
        pytest.skip(f"CLIPImageProcessor cannot be built offline here: {exc}")


def test_normalize_matches_transformers_clip_image_processor():
    processor = clip_image_processor()
    tile = random_tile(3)
    expected = processor(tile, return_tensors="np")["pixel_values"]
    assert expected.shape == (1, 3, 336, 336)
    assert np.abs(normalize([tile], FLAT) - expected).max() < 1e-5


def test_preprocess_matches_llava_process_anyres_with_transformers_clip():
    """LLaVA's recipe spelled out with Pillow + transformers' CLIP processor on a non-trivial image."""
    processor = clip_image_processor()
    image = random_tile(4, size=700).resize((900, 700))  # 900x700 -> 672x672 (672x523 content)
    padded = Image.new("RGB", (672, 672))
    padded.paste(image.resize((672, math.ceil(700 * 672 / 900))), (0, (672 - 523) // 2))
    crops = [padded.crop((x, y, x + 336, y + 336)) for y in (0, 336) for x in (0, 336)]
    views = [image.resize((336, 336)), *crops]
    expected = np.concatenate([processor(v, return_tensors="np")["pixel_values"] for v in views])
    assert np.abs(preprocess(image, FLAT).pixel_values - expected).max() < 1e-5


def test_non_rgb_input_is_converted():
    grey = Image.new("L", (672, 672), 128)
    out = preprocess(grey, FLAT)
    assert out.pixel_values.shape == (5, 3, 336, 336)
    assert out.pixel_values[0, 0, 0, 0] == pytest.approx((128 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-6)


# --- layout ----------------------------------------------------------------------------------


def test_layout_defaults_are_pulse():
    assert FLAT.tokens_per_tile == 576
    assert FLAT.grid_pinpoints == PULSE_PINPOINTS
    assert FLAT.merge == "flat"


def test_layout_round_trips_through_json():
    layout = ImageLayout(merge="spatial_unpad", grid_pinpoints=((336, 336), (672, 336)))
    again = ImageLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert again.grid_pinpoints == ((336, 336), (672, 336))


def test_unknown_merge_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"flat.*spatial_unpad"):
        ImageLayout.from_dict({"merge": "spatial"})


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"tile": 336}, "unknown image layout keys"),
        ({"grid_pinpoints": [[336, 500]]}, "multiple of tile_size"),
        ({"grid_pinpoints": []}, "empty"),
        ({"patch_size": 15}, "multiple of patch_size"),
        ({"tile_size": "big"}, "tile_size"),
    ],
)
def test_bad_layouts_raise_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        ImageLayout.from_dict(bad)


# --- speed -----------------------------------------------------------------------------------


def test_letter_page_preprocesses_in_tens_of_milliseconds():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (1700, 2200, 3), dtype=np.uint8))
    preprocess(image, FLAT)  # warm-up
    start = time.perf_counter()
    out = preprocess(image, FLAT)
    elapsed = time.perf_counter() - start
    assert out.pixel_values.shape == (5, 3, 336, 336)
    # ~50 ms on a 2-core CI box, almost all of it Pillow's two BICUBIC resizes; 0.5 s catches a
    # per-pixel Python loop or a per-tile normalisation regression without flaking.
    assert elapsed < 0.5


def test_the_normalisation_is_openai_clips_as_written_into_every_bundle() -> None:
    """Every other test builds its expectation from CLIP_MEAN/CLIP_STD themselves, and export writes them into each
    manifest: two channels swapped passed every test (a sixth mutation round). transformers' OPENAI_CLIP_MEAN/STD."""
    from pulse_edge.runtime.image.preprocess import CLIP_MEAN, CLIP_STD

    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_the_waste_tie_break_is_by_canvas_area() -> None:
    """LLaVA's select_best_resolution: least waste by area. PULSE's pinpoints cannot tell area from width + height
    (a brute force over every size to 2499 px found no difference); other pinpoint sets can."""
    assert select_best_resolution((300, 300), ((672, 672), (1008, 336))) == (1008, 336)


def test_a_palette_image_is_resampled_as_its_rgb_twin() -> None:
    """Pillow resizes "P" images with NEAREST: the conversion to RGB comes first (a uniform grey could not show it)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    assert np.array_equal(preprocess(palette, ImageLayout()).pixel_values,
                          preprocess(palette.convert("RGB"), ImageLayout()).pixel_values)
