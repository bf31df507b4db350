"""Render 12 leads (a synthetic `EcgRecord` or a recording's `TwelveLead`) as a standard 12-lead ECG print.

The layout is the one every cardiologist knows: red millimetre paper, 3 rows x
4 columns of 2.5-s lead segments (I aVR V1 V4 / II aVL V2 V5 / III aVF V3 V6,
column k showing seconds [2.5k, 2.5k + 2.5) of the same recording) and a
full-length lead II rhythm strip underneath, each row preceded by a 1 mV
calibration pulse. A recording too short to fill the last column (under 9.5 s:
`column_spans`, FULL_ENOUGH; 2.5 s at least) shows its first 2.5 s in every
column; from 9.5 s each column keeps its own time slot. The rhythm strip ends
where the signal does: nothing is drawn that was not recorded. Millimetres are square: one `px_per_mm` serves both axes,
derived from the page size as if the page were US letter or A4 landscape.

All geometry lives in `PrintLayout` so tests can compute where things are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.leads import LEADS

# Landscape paper sizes in mm; the page is matched to the one of closest aspect ratio.
_PAPERS = MappingProxyType({"letter": (279.4, 215.9), "a4": (297.0, 210.0)})

_TRACE_MM = 250  # 10 s at 25 mm/s
_CAL_AREA_MM = 15  # left of the traces, holds the calibration pulse; a major line
_RIGHT_PAD_MM = 5
_GRID_WIDTH_MM = _CAL_AREA_MM + _TRACE_MM + _RIGHT_PAD_MM
_HEADER_MM = 12.0
_FOOTER_MM = 8.0
_MAX_ROW_PITCH_MM = 50.0
_BASELINE_FRACTION = 0.6  # QRS complexes point up more than down, so give them more room
_CAL_PULSE_LEFT_MM = 3.0
_CAL_PULSE_S = 0.2
_CAL_PULSE_MV = 1.0
_MIN_PX_PER_MM = 3.0  # below this the 1-mm grid becomes solid colour
# The largest print drawn: the largest image the runtime reads (runtime/inputs/images.py, MAX_PIXELS); a
# 600 dpi letter page is 33.7 MP. Without a bound, 100000x100000 asked for a 28 GiB canvas.
MAX_PRINT_PIXELS = 64_000_000
_COLUMNS = 4
_ROWS = 4

_PAPER_SPEEDS_MM_S = (12.5, 25.0, 50.0)
_GAINS_MM_PER_MV = (2.5, 5.0, 10.0, 20.0)

# Rows 1-3 of the print; row 4 is the lead II rhythm strip.
_PANEL_LEADS = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
_RHYTHM_LEAD = "II"

_WHITE = (255, 255, 255)
_MINOR_RED = (246, 196, 196)
_MAJOR_RED = (226, 112, 112)
_INK = (0, 0, 0)


class Printable(Protocol):
    """What the renderer needs: [12, n] millivolts in LEADS order and their sampling rate."""

    signals: np.ndarray
    fs: int


@dataclass(frozen=True)
class PrintLayout:
    """Where everything sits on the page. Positions in mm are relative to the grid's top-left corner."""

    width_px: int
    height_px: int
    paper: str
    px_per_mm: float
    grid_left_px: int
    grid_top_px: int
    grid_width_mm: int
    grid_height_mm: int
    row_pitch_mm: float
    baselines_mm: tuple[float, ...]  # one per row, from the grid top; whole millimetres
    trace_left_mm: float = float(_CAL_AREA_MM)
    trace_length_mm: float = float(_TRACE_MM)
    cal_pulse_left_mm: float = _CAL_PULSE_LEFT_MM

    def x_px(self, mm: float) -> float:
        return self.grid_left_px + mm * self.px_per_mm

    def y_px(self, mm: float) -> float:
        return self.grid_top_px + mm * self.px_per_mm

    def grid_lines_px(self, step_mm: int, vertical: bool) -> np.ndarray:
        """Pixel positions of the vertical (x) or horizontal (y) grid lines every `step_mm`."""
        origin, extent = (
            (self.grid_left_px, self.grid_width_mm) if vertical else (self.grid_top_px, self.grid_height_mm)
        )
        return origin + np.rint(np.arange(0, extent + 1, step_mm) * self.px_per_mm).astype(np.int64)

    def baseline_px(self, row: int) -> float:
        return self.y_px(self.baselines_mm[row])

    def band_px(self, row: int) -> tuple[float, float]:
        """Top and bottom pixel of the horizontal band that row `row` may draw in."""
        return self.y_px(row * self.row_pitch_mm), self.y_px((row + 1) * self.row_pitch_mm)

    def segment_left_px(self, column: int) -> float:
        return self.x_px(self.trace_left_mm + column * self.trace_length_mm / _COLUMNS)

    @property
    def trace_left_px(self) -> float:
        return self.x_px(self.trace_left_mm)

    @property
    def trace_right_px(self) -> float:
        return self.x_px(self.trace_left_mm + self.trace_length_mm)


