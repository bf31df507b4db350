"""The 12-lead print renderer: page geometry, grid, calibration, panel layout, traces that overlap rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.render import PrintLayout, column_spans, ecg_print_geometry, render_ecg
from pulse_edge.runtime.ecg.synthetic import LEADS, EcgRecord, synthesize_ecg

PANELS = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
FS = 500
MM_PER_S = 25.0
MM_PER_MV = 10.0


def flat_record(signals: np.ndarray, fs: int = FS) -> EcgRecord:
    return EcgRecord(
        signals=signals.astype(np.float32),
        fs=fs,
        rhythm="sinus",
        heart_rate_bpm=60.0,
        beat_times_s=np.array([], dtype=np.float64),
        labels=(),
        description="",
    )


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def ink(rgb: np.ndarray) -> np.ndarray:
    return (rgb < 80).all(axis=-1)


def major_red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r > 150) & (r - g > 80) & (r - b > 80)


def minor_red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r > 225) & (r - g > 25) & (r - g <= 80) & (r - b > 25)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    index = np.flatnonzero(mask)
    if index.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) > 1)
    starts = np.concatenate(([index[0]], index[breaks + 1]))
    ends = np.concatenate((index[breaks], [index[-1]]))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def ink_centre_y(rgb: np.ndarray, x: float, top: float, bottom: float) -> float:
    """Centre of the single ink run in column x between rows top and bottom."""
    column = ink(rgb[int(top) : int(bottom), round(x)])
    found = runs(column)
    assert len(found) == 1, f"expected one trace crossing at x={x}, found {found}"
    first, last = found[0]
    return int(top) + (first + last) / 2.0


def time_x(layout: PrintLayout, column: int, seconds_into_segment: float) -> float:
    return layout.segment_left_px(column) + seconds_into_segment * MM_PER_S * layout.px_per_mm


@pytest.fixture(scope="module")
def sinus() -> EcgRecord:
    return synthesize_ecg("sinus", seed=4, heart_rate_bpm=75.0)


@pytest.fixture(scope="module")
def sinus_print(sinus: EcgRecord) -> np.ndarray:
    return pixels(render_ecg(sinus, header="ID 0001  2026-11-21 10:04"))


@pytest.fixture(scope="module")
def layout() -> PrintLayout:
    return ecg_print_geometry(2200, 1700)


@pytest.mark.parametrize("size", [(2200, 1700), (3300, 2550), (3508, 2480), (1100, 850)])
def test_image_size_and_mode(sinus: EcgRecord, size: tuple[int, int]) -> None:
    image = render_ecg(sinus, width_px=size[0], height_px=size[1])
    assert image.mode == "RGB"
    assert image.size == size


def test_geometry_scales_with_the_page() -> None:
    letter = ecg_print_geometry(2200, 1700)
    assert letter.px_per_mm == pytest.approx(200 / 25.4, rel=1e-3)
    assert ecg_print_geometry(3300, 2550).px_per_mm == pytest.approx(1.5 * letter.px_per_mm, rel=1e-3)
    assert ecg_print_geometry(3508, 2480).px_per_mm == pytest.approx(300 / 25.4, rel=1e-3)  # A4 at 300 dpi
    for size in [(2200, 1700), (3300, 2550), (3508, 2480), (1100, 850), (1000, 1000)]:
        geometry = ecg_print_geometry(*size)
        assert geometry.x_px(0) > 0 and geometry.x_px(geometry.grid_width_mm) < size[0]
        assert geometry.y_px(0) > 0 and geometry.y_px(geometry.grid_height_mm) < size[1]
        assert geometry.trace_right_px - geometry.trace_left_px == pytest.approx(250 * geometry.px_per_mm)


def test_too_small_page_is_rejected() -> None:
    with pytest.raises(ConfigError):
        ecg_print_geometry(400, 300)


@pytest.mark.parametrize("vertical", [True, False])
def test_major_grid_lines_are_5_mm_apart(
    sinus_print: np.ndarray, layout: PrintLayout, vertical: bool
) -> None:
    top, bottom = int(layout.y_px(0)), int(layout.y_px(layout.grid_height_mm))
    left, right = int(layout.x_px(0)), int(layout.x_px(layout.grid_width_mm))
    grid = major_red(sinus_print[top : bottom + 1, left : right + 1])
    # A grid line is red along most of its length; traces and text only interrupt it.
    share = grid.mean(axis=0 if vertical else 1)
    centres = np.array([(a + b) / 2.0 for a, b in runs(share > 0.5)])
    expected_lines = (layout.grid_width_mm if vertical else layout.grid_height_mm) // 5 + 1
    assert centres.size == expected_lines
    assert np.abs(np.diff(centres) - 5.0 * layout.px_per_mm).max() <= 1.0


def test_minor_grid_lines_fill_each_5_mm_square(sinus_print: np.ndarray, layout: PrintLayout) -> None:
    row = sinus_print[round(layout.y_px(2.5))]  # halfway between two horizontal lines
    first, fifth = layout.x_px(100.0), layout.x_px(105.0)
    segment = minor_red(row[int(first) + 3 : int(fifth) - 2])
    assert len(runs(segment)) == 4
    assert not major_red(row[int(first) + 3 : int(fifth) - 2]).any()
    assert major_red(sinus_print[round(layout.y_px(2.5)), round(first) - 1 : round(first) + 2]).any()


def test_calibration_pulse_is_1_mv_tall(layout: PrintLayout) -> None:
    for gain in (10.0, 20.0):
        rgb = pixels(render_ecg(flat_record(np.zeros((12, 5000))), gain_mm_per_mv=gain))
        pulse_middle = layout.x_px(layout.cal_pulse_left_mm + 0.1 * MM_PER_S)
        lead_in = layout.x_px(layout.cal_pulse_left_mm - 1.0)
        for row in range(4):
            top, bottom = layout.band_px(row)
            base = ink_centre_y(rgb, lead_in, top, bottom)
            peak = ink_centre_y(rgb, pulse_middle, top, bottom)
            assert base == pytest.approx(layout.baseline_px(row), abs=1.0)
            assert base - peak == pytest.approx(gain * layout.px_per_mm, abs=1.0)


@pytest.mark.parametrize("speed", [12.5, 25.0, 50.0])
def test_calibration_pulse_lasts_200_ms_at_the_papers_speed(layout: PrintLayout, speed: float) -> None:
    """The pulse proves the speed as well as the gain: 5 mm wide at 25 mm/s, 10 mm at 50, 2.5 mm at 12.5."""
    rgb = pixels(render_ecg(flat_record(np.zeros((12, 5000))), paper_speed_mm_s=speed))
    peak_y = round(layout.baseline_px(0) - 10.0 * layout.px_per_mm)  # 1 mV at 10 mm/mV
    start = round(layout.x_px(layout.cal_pulse_left_mm - 1.0))
    row = ink(rgb[peak_y, start:round(layout.trace_left_px)])  # ink along the pulse's top
    width_mm = (np.flatnonzero(row)[-1] - np.flatnonzero(row)[0]) / layout.px_per_mm
    assert width_mm == pytest.approx(0.2 * speed, abs=0.5)


def test_each_panel_shows_its_own_lead_and_quarter_of_the_record(layout: PrintLayout) -> None:
    """Lead k sits at 0.08*(k+1) mV and every 2.5-s quarter adds 0.4 mV: both must land where expected."""
    t = np.arange(5000) / FS
    signals = 0.08 * (np.arange(12)[:, None] + 1) + 0.4 * np.floor(t / 2.5)[None, :]
    rgb = pixels(render_ecg(flat_record(signals)))
    for row, names in enumerate(PANELS):
        top, bottom = layout.band_px(row)
        for column, name in enumerate(names):
            expected_mv = 0.08 * (LEADS.index(name) + 1) + 0.4 * column
            y = ink_centre_y(rgb, time_x(layout, column, 1.25), top, bottom)
            assert layout.baseline_px(row) - y == pytest.approx(
                expected_mv * MM_PER_MV * layout.px_per_mm, abs=1.0
            )
    top, bottom = layout.band_px(3)
    for quarter in range(4):  # the rhythm strip is lead II over the whole 10 s
        y = ink_centre_y(rgb, time_x(layout, 0, 2.5 * quarter + 1.25), top, bottom)
        expected_mv = 0.16 + 0.4 * quarter
        assert layout.baseline_px(3) - y == pytest.approx(expected_mv * MM_PER_MV * layout.px_per_mm, abs=1.0)


def test_a_known_step_renders_at_the_right_height(layout: PrintLayout) -> None:
    signals = np.zeros((12, 5000))
    signals[LEADS.index("II"), 2500:] = 1.0  # +1 mV from t = 5 s
    rgb = pixels(render_ecg(flat_record(signals)))
    top, bottom = layout.band_px(3)
    before = ink_centre_y(rgb, time_x(layout, 0, 4.0), top, bottom)
    after = ink_centre_y(rgb, time_x(layout, 0, 7.5), top, bottom)
    assert before == pytest.approx(layout.baseline_px(3), abs=1.0)
    assert before - after == pytest.approx(10.0 * layout.px_per_mm, abs=1.0)


def test_rhythm_strip_spans_250_mm(layout: PrintLayout) -> None:
    rgb = pixels(render_ecg(flat_record(np.zeros((12, 5000)))))
    base = round(layout.baseline_px(3))
    near_baseline = ink(rgb[base - 2 : base + 3]).any(axis=0)
    near_baseline[: round(layout.trace_left_px) - round(2 * layout.px_per_mm)] = False  # calibration pulse
    (first, last), *rest = runs(near_baseline)
    assert not rest
    assert first == pytest.approx(layout.trace_left_px, abs=2.0)
    assert last - first == pytest.approx(250.0 * layout.px_per_mm, abs=3.0)


def test_every_panel_traces_its_signal(
    sinus: EcgRecord, sinus_print: np.ndarray, layout: PrintLayout
) -> None:
    """Highest and lowest ink in each panel match the signal's extremes (labels left out)."""
    ppm = layout.px_per_mm
    panels = [(row, column, name) for row, names in enumerate(PANELS) for column, name in enumerate(names)]
    panels += [(3, column, "II") for column in range(4)]  # the rhythm strip, in quarters
    for row, column, name in panels:
        start_s = 2.5 * column
        first_s, last_s = start_s + 0.4, start_s + 2.45  # skip the label at the segment start
        x0, x1 = (
            round(time_x(layout, column, first_s - start_s)),
            round(time_x(layout, column, last_s - start_s)),
        )
        top, bottom = layout.band_px(row)
        found = np.flatnonzero(ink(sinus_print[int(top) : int(bottom), x0:x1]).any(axis=1)) + int(top)
        assert found.size, f"no trace in panel {name} row {row}"
        signal = sinus.signals[LEADS.index(name), round(first_s * FS) : round(last_s * FS)]
        ys = np.clip(layout.baseline_px(row) - signal * MM_PER_MV * ppm, top + 0.5 * ppm, bottom - 0.5 * ppm)
        assert found.min() == pytest.approx(ys.min(), abs=3.0), name
        assert found.max() == pytest.approx(ys.max(), abs=3.0), name


