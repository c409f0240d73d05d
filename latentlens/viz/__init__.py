"""Figures as pure functions: they return matplotlib figures and never show them."""

from __future__ import annotations

from latentlens.viz.grid import cell_label, compare_lenses, draw_grid, lens_grid, plot_result

__all__ = ["cell_label", "compare_lenses", "draw_grid", "lens_grid", "plot_result"]
