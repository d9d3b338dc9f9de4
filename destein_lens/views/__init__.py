"""Plotly figures for DeStein analyses: head grids, probe maps, activation geometry, sweeps.

Every view takes plain arrays (numpy or torch) or row dicts rather than package objects, so
figures can be rebuilt from saved results in a notebook without a model in memory (the head
attribution figure, which reads a `HeadAttribution` and its vectors, is the one exception). All
figures share one template and always carry a title, axis titles and a named colour scale.

One module per subject: `heads` (layer x head grids), `geometry` (activation projections),
`sweep` (strength sweeps), `compare` (the methods' Pareto view), `tables` (generations);
`export` writes any of them to disk.
"""

from ._style import COLORS, TEMPLATE
from .compare import pareto_figure, pareto_points
from .export import STATIC_FORMATS, StaticExportError, save_figure
from .geometry import activation_geometry, top_heads_geometry
from .heads import attribution_figure, head_grid, probe_heatmap
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
    "alpha_sweep",
    "attribution_figure",
    "generation_table",
    "pareto_figure",
    "pareto_points",
    "head_grid",
    "probe_heatmap",
    "save_figure",
    "top_heads_geometry",
]
