"""Plots for benchmark reports: matplotlib's object API only (no pyplot, no global backend, no display)."""

from __future__ import annotations

from typing import Any

from pulse_edge.errors import ConfigError


def matplotlib_figure() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas (no pyplot, no global backend, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError("reports with plots need matplotlib: install pulse-edge[bench]") from e
    return Figure, FigureCanvasAgg


def require_plotting() -> None:
    """Fail before a long run, not after it, when the plots cannot be drawn."""
    matplotlib_figure()
