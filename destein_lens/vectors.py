"""Detoxification vectors: one direction per (layer, head), with the probes that weight them.

`build_vectors` runs the pipeline pairs -> activations -> probes -> vectors:
- directions: mean over pairs of (toxic - non-toxic) activations of the *prefixed* pair texts, as
  DeStein computes them (the prefixes sharpen the contrast); steering subtracts them;
- probes: by default fitted on the *bare* pair texts. With the prefixes, the last-k-token window
  of a short text reaches into the prefix, and nearly every head separates the two sides from the
  prefix alone, which makes the ranking meaningless. Both accuracies are kept.

Saved as safetensors (tensors) plus a JSON sidecar (everything else); never pickle. Loading checks
the file against the model it will steer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from .activations import Site, check_site, pair_activations, slice_width
from .errors import DesteinError
from .models import LoadRecord, load_record
from .pairs import NONTOXIC_PREFIX, TOXIC_PREFIX, SteeringPairs
from .probes import fit_probes
from .registry import FitInputs, FitState, get_form
from .store import load_result, save_result

_TENSORS = ("directions", "accuracy_bare", "accuracy_prefixed")
_FITS = "fits."  # key prefix of the comparison methods' statistics in the safetensors file
_CAUSAL = "causal."  # key prefix of the causal rankings' per-pair effects
# The ranking probes themselves (files written before they were stored lack them; only the
# probe-gated form needs them).
_OPTIONAL_TENSORS = ("probe_weight", "probe_bias")
PROBE_TEXTS = ("bare", "prefixed")  # which texts' probe accuracy ranks and weights the heads
FORMAT_VERSION = 1
KIND = "vector"


def rank_heads(score: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, head) by `score` [n_layers, n_heads], largest first (ties: index)."""
    n_heads = score.shape[1]
    flat = score.flatten().tolist()
    return [divmod(i, n_heads) for i in sorted(range(len(flat)), key=lambda i: (-flat[i], i))]


@dataclass(frozen=True, eq=False)
class CausalRanking:
    """Heads ranked by what steering each one alone does to pairs the directions were not built on.

    `values` [n_layers, n_heads, n_pairs] is the first-order effect gap(unsteered) - gap(head
    steered alone) of `form` at `alpha` (nats/token; positive detoxifies; the exact effect for a
    shortlist where `scored_on["confirmed_top"]` says so) on each scoring pair,
    every pair scored out of sample: either cross-fitted over folds of the vectors' own pairs
    (each fold scored with directions built on the other folds) or on separate held-out pairs.
    `scored_on` says which, from which pairs (source, sha256, n, fold sizes).
    """

    form: str
    alpha: float
    values: torch.Tensor
    scored_on: dict[str, Any]

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or self.values.shape[-1] < 1 or not self.values.is_floating_point():
            raise DesteinError(
                f"causal ranking of {self.form}: values must be float [n_layers, n_heads, n_pairs], got "
                f"{tuple(self.values.shape)}"
            )

    def scores(self) -> torch.Tensor:
        """[n_layers, n_heads]: the mean effect over the scoring pairs."""
        return self.values.mean(-1)

    def ranking(self) -> list[tuple[int, int]]:
        """Heads by mean effect, most detoxifying first (ties: index)."""
        return rank_heads(self.scores())

    def fold_overlap(self, k: int) -> float | None:
        """How much the choice of scoring pairs moves the top k: the overlap |A & B| / k of the
        top k ranked on the first fold's pairs (A) and on the second's (B); None without folds."""
        sizes = self.scored_on.get("fold_sizes") or []
        if len(sizes) < 2:
            return None
        a, b = self.values[..., : sizes[0]], self.values[..., sizes[0] : sizes[0] + sizes[1]]
        tops = [set(replace(self, values=v).ranking()[:k]) for v in (a, b)]
        return len(tops[0] & tops[1]) / k