def test_tall_complexes_run_into_the_next_row_at_their_true_height(layout: PrintLayout) -> None:
    """A 3 mV S wave (LVH's voltage criteria) is drawn 30 mm deep, into the row below, as a cart's print draws it;
    cut at its own row it would read 1.9 mV with nothing to say so. Only the grid's edge stops a trace."""
    signals = np.zeros((12, 5000))
    signals[LEADS.index("I"), 700:800] = -3.0
    signals[LEADS.index("III"), 700:800] = 60.0  # 600 mm up: far beyond the page
    rgb = pixels(render_ecg(flat_record(signals)))
    x = round(time_x(layout, 0, 1.5))
    column = np.flatnonzero(ink(rgb[:, x]))
    ppm = layout.px_per_mm
    depth = column[(column > layout.baseline_px(0) + ppm) & (column < layout.baseline_px(1) - 2 * ppm)]
    assert depth.max() == pytest.approx(layout.baseline_px(0) + 30 * ppm, abs=3.0)  # 3 mV x 10 mm/mV
    assert depth.max() > layout.band_px(0)[1]  # past its own row's band
    assert column.min() >= layout.y_px(0) - 1  # row 2's 60 mV stops at the grid's top edge


def test_header_is_drawn_above_the_grid_only(
    sinus: EcgRecord, sinus_print: np.ndarray, layout: PrintLayout
) -> None:
    plain = pixels(render_ecg(sinus))
    changed_rows = np.flatnonzero((plain != sinus_print).any(axis=(1, 2)))
    assert changed_rows.size > 0
    assert changed_rows.max() < layout.y_px(0)