def ecg_print_geometry(width_px: int, height_px: int) -> PrintLayout:
    """The print layout of a `width_px` x `height_px` page."""
    if width_px < 1 or height_px < 1 or width_px * height_px > MAX_PRINT_PIXELS:
        raise ConfigError(f"page {width_px}x{height_px} px is outside 1x1 .. {MAX_PRINT_PIXELS:,} pixels "
                          "(2200x1700 is a letter page at 200 dpi)")
    paper = min(
        _PAPERS,
        key=lambda name: abs(math.log((width_px / height_px) / (_PAPERS[name][0] / _PAPERS[name][1]))),
    )
    paper_w, paper_h = _PAPERS[paper]
    px_per_mm = min(width_px / paper_w, height_px / paper_h)
    if px_per_mm < _MIN_PX_PER_MM:
        raise ConfigError(
            f"page {width_px}x{height_px} px gives {px_per_mm:.2f} px/mm; "
            f"at least {_MIN_PX_PER_MM:g} are needed"
        )
    page_w_mm, page_h_mm = width_px / px_per_mm, height_px / px_per_mm
    usable_mm = page_h_mm - _HEADER_MM - _FOOTER_MM
    grid_h = int(min(_ROWS * _MAX_ROW_PITCH_MM, usable_mm) // 5 * 5)
    pitch = grid_h / _ROWS
    top_mm = (page_h_mm - grid_h - _HEADER_MM - _FOOTER_MM) / 2.0 + _HEADER_MM
    return PrintLayout(
        width_px=width_px,
        height_px=height_px,
        paper=paper,
        px_per_mm=px_per_mm,
        grid_left_px=round((page_w_mm - _GRID_WIDTH_MM) / 2.0 * px_per_mm),
        grid_top_px=round(top_mm * px_per_mm),
        grid_width_mm=_GRID_WIDTH_MM,
        grid_height_mm=grid_h,
        row_pitch_mm=pitch,
        baselines_mm=tuple(
            float(math.floor(pitch * (row + _BASELINE_FRACTION) + 0.5)) for row in range(_ROWS)
        ),
    )


def render_ecg(
    record: Printable,
    *,
    width_px: int = 2200,
    height_px: int = 1700,
    header: str | None = None,
    paper_speed_mm_s: float = 25.0,
    gain_mm_per_mv: float = 10.0,
) -> Image.Image:
    """The 12-lead print of the first 250 mm of `record` (10 s at 25 mm/s) as an RGB image."""
    _check_settings(paper_speed_mm_s, gain_mm_per_mv)
    window_s = _TRACE_MM / paper_speed_mm_s
    n_window = round(window_s * record.fs)
    n_leads, n_samples = record.signals.shape
    if n_leads != len(LEADS) or n_samples < round(window_s / _COLUMNS * record.fs):
        raise ConfigError(
            f"the print needs {len(LEADS)} leads x at least {window_s / _COLUMNS:g} s; "
            f"record has {n_leads} leads x {n_samples / record.fs:g} s"
        )
    layout = ecg_print_geometry(width_px, height_px)
    image = Image.fromarray(_grid_canvas(layout))
    pen = _Pen(ImageDraw.Draw(image), layout, paper_speed_mm_s, gain_mm_per_mv, record.fs)
    signals = record.signals[:, :n_window].astype(np.float64)
    spans = column_spans(signals.shape[1], n_window)
    for row, leads in enumerate(_PANEL_LEADS):
        _draw_panel_row(pen, row, [signals[LEADS.index(lead)] for lead in leads], leads, spans)
    rhythm_row = len(_PANEL_LEADS)
    pen.calibration_pulse(rhythm_row)
    pen.trace(rhythm_row, layout.trace_left_px, signals[LEADS.index(_RHYTHM_LEAD)])
    pen.label(rhythm_row, layout.trace_left_px, _RHYTHM_LEAD)
    _draw_texts(pen, header, paper_speed_mm_s, gain_mm_per_mv)
    return image


FULL_ENOUGH = 0.8  # of the last column's 2.5 s: 2 s, two beats at 60 bpm


def column_spans(n_samples: int, n_window: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) sample of each of the 4 columns: each column its own quarter of the window, lined up with
    the rhythm strip below, the last one stopping where the recording does, when the recording holds at least
    FULL_ENOUGH of that last quarter (a 9.9 s one repeated its first 2.5 s four times beside a rhythm strip that
    showed otherwise); a shorter one shows its first quarter in every column (an 8 s one would give V4-V6 0.5 s)."""
    bounds = [round(column * n_window / _COLUMNS) for column in range(_COLUMNS + 1)]
    if n_samples >= bounds[-2] + FULL_ENOUGH * (bounds[-1] - bounds[-2]):
        return tuple((start, min(stop, n_samples)) for start, stop in pairwise(bounds))
    return ((0, bounds[1]),) * _COLUMNS


def _check_settings(paper_speed_mm_s: float, gain_mm_per_mv: float) -> None:
    allowed = {
        "paper_speed_mm_s": (paper_speed_mm_s, _PAPER_SPEEDS_MM_S),
        "gain_mm_per_mv": (gain_mm_per_mv, _GAINS_MM_PER_MV),
    }
    for name, (value, choices) in allowed.items():
        if value not in choices:
            raise ConfigError(f"{name} {value} is not one of {', '.join(f'{c:g}' for c in choices)}")


def _grid_canvas(layout: PrintLayout) -> np.ndarray:
    """White page with the red millimetre grid: thin light 1-mm lines, thick dark 5-mm lines."""
    canvas = np.full((layout.height_px, layout.width_px, 3), _WHITE, dtype=np.uint8)
    xs, ys = layout.grid_lines_px(1, vertical=True), layout.grid_lines_px(1, vertical=False)
    left, right, top, bottom = xs[0], xs[-1], ys[0], ys[-1]
    canvas[top : bottom + 1, xs] = _MINOR_RED
    canvas[ys, left : right + 1] = _MINOR_RED
    thick = _major_width_px(layout)
    spread = np.arange(thick) - thick // 2
    major_x = np.clip(
        (layout.grid_lines_px(5, vertical=True)[:, None] + spread).ravel(), 0, layout.width_px - 1
    )
    major_y = np.clip(
        (layout.grid_lines_px(5, vertical=False)[:, None] + spread).ravel(), 0, layout.height_px - 1
    )
    canvas[top : bottom + 1, major_x] = _MAJOR_RED
    canvas[major_y, left : right + 1] = _MAJOR_RED
    return canvas


def _major_width_px(layout: PrintLayout) -> int:
    return max(2, round(0.25 * layout.px_per_mm))


@dataclass(frozen=True)
class _Pen:
    """Draws traces, pulses and text onto one print at one speed and gain."""

    draw: ImageDraw.ImageDraw
    layout: PrintLayout
    speed_mm_s: float
    gain_mm_per_mv: float
    fs: int

    @property
    def line_px(self) -> int:
        return max(2, round(0.25 * self.layout.px_per_mm))

    def trace(self, row: int, left_px: float, mv: np.ndarray) -> None:
        """Polyline of `mv` starting at `left_px`. A tall complex runs into the neighbouring rows, as a cart's print
        draws it: cut flat at its own row's edge, a 3 mV S wave in V1 read as 1.9 mV (LVH's voltage criteria
        missed, and nothing on the image would say so). Only the grid's edge stops it."""
        ppm = self.layout.px_per_mm
        top, bottom = self.layout.y_px(0), self.layout.y_px(self.layout.grid_height_mm)
        inset = 0.5 * ppm
        xs = left_px + np.arange(mv.size) * (self.speed_mm_s * ppm / self.fs)
        ys = np.clip(
            self.layout.baseline_px(row) - mv * self.gain_mm_per_mv * ppm, top + inset, bottom - inset
        )
        self.draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=_INK, width=self.line_px)

    def calibration_pulse(self, row: int) -> None:
        """The 1 mV x 200 ms square pulse that proves the gain and speed of the row."""
        layout = self.layout
        base = layout.baseline_px(row)
        peak = base - _CAL_PULSE_MV * self.gain_mm_per_mv * layout.px_per_mm
        x0 = layout.x_px(layout.cal_pulse_left_mm)
        x1 = layout.x_px(layout.cal_pulse_left_mm + _CAL_PULSE_S * self.speed_mm_s)
        lead_in, lead_out = (
            x0 - 2.0 * layout.px_per_mm,
            min(x1 + 2.0 * layout.px_per_mm, layout.trace_left_px),
        )
        points = [(lead_in, base), (x0, base), (x0, peak), (x1, peak), (x1, base), (lead_out, base)]
        self.draw.line(points, fill=_INK, width=self.line_px)

    def separator(self, row: int, x_px: float) -> None:
        """The short vertical tick where one lead's segment ends and the next begins."""
        base, half = self.layout.baseline_px(row), 3.0 * self.layout.px_per_mm
        self.draw.line([(x_px, base - half), (x_px, base + half)], fill=_INK, width=self.line_px)

    def label(self, row: int, left_px: float, text: str) -> None:
        """Lead name above the start of a segment, high enough to clear P and T waves."""
        layout = self.layout
        top = max(
            layout.band_px(row)[0] + layout.px_per_mm, layout.baseline_px(row) - 20.0 * layout.px_per_mm
        )
        self.text((left_px + 1.0 * layout.px_per_mm, top), text, 3.5)

    def text(self, xy: tuple[float, float], text: str, height_mm: float) -> None:
        font = ImageFont.load_default(size=max(8, round(height_mm * self.layout.px_per_mm)))
        self.draw.text(xy, text, fill=_INK, font=font)


def _draw_panel_row(pen: _Pen, row: int, signals: list[np.ndarray], leads: tuple[str, ...],
                    spans: tuple[tuple[int, int], ...]) -> None:
    """One 3x4 row: each column shows its own lead over its own span of the recording."""
    pen.calibration_pulse(row)
    for column, (lead, mv, (start, stop)) in enumerate(zip(leads, signals, spans, strict=True)):
        left = pen.layout.segment_left_px(column)
        pen.trace(row, left, mv[start:stop])
        pen.label(row, left, lead)
        if column:
            pen.separator(row, left)


def _draw_texts(pen: _Pen, header: str | None, speed: float, gain: float) -> None:
    layout = pen.layout
    if header:
        pen.text((layout.x_px(0.0), layout.y_px(-_HEADER_MM + 3.0)), header, 4.0)
    footer_y = layout.y_px(layout.grid_height_mm + 2.0)
    pen.text((layout.x_px(0.0), footer_y), f"{speed:g} mm/s    {gain:g} mm/mV", 3.5)
