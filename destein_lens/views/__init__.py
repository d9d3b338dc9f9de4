"""Plotly figures for DeStein analyses: head grids, probe maps, activation geometry, sweeps.

Every view takes plain arrays (numpy or torch) or row dicts rather than package objects, so
figures can be rebuilt from saved results in a notebook without a model in memory; the exception
is `attribution`, whose views read the studies' saved result objects (they load without a model)
because each figure shows the bootstrap intervals only those can compute. All figures share one
template and always carry a title, axis titles and a named colour scale.

One module per subject: `heads` (layer x head grids), `attribution` (the head-attribution
studies), `geometry` (activation projections), `sweep` (strength sweeps), `compare` (the methods'
Pareto view), `tables` (generations); `export` writes any of them to disk.
"""

from ._style import COLORS, TEMPLATE
from .attribution import (
    agreement_figure,
    depth_figure,
    dla_tokens_figure,
    effect_grid,
    selection_figure,
    top_heads_figure,
)
from .compare import pareto_figure, pareto_points
from .export import STATIC_FORMATS, StaticExportError, save_figure
from .geometry import activation_geometry, top_heads_geometry
from .heads import head_grid, probe_heatmap
from .sweep import SWEEP_KEYS, alpha_sweep
from .tables import GENERATION_KEYS, TOXIC_THRESHOLD, generation_table

__all__ = [
    "COLORS",
    "GENERATION_KEYS",
    "STATIC_FORMATS",
    "SWEEP_KEYS",
    "TEMPLATE",
    "TOXIC_THRESHOLD",
    "StaticExportError",
    "activation_geometry",
    "agreement_figure",
    "alpha_sweep",
    "depth_figure",
    "dla_tokens_figure",
    "effect_grid",
    "generation_table",
    "pareto_figure",
    "pareto_points",
    "head_grid",
    "probe_heatmap",
    "save_figure",
    "selection_figure",
    "top_heads_figure",
    "top_heads_geometry",
]
