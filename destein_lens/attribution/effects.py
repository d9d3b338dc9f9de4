"""Per-head effects on each held-out pair, with bootstrap intervals over pairs.

Every study returns a `HeadEffects`: one value per (layer, head, pair), signed so that a positive
value means the head pushes the model towards toxicity (removing or reversing it detoxifies).
Keeping the pairs, not only the mean, is what lets every effect, and every correlation between
studies (`agreement`), carry an interval that resamples the same pairs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformer_lens.utilities.statistics import bootstrap_ci, derive_generator

from .. import distributed
from ..errors import DesteinError
from ..files import write_atomic
from ..store import load_result, save_result
from ..vectors import rank_heads

CONFIDENCE = 0.95
N_RESAMPLES = 2000


@dataclass(frozen=True, eq=False)  # eq=False: == on tensor fields is elementwise, not a bool
class HeadEffects:
    """One study's effect of each head on each held-out pair."""

    study: str  # "steering", "leave_one_out", "patching", "dla", ...
    values: torch.Tensor  # [n_layers, n_heads, n_pairs], float32; positive: the head adds toxicity
    unit: str  # "nats/token", "logit", ...
    meaning: str  # one line: what a value is
    _intervals: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or self.values.shape[-1] < 1:
            raise DesteinError(
                f"{self.study} effects must be [n_layers, n_heads, n_pairs] with n_pairs >= 1, "
                f"got {tuple(self.values.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[:2])  # type: ignore[return-value]

    @property
    def n_pairs(self) -> int:
        return self.values.shape[-1]

    def mean(self) -> torch.Tensor:
        """[n_layers, n_heads]: the effect averaged over pairs."""
        return self.values.mean(-1)

    def interval(self, confidence: float = CONFIDENCE) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile bootstrap interval of the mean over pairs, per head (TransformerLens's own);
        computed once per confidence, however many views and reports ask."""
        if confidence not in self._intervals:
            self._intervals[confidence] = bootstrap_ci(
                self.values,
                confidence=confidence,
                n_resamples=N_RESAMPLES,
                generator=derive_generator(0, self.study),
            )
        return self._intervals[confidence]

    def ranking(self) -> list[tuple[int, int]]:
        """Heads by mean effect, largest first (ties: index)."""
        return rank_heads(self.mean())

    def save(self, path: Path) -> None:
        """`<path>.safetensors` (the values) and `<path>.json` (the rest)."""
        meta = {"study": self.study, "unit": self.unit, "meaning": self.meaning}
        save_result(path, "effects", {"values": self.values}, meta)

    @classmethod
    def load(cls, path: Path) -> HeadEffects:
        meta, tensors = load_result(path, "effects")
        return cls(values=tensors["values"], **meta)


class Checkpoint:
    """A study's finished cells (one tensor each), written to disk every `every` seconds.

    A study runs one forward per head per batch of pairs; on two CPU cores that is minutes, so
    a killed study resumes from its last flush instead of from zero. `path` None keeps it in memory.
    Under a data-parallel launch each rank flushes to its own `<stem>.rank<r>.safetensors` and
    reads everyone's, so a study resumes with any number of ranks.
    """

    def __init__(self, path: Path | None, *, every: float = 20.0) -> None:
        self.path = path
        self.every = every
        self.cells: dict[str, torch.Tensor] = {}
        self._read()
        self._last = time.monotonic()

    def _files(self) -> list[Path]:
        if self.path is None:
            return []
        return [self.path, *sorted(self.path.parent.glob(f"{self.path.stem}.rank*.safetensors"))]

    def _own(self) -> Path | None:
        if self.path is None or distributed.world_size() == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{distributed.rank()}.safetensors")

    def _read(self) -> None:
        for path in self._files():
            if path.exists():
                try:
                    self.cells = load_file(path) | self.cells
                except (OSError, SafetensorError):  # written atomically, so only a foreign file: redo
                    pass

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.cells:
            self.cells[key] = compute().contiguous()
            if time.monotonic() - self._last > self.every:
                self.flush()
        return self.cells[key]

    def flush(self) -> None:
        own = self._own()
        if own is not None and self.cells:
            write_atomic(own, save(self.cells))
        self._last = time.monotonic()

    def gather(self) -> None:
        """Every rank's cells, once every rank has finished its share (nothing to do alone)."""
        if distributed.world_size() == 1:
            return
        if self.path is None:
            raise DesteinError("a data-parallel study needs an on-disk checkpoint to share its cells")
        self.flush()
        distributed.barrier()
        self._read()
        distributed.barrier()  # no rank clears the files before all have read them

    def clear(self) -> None:
        """The study finished and saved its result: its cells are no longer needed."""
        for path in self._files():
            path.unlink(missing_ok=True)


def per_head(
    shape: tuple[int, int],
    cell: Callable[[int, int], torch.Tensor],
    ckpt: Checkpoint,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """`cell(layer, head)` -> [m, n_pairs] for every head, resumed from `ckpt`: [m, L, H, n_pairs].

    Under a launch each rank computes its share of the unfinished heads, then all gather them.
    """
    heads = list(itertools.product(range(shape[0]), range(shape[1])))
    todo = distributed.share([(layer, head) for layer, head in heads if f"{layer}.{head}" not in ckpt.cells])
    for layer, head in tqdm(todo, desc=desc, unit="head", disable=not progress or not distributed.is_main()):
        ckpt.get_or_compute(f"{layer}.{head}", lambda layer=layer, head=head: cell(layer, head))
    ckpt.gather()
    rows = [ckpt.cells[f"{layer}.{head}"] for layer, head in heads]
    return torch.stack(rows, dim=1).unflatten(1, shape)
