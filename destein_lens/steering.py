"""Steering: fuse the detox directions into the model's activations through hook points, in a block.

    config = SteeringConfig(alpha=0.1, heads=16)
    with steer(model, vectors, config):          # or steer(model, vectors, alpha=0.1, heads=16)
        texts = generate(model, prompts, protocol_sampling(n=3))

`SteeringConfig` is the one description of a steering setting (strength, heads, positions, form):
the evaluation harness, the CLI and the figures all hold one. What each form does lives in the
method registry (`registry.FORMS`). Heads: "all", an int k (the top-k of `DetoxVectors.ranking`, the
paper's probe ranking), "causal:k" (the top k of the form's `DetoxVectors.causal_ranking`: heads by
what steering each alone does to pairs the directions were not built on) or a list of (layer,
head). Positions: "all", "prompt" or "generated", from the absolute positions the decoding loop
declares (`positions.token_window`), so they are right under the KV cache. alpha = 0 registers no
hook at all: the model is untouched, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from transformer_lens.model_bridge import TransformerBridge

from .config_io import from_dict, to_dict
from .errors import DesteinError
from .registry import DEFAULT_STRENGTH, HookFn, Steering, decoding, get_form, paused_flag
from .vectors import DetoxVectors

Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = get_args(Positions)
Heads = str | int | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class SteeringConfig:
    """Where and how hard to steer; frozen, validated, and written to / read from JSON as itself."""

    alpha: float = DEFAULT_STRENGTH
    heads: Heads = "all"
    positions: Positions = "all"
    form: str = "destein"

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise DesteinError(f"alpha must be a finite number, got {alpha!r}")
        form = get_form(self.form)
        limit = form.max_strength
        if abs(alpha) > limit:
            raise DesteinError(
                f"{form.name} strength must be within [-{limit:g}, {limit:g}] (negative toxifies), "
                f"got {alpha:g}"
            )
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "heads", _normalise_heads(self.heads))
        if not form.head_wise and self.heads != "all":
            raise DesteinError(f"{form.name} does not act on heads: it takes heads='all'")
        if self.positions not in POSITIONS:
            raise DesteinError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")

    @property
    def steered(self) -> bool:
        """Whether this setting changes the model at all."""
        return self.alpha != 0.0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SteeringConfig:
        return from_dict(cls, d, what="steering")


CAUSAL = "causal:"


def _normalise_heads(heads: Any) -> str | int | tuple[tuple[int, int], ...]:
    """ "all", a positive int k, "causal:k", or a non-empty tuple of (layer, head) int pairs."""
    if isinstance(heads, str):
        k = heads.removeprefix(CAUSAL)
        if heads.startswith(CAUSAL) and k.isdigit() and int(k) >= 1:
            return f"{CAUSAL}{int(k)}"
        if heads != "all":
            raise DesteinError(
                "heads must be 'all', an int k (top-k by probe), 'causal:k' (top-k by causal effect) "
                f"or a list of (layer, head); got {heads!r}"
            )
        return heads
    if isinstance(heads, int) and not isinstance(heads, bool):
        if heads < 1:
            raise DesteinError(f"top-k heads: k must be at least 1 (0 would steer nothing), got {heads}")
        return heads
    try:
        pairs = tuple((int(layer), int(head)) for layer, head in heads)
    except (TypeError, ValueError):
        raise DesteinError(
            f"heads must be 'all', an int k or a list of (layer, head); got {heads!r}"
        ) from None
    if not pairs:
        raise DesteinError("an empty head list would steer nothing")
    return pairs


NO_STEERING = SteeringConfig(alpha=0.0)


def parse_heads(text: str) -> Heads:
    """A head selection written as text (the CLI's --heads): "all", a number k, "causal:k" or
    "L.H,L.H,..."."""
    if text == "all" or text.startswith(CAUSAL):
        return _normalise_heads(text)
    if text.isdigit():
        return int(text)
    try:
        return [(int(layer), int(head)) for layer, head in (item.split(".") for item in text.split(","))]
    except ValueError:
        raise DesteinError(
            f"--heads takes 'all', a number k, causal:k or a list like 3.1,5.0; got {text!r}"
        ) from None


def check_heads(heads: Heads, n_layers: int, n_heads: int) -> None:
    """Refuse a head selection that does not fit a model of n_layers x n_heads (before any work)."""
    heads = _normalise_heads(heads)
    k = top_k(heads)
    if k is not None and k > n_layers * n_heads:
        raise DesteinError(f"top-k heads: k must be between 1 and {n_layers * n_heads}, got {k}")
    for layer, head in heads if isinstance(heads, tuple) else ():
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise DesteinError(
                f"head ({layer}, {head}) is out of range for {n_layers} layers x {n_heads} heads"
            )


def is_causal(heads: Heads) -> bool:
    """Whether `heads` selects by the causal ranking ("causal:k")."""
    return isinstance(heads, str) and heads.startswith(CAUSAL)


def top_k(heads: Heads) -> int | None:
    """k of a top-k selection (by probe or causal), else None."""
    heads = _normalise_heads(heads)
    if isinstance(heads, int):
        return heads
    return int(heads.removeprefix(CAUSAL)) if isinstance(heads, str) and heads != "all" else None


def selected_heads(vectors: DetoxVectors, heads: Heads, form: str = "destein") -> list[tuple[int, int]]:
    """The (layer, head) a selection steers, in rank order for a top-k: by probe accuracy
    (`vectors.ranking()`), or by `form`'s causal ranking for "causal:k"."""
    heads = _normalise_heads(heads)
    check_heads(heads, *vectors.shape)
    if heads == "all":
        return [(layer, head) for layer in range(vectors.shape[0]) for head in range(vectors.shape[1])]
    if isinstance(heads, int):
        return vectors.ranking()[:heads]
    if isinstance(heads, str):
        return vectors.causal_ranking(form).ranking()[: top_k(heads)]
    return list(heads)


def head_mask(vectors: DetoxVectors, heads: Heads, form: str = "destein") -> torch.Tensor:
    """Bool [n_layers, n_heads] of the heads to steer (`selected_heads`)."""
    mask = torch.zeros(vectors.shape, dtype=torch.bool)
    for layer, head in selected_heads(vectors, heads, form):
        mask[layer, head] = True
    return mask


def build_steering(
    model: TransformerBridge,
    vectors: DetoxVectors | None,
    config: SteeringConfig,
    prompts: Sequence[str] | None = None,
) -> Steering:
    """The hooks and decoding processors implementing `config`; `steer` is the usual entry point."""
    form = get_form(config.form)
    if vectors is None:
        if form.needs_vectors:
            raise DesteinError(f"{form.name} steers with detox vectors; none were given")
        mask = torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
        check_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads)
    else:
        vectors.check_compatible(model)
        mask = head_mask(vectors, config.heads, config.form)
    if not config.steered:
        return Steering()
    return form.build(model, vectors, config, mask, prompts)


@contextmanager
def steer(
    model: TransformerBridge,
    vectors: DetoxVectors | None,
    config: SteeringConfig | None = None,
    *,
    prompts: Sequence[str] | None = None,
    **settings: Any,
) -> Iterator[TransformerBridge]:
    """Steer `model` inside the block; hooks and decoding processors are removed on exit, also
    after an exception.

    `settings` (alpha=, heads=, positions=, form=) override `config`'s fields (default:
    `SteeringConfig()`). `prompts`, the batch about to run, is for forms with per-prompt state.
    `vectors` may be None for a method that needs none.
    """
    config = replace(config or SteeringConfig(), **settings)
    steering = build_steering(model, vectors, config, prompts)
    hooks = [(name, _pausable(fn)) for name, fn in steering.hooks]
    with model.hooks(fwd_hooks=hooks), decoding(steering.processors):
        yield model


def _pausable(fn: HookFn) -> HookFn:
    """`fn`, except inside `registry.paused()` (a processor's own forwards run unsteered)."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act if paused_flag() else fn(act, hook)

    return hook