@dataclass(frozen=True, eq=False)
class DetoxVectors:
    """Per-head detox directions and probe accuracies, with everything needed to reproduce them."""

    directions: torch.Tensor  # [n_layers, n_heads, width], mean(toxic - non-toxic)
    accuracy_bare: torch.Tensor  # [n_layers, n_heads], held-out probe accuracy, bare pair texts
    accuracy_prefixed: torch.Tensor  # [n_layers, n_heads], held-out probe accuracy, prefixed texts
    site: str
    k: int
    prefixes: tuple[str, str]
    probe_texts: str  # "bare" or "prefixed": which accuracy ranks and weights the heads
    probe_method: str
    model: LoadRecord
    pairs_sha256: str
    pairs_source: str
    n_pairs: int
    extra: dict[str, Any] = field(default_factory=dict)
    # The probes behind `probe_accuracy`, on raw activations: toxic logit = probe_weight . x + probe_bias
    probe_weight: torch.Tensor | None = None  # [n_layers, n_heads, width]
    probe_bias: torch.Tensor | None = None  # [n_layers, n_heads]
    # Statistics the comparison methods fitted from the same pairs, by method name
    fits: dict[str, FitState] = field(default_factory=dict)
    # Heads ranked by causal effect, by head-wise method (`attribution.causal_rankings`)
    causal: dict[str, CausalRanking] = field(default_factory=dict)

    @property
    def probe_accuracy(self) -> torch.Tensor:
        """The accuracy that ranks and weights heads: on the bare or the prefixed texts."""
        return self.accuracy_bare if self.probe_texts == "bare" else self.accuracy_prefixed

    @property
    def head_weights(self) -> torch.Tensor:
        """The released code's per-head weight, 1 + held-out probe accuracy."""
        return 1.0 + self.probe_accuracy

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.probe_accuracy.shape)  # type: ignore[return-value]

    def ranking(self) -> list[tuple[int, int]]:
        """The project's one head ranking: `steer(heads=k)`, every figure and study use its top k.

        Heads by held-out probe accuracy, best first. Accuracies are counts over a few dozen test
        texts, so ties are common (many heads reach 1.0): they are broken by the direction's norm
        (a larger mean toxic - non-toxic shift first), then by (layer, head) index.
        """
        n_heads = self.shape[1]
        acc = self.probe_accuracy.flatten().tolist()
        norm = self.directions.norm(dim=-1).flatten().tolist()
        order = sorted(range(len(acc)), key=lambda i: (-acc[i], -norm[i], i))
        return [divmod(i, n_heads) for i in order]

    def fit(self, form: str) -> FitState:
        """The statistics `form` fitted from the pairs (`build_vectors(fit_forms=...)`)."""
        if form not in self.fits:
            raise DesteinError(
                f"these vectors hold no {form} fit: build them with fit_forms=({form!r},) "
                f"(CLI: compare builds every method's fit)"
            )
        return self.fits[form]

    def causal_ranking(self, form: str) -> CausalRanking:
        """The heads of `form` ranked by causal effect (`heads="causal:k"` steers its top k)."""
        if form not in self.causal:
            raise DesteinError(
                f"these vectors hold no causal ranking for {form}: add one with "
                f"attribution.causal_rankings(model, vectors, pairs, forms=({form!r},)) (CLI: a run "
                "with --heads causal:K builds it)"
            )
        return self.causal[form]

    def check_compatible(self, model: TransformerBridge) -> None:
        """Refuse to steer a model these vectors were not built on (other weights, shape or mode)."""
        theirs = load_record(model)
        if not self.model.same_model(theirs):
            raise DesteinError(
                f"these vectors were built on another model ({_difference(self.model, theirs)})"
            )
        width = slice_width(model, self.site)  # type: ignore[arg-type]
        if self.directions.shape[-1] != width:
            raise DesteinError(
                f"vector directions are {self.directions.shape[-1]} wide; the model's {self.site} are {width}"
            )

    def save(self, path: str | Path) -> Path:
        """Write `<stem>.safetensors` and `<stem>.json`; returns the safetensors path."""
        tensors = {name: getattr(self, name).float() for name in self._tensor_names()}
        tensors.update(
            {
                f"{_FITS}{form}.{name}": t.float()
                for form, state in self.fits.items()
                for name, t in state.to_tensors().items()
            }
        )
        tensors.update({f"{_CAUSAL}{form}": r.values.float() for form, r in self.causal.items()})
        meta = {
            "site": self.site,
            "k": self.k,
            "prefixes": list(self.prefixes),
            "probe_texts": self.probe_texts,
            "probe_method": self.probe_method,
            "model": self.model.to_dict(),
            "pairs_sha256": self.pairs_sha256,
            "pairs_source": self.pairs_source,
            "n_pairs": self.n_pairs,
            "extra": self.extra,
        }
        if self.causal:  # files without causal rankings keep the sidecar they always had
            meta["causal"] = {
                form: {"alpha": r.alpha, "scored_on": r.scored_on} for form, r in self.causal.items()
            }
        return save_result(path, KIND, tensors, meta, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path, model: TransformerBridge | None = None) -> DetoxVectors:
        """Read a saved pair of files; with `model`, also check they belong to it."""
        meta, tensors = load_result(path, KIND, versions=(FORMAT_VERSION,))
        try:
            vectors = cls(
                **{name: tensors[name] for name in _TENSORS},
                **{name: tensors[name] for name in _OPTIONAL_TENSORS if name in tensors},
                fits=_fit_states(tensors),
                causal={
                    form: CausalRanking(form, float(c["alpha"]), tensors[f"{_CAUSAL}{form}"], c["scored_on"])
                    for form, c in meta.get("causal", {}).items()
                },
                site=meta["site"],
                k=int(meta["k"]),
                prefixes=tuple(meta["prefixes"]),
                probe_texts=meta["probe_texts"],
                probe_method=meta["probe_method"],
                model=LoadRecord.from_dict(meta["model"]),
                pairs_sha256=meta["pairs_sha256"],
                pairs_source=meta["pairs_source"],
                n_pairs=int(meta["n_pairs"]),
                extra=meta.get("extra", {}),
            )
        except DesteinError as e:  # a record inside the file that does not read back
            raise DesteinError(f"{path} is not a valid destein-lens vector file ({e})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DesteinError(f"{path} is not a valid destein-lens vector file ({e!r})") from None
        vectors._check_shapes()
        if model is not None:
            vectors.check_compatible(model)
        return vectors

    def _tensor_names(self) -> tuple[str, ...]:
        return _TENSORS + tuple(n for n in _OPTIONAL_TENSORS if getattr(self, n) is not None)

    def _check_shapes(self) -> None:
        check_site(self.site)
        rec = self.model
        grid = (rec.n_layers, rec.n_heads)
        if (
            self.accuracy_bare.shape != grid
            or self.accuracy_prefixed.shape != grid
            or self.directions.shape[:2] != grid
        ):
            raise DesteinError(
                f"vector file shapes {tuple(self.directions.shape)} do not match its model "
                f"({rec.n_layers} layers x {rec.n_heads} heads)"
            )
        if self.probe_texts not in PROBE_TEXTS:
            raise DesteinError(f"vector file has unknown probe_texts {self.probe_texts!r}")
        for name in self._tensor_names():
            if not getattr(self, name).is_floating_point():
                raise DesteinError(
                    f"vector file: {name} must be a float tensor, not {getattr(self, name).dtype}"
                )
        if self.directions.ndim != 3 or self.directions.shape[-1] < 1:
            raise DesteinError(
                f"vector file: directions must be [layers, heads, width], got {tuple(self.directions.shape)}"
            )
        if self.probe_weight is not None and (
            self.probe_weight.shape != self.directions.shape
            or self.probe_bias is None
            or self.probe_bias.shape != grid
        ):
            raise DesteinError("vector file: probe_weight / probe_bias do not match the directions' shape")
        if not torch.isfinite(self.directions).all():
            raise DesteinError("vector file holds non-finite directions")
        for form, ranking in self.causal.items():
            if ranking.values.shape[:2] != grid or not torch.isfinite(ranking.values).all():
                raise DesteinError(
                    f"vector file: the causal ranking of {form} must be finite and {grid} heads"
                )
        for form, state in self.fits.items():
            for name, t in state.to_tensors().items():
                if not (t.is_floating_point() and torch.isfinite(t).all()):
                    raise DesteinError(f"vector file: fit {form}.{name} must be a finite float tensor")
        if not self.directions.any():
            raise DesteinError("vector file holds all-zero directions: steering with it would do nothing")
        for name in ("accuracy_bare", "accuracy_prefixed"):
            acc = getattr(self, name)
            if not (torch.isfinite(acc).all() and (acc >= 0).all() and (acc <= 1).all()):
                raise DesteinError(f"vector file: {name} must be probe accuracies in [0, 1]")


def _fit_states(tensors: dict[str, torch.Tensor]) -> dict[str, FitState]:
    """The methods' fitted states from the file's "fits.<method>.<field>" tensors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(_FITS):
            form, _, name = key[len(_FITS) :].rpartition(".")
            grouped.setdefault(form, {})[name] = t
    states = {}
    for form, fields in grouped.items():
        state = get_form(form).state
        if state is None:
            raise DesteinError(f"vector file holds a fit for {form}, which fits nothing")
        states[form] = state.from_tensors(fields)
    return states


def _difference(ours: LoadRecord, theirs: LoadRecord) -> str:
    """What tells two models apart, as "field: vectors' value vs model's value; ..."."""
    keys = ("name", "architecture", "mode", "n_layers", "n_heads", "d_head", "d_model", "file_sha256")
    parts = [
        f"{k}: {getattr(ours, k)} vs {getattr(theirs, k)}"
        for k in keys
        if getattr(ours, k) != getattr(theirs, k)
    ]
    return "; ".join(parts) + " (vectors vs model)"


def build_vectors(
    model: TransformerBridge,
    pairs: SteeringPairs,
    *,
    site: Site = "heads",
    k: int = 8,
    prefixes: tuple[str, str] = (TOXIC_PREFIX, NONTOXIC_PREFIX),
    probe_texts: str = "bare",
    probe_method: str = "torch",
    train_frac: float = 0.8,
    batch_size: int = 16,
    fit_forms: Sequence[str] = (),
    progress: bool = True,
) -> DetoxVectors:
    """Directions from the prefixed pairs; probes on the bare (default) and the prefixed texts.

    `fit_forms`: steering forms whose statistics to fit from the same pairs as well (the
    comparison methods: ActAdd's residual directions, ITI's spreads, Linear-AcT's maps).
    """
    forms = [get_form(name) for name in fit_forms]
    if probe_texts not in PROBE_TEXTS:
        raise DesteinError(f"probe_texts must be 'bare' or 'prefixed', got {probe_texts!r}")
    opts = {"site": site, "k": k, "batch_size": batch_size, "progress": progress}
    prefixed = pair_activations(model, pairs, prefixes=prefixes, **opts)
    bare = pair_activations(model, pairs, prefixes=None, **opts)
    probes_bare = fit_probes(bare, method=probe_method, train_frac=train_frac)
    probes_prefixed = fit_probes(prefixed, method=probe_method, train_frac=train_frac)
    inputs = FitInputs(model, pairs, bare, site, k, batch_size, progress)
    fits = {form.name: form.fit(inputs) for form in forms if form.fit is not None}
    return DetoxVectors(
        directions=directions(prefixed),
        accuracy_bare=probes_bare.accuracy,
        accuracy_prefixed=probes_prefixed.accuracy,
        probe_weight=(probes_bare if probe_texts == "bare" else probes_prefixed).weight,
        probe_bias=(probes_bare if probe_texts == "bare" else probes_prefixed).bias,
        site=site,
        k=k,
        prefixes=tuple(prefixes),
        probe_texts=probe_texts,
        probe_method=probe_method,
        model=load_record(model),
        pairs_sha256=pairs.sha256(),
        pairs_source=pairs.source,
        n_pairs=len(pairs),
        extra={"train_frac": train_frac},
        fits=fits,
    )


def directions(acts: torch.Tensor) -> torch.Tensor:
    """mean over pairs of (toxic - non-toxic): [n_layers, n_heads, width] from [n, 2, L, H, w]."""
    return (acts[:, 0] - acts[:, 1]).mean(dim=0)
