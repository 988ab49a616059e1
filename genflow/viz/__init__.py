"""Plots for genflow's methods (matplotlib, Agg canvas). The modules here are command-line tools that
training never imports; ``agg_figure`` is also what ``genflow.sampling.save_grid`` draws 2-D samples on.

Figures are made through matplotlib's object API (``agg_figure``), never through pyplot: no global
backend switch, no global figure registry to close, safe to call from any thread or process that
already uses matplotlib with another backend.
"""
from __future__ import annotations


def agg_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` drawn by its own Agg canvas; ``kwargs`` go to ``Figure``
    (figsize, dpi, ...). Add axes with ``fig.subplots(...)`` and write it with ``fig.savefig(path)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