def test_speed_and_gain_are_printed_at_the_bottom(sinus_print: np.ndarray, layout: PrintLayout) -> None:
    below_grid = sinus_print[round(layout.y_px(layout.grid_height_mm)) + 3 :]
    assert ink(below_grid).sum() > 50


def test_longer_records_print_their_first_10_s(layout: PrintLayout) -> None:
    long = synthesize_ecg("afib", seed=9, duration_s=14.0)
    cut = flat_record(long.signals[:, :5000])
    assert np.array_equal(pixels(render_ecg(long)), pixels(render_ecg(cut)))


def test_other_sampling_rates_render(layout: PrintLayout) -> None:
    record = synthesize_ecg("tachycardia", seed=1, fs=250)
    assert render_ecg(record).size == (2200, 1700)


def test_under_one_column_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"at least 2\.5 s"):
        render_ecg(flat_record(synthesize_ecg("sinus", seed=0).signals[:, :1249]))


def test_a_short_record_shows_its_first_quarter_window_in_every_column() -> None:
    # 10 s at 500 Hz: four consecutive quarters; 9.9 s and 9.5 s: the same quarters, lined up with the rhythm
    # strip, the last one shorter; 8 s (V4-V6 would get 0.5 s): the first 2.5 s in each, nothing invented
    assert column_spans(5000, 5000) == ((0, 1250), (1250, 2500), (2500, 3750), (3750, 5000))
    assert column_spans(4950, 5000) == ((0, 1250), (1250, 2500), (2500, 3750), (3750, 4950))
    assert column_spans(4750, 5000) == ((0, 1250), (1250, 2500), (2500, 3750), (3750, 4750))
    assert column_spans(4000, 5000) == ((0, 1250),) * 4
    assert column_spans(2400, 2500) == ((0, 625), (625, 1250), (1250, 1875), (1875, 2400))  # 250 Hz, 9.6 s
    short = synthesize_ecg("sinus", seed=0, duration_s=8.0)
    assert render_ecg(short).size == (2200, 1700)


@pytest.mark.parametrize(("speed", "gain"), [(30.0, 10.0), (25.0, 7.0)])
def test_unsupported_speed_or_gain_is_rejected(sinus: EcgRecord, speed: float, gain: float) -> None:
    with pytest.raises(ConfigError, match="not one of"):
        render_ecg(sinus, paper_speed_mm_s=speed, gain_mm_per_mv=gain)
