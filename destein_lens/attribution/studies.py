"""The attribution studies, one registry entry each: what a study saves and how it computes it.

A new study is one `register_study(Study(...))` (and its view in `views/attribution`): `run_study`
runs every entry through one path (skip what is saved, compute with checkpointed heads, rank 0
saves, the partial checkpoints are cleared), so resume, data-parallel runs and the report need
nothing more. Steering studies steer with the settings' form, so any head-wise method can be
attributed, not only DeStein's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..pairs import SteeringPairs
from ..prompts import Prompt
from ..vectors import DetoxVectors
from .dla import direct_logit_attribution
from .effects import Checkpoint, HeadEffects
from .gradient import gradient_effects
from .heldout import HeldOut, held_out
from .patching import patching_effects
from .selection import crossfit_orders, fold_pairs, selection_curves
from .steered import leave_one_out, steering_effects


class Savable(Protocol):
    def save(self, path: Path) -> None: ...


@dataclass
class StudyContext:
    """Everything a study computes from; `checkpoint` hands out the resumable cells it uses."""

    model: TransformerBridge
    vectors: DetoxVectors
    held: HeldOut
    held_pairs: SteeringPairs
    out: Path
    settings: Any  # study.StudySettings
    prompts: Sequence[Prompt]
    progress: bool
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def checkpoint(self, name: str) -> Checkpoint:
        ckpt = Checkpoint(self.out / ".partial" / f"{name}.safetensors")
        self.checkpoints.append(ckpt)
        return ckpt


@dataclass(frozen=True)
class Study:
    """One study: the results it saves (`<out>/<name>.safetensors` + .json), whether they are
    per-pair head effects (`HeadEffects`), which of them rank heads, and how to compute them."""

    name: str
    results: tuple[str, ...]
    compute: Callable[[StudyContext], dict[str, Savable]]
    ranked: tuple[str, ...] = ()
    per_pair: bool = True
    needs: tuple[str, ...] = ()  # studies whose saved results this one reads


STUDIES: dict[str, Study] = {}


def register_study(study: Study, *, replace: bool = False) -> Study:
    if study.name in STUDIES and not replace:
        raise ValueError(f"study {study.name!r} is already registered (register_study(..., replace=True))")
    STUDIES[study.name] = study
    return study


def ranked_results() -> tuple[str, ...]:
    """Every registered per-pair result that ranks heads (beside probe accuracy)."""
    return tuple(name for study in STUDIES.values() for name in study.ranked)


def parse_studies(text: str) -> tuple[str, ...]:
    """ "all" or a comma list of studies, in registry order, with the studies they need."""
    names = tuple(STUDIES) if text == "all" else tuple(s.strip() for s in text.split(","))
    unknown = [s for s in names if s not in STUDIES]
    if unknown or not names:
        raise DesteinError(
            f"unknown study {', '.join(unknown) or text!r}; choose all or from {', '.join(STUDIES)}"
        )
    wanted = set(names) | {need for name in names for need in STUDIES[name].needs}
    return tuple(s for s in STUDIES if s in wanted)


def _patching(ctx: StudyContext) -> dict[str, Savable]:
    return patching_effects(
        ctx.model, ctx.held, k=ctx.vectors.k, checkpoint=ctx.checkpoint("patching"), progress=ctx.progress
    )


def _dla(ctx: StudyContext) -> dict[str, Savable]:
    return {"dla": direct_logit_attribution(ctx.model, ctx.vectors, ctx.held, k=ctx.vectors.k)}


def _gradient(ctx: StudyContext) -> dict[str, Savable]:
    return gradient_effects(
        ctx.model,
        ctx.vectors,
        ctx.held,
        k=ctx.vectors.k,
        alpha=ctx.settings.alpha,
        form=ctx.settings.form,
        progress=ctx.progress,
    )


def _steering(ctx: StudyContext) -> dict[str, Savable]:
    opts = {"alpha": ctx.settings.alpha, "form": ctx.settings.form, "progress": ctx.progress}
    return steering_effects(ctx.model, ctx.vectors, ctx.held, checkpoint=ctx.checkpoint("steering"), **opts)


def _leave_one_out(ctx: StudyContext) -> dict[str, Savable]:
    opts = {"alpha": ctx.settings.alpha, "form": ctx.settings.form, "progress": ctx.progress}
    return leave_one_out(ctx.model, ctx.vectors, ctx.held, checkpoint=ctx.checkpoint("leave_one_out"), **opts)


def saved_effects(out: Path, name: str) -> HeadEffects | None:
    """A per-pair result of the folder, if it was saved."""
    return HeadEffects.load(out / name) if (out / f"{name}.safetensors").exists() else None


def _selection(ctx: StudyContext) -> dict[str, Savable]:
    """The cross-fitted curves over folds of the held-out pairs (ranked by the steering study)."""
    steering = HeadEffects.load(ctx.out / "steering")
    gradient = saved_effects(ctx.out, "atp_steering")
    folds = fold_pairs(ctx.held_pairs)
    sizes = [len(f) for f in folds]
    orders = crossfit_orders(ctx.vectors, steering, sizes, ctx.settings.random_seeds, gradient)
    curves = selection_curves(
        ctx.model,
        ctx.vectors,
        [held_out(ctx.model, f, batch_size=ctx.settings.batch_size) for f in folds],
        orders,
        ks=ctx.settings.selection_ks,
        alpha=ctx.settings.alpha,
        form=ctx.settings.form,
        checkpoint=ctx.checkpoint("selection"),
        progress=ctx.progress,
    )
    return {"selection": curves}


register_study(
    Study(
        "patching",
        ("patching", "patching_denoise_mass", "patching_noise_mass"),
        _patching,
        ranked=("patching",),
    )
)
register_study(Study("dla", ("dla",), _dla, ranked=("dla",)))
register_study(
    Study("gradient", ("atp_patching", "atp_steering"), _gradient, ranked=("atp_patching", "atp_steering"))
)
register_study(
    Study(
        "steering",
        ("steering", "steering_mass"),
        _steering,
        ranked=("steering",),
    )
)
register_study(Study("leave_one_out", ("leave_one_out",), _leave_one_out, ranked=("leave_one_out",)))
register_study(Study("selection", ("selection",), _selection, per_pair=False, needs=("steering",)))
