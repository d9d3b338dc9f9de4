"""Input checks shared by the views: arrays of the right rank, rows with the right columns.

Views take plain arrays and row dicts (not package objects) so figures can be rebuilt from saved
results; these checks turn a wrong shape or a missing column into one clear `DesteinError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DesteinError


def as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """Accept numpy arrays, lists or torch tensors (any device, any float dtype) as float."""
    if hasattr(x, "detach"):  # torch without importing torch; .float() handles bfloat16
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=float)
    if arr.ndim != ndim:
        raise DesteinError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise DesteinError(f"{name} is empty")
    return arr


def check_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], what: str) -> None:
    """At least one row, and every row has every key."""
    if not rows:
        raise DesteinError(f"no {what} rows to plot")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DesteinError(f"{what} row {i} lacks {', '.join(missing)}")


def numeric_column(rows: Sequence[Mapping[str, Any]], key: str, what: str) -> np.ndarray:
    """A column that must be finite numbers; None/NaN usually means a run did not finish."""
    try:
        col = np.array([float(r[key]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise DesteinError(f"{what} column {key!r} must be numeric: {exc}") from None
    if not np.isfinite(col).all():
        raise DesteinError(f"{what} column {key!r} has missing or non-finite values")
    return col
