"""The registry of steering methods: what a method is, and the one table of them.

A leaf of the package: it imports nothing of the layers above it (steering, evaluation, compare,
the CLI), so every method module can register into it and every layer can look methods up
without an import circle. The methods themselves live in `forms` (DeStein's head-wise forms)
and `baselines/` (the comparison methods); importing the package registers them all.

A method acts in one or both of two ways, built per batch by `Form.build`:
- hooks: (hook name, function) pairs that move activations at any hook point;
- decoding processors (`DecodeProcessor`): objects the decoding loop calls around every step,
  with state of their own across steps (extra forwards with their own KV cache, another model,
  a datastore), which may rewrite the next-token logits. `steering.steer` installs and removes
  both; `generation` calls the processors.

A method's statistics fitted from the steering pairs are its own typed object (`FitState`),
saved and loaded with the vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Protocol

import torch
from transformer_lens.hook_points import HookPoint

from .errors import DesteinError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from .pairs import SteeringPairs
    from .steering import SteeringConfig
    from .vectors import DetoxVectors

HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor]
Hooks = list[tuple[str, HookFn]]
# The strength the analyses use (figures, attribution, notebooks): a clearly visible effect. On
# gemma-3-270m the benchmark sweep puts the useful all-heads range at 0.05-0.15 (perplexity
# x1.3 at 0.1, x3.7 at 0.15); by 0.4 the text degenerates. Generation defaults (`run`, `compare`)
# are each form's `default_strength`, calibrated at a 1.2x perplexity budget (`compare`).
DEFAULT_STRENGTH = 0.1
# |alpha| beyond this is refused for the DeStein forms. In the fusion forms alpha * w_h (w_h <= 2)
# past 1 lets the direction outweigh the unit activation itself: the head output is replaced, the
# text degenerates ("menuItem menuItem ...") and a toxicity classifier reads it as clean. Negative
# strengths (toxifying) are a legitimate research use and allowed. Other forms set their own.
MAX_STRENGTH = 1.0


class DecodeProcessor(Protocol):
    """A decoding-time part of a method, for one batch: called by the decoding loop around each step.

    `start` sees the left-padded prompt batch before the first forward; `logits` may rewrite each
    step's next-token logits [batch, vocab] (float32); `advance` sees the tokens just chosen
    [batch, 1] (pad after a row's EOS). Extra forwards a processor runs itself go inside
    `steering.paused()`, so the method's own hooks do not act on them.
    """

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...

    def logits(self, logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, tokens: torch.Tensor) -> None: ...


@dataclass
class Steering:
    """What a method installs for one batch: hooks, decoding processors, or both."""

    hooks: Hooks = field(default_factory=list)
    processors: list[DecodeProcessor] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class FitState:
    """A method's statistics fitted from the steering pairs: subclasses declare tensor fields."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> FitState:
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise DesteinError(f"{cls.__name__} lacks {', '.join(missing)}")
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class FitInputs:
    """What a form may fit its statistics from, at `build_vectors` time (no weight training)."""

    model: TransformerBridge
    pairs: SteeringPairs
    bare: torch.Tensor  # [n_pairs, 2, n_layers, n_heads, width]: the bare pair texts at the vectors' site
    site: str
    k: int
    batch_size: int
    progress: bool


# (model, vectors or None, config, heads mask [n_layers, n_heads], the batch's prompts or None)
BuildSteering = Callable[
    ["TransformerBridge", "DetoxVectors | None", "SteeringConfig", torch.Tensor, Sequence[str] | None],
    Steering,
]


def _all_heads(n_layers: int, n_heads: int) -> str | int:
    return "all"


@dataclass(frozen=True)
class Form:
    """One registry entry: a name, what it does in one line, and how it builds its steering.

    A form has one strength knob: `default_strength` (what `compare` uses without --strengths),
    the largest magnitude it accepts, and `grid`, the strengths a calibration tries. `head_wise`
    forms honour `SteeringConfig.heads`; the others act on their own sites and take heads="all".
    `fit` computes the form's `FitState` (of class `state`) from the steering pairs
    (`build_vectors` stores it); `default_heads(n_layers, n_heads)` is the head selection `compare`
    uses; `compared` says whether `compare` runs it by default; `needs_vectors` is False for a
    method that steers without detox vectors; `check(model)` refuses, before any generation, what
    the method needs beyond vectors and lacks for this model (a trained adapter), and returns the
    digests of those inputs, which a run's config records (a folder resumes only with the same).
    """

    name: str
    summary: str
    build: BuildSteering
    default_strength: float = DEFAULT_STRENGTH
    max_strength: float = MAX_STRENGTH
    grid: tuple[float, ...] = (0.05, 0.1, 0.15)
    head_wise: bool = True
    fit: Callable[[FitInputs], FitState] | None = None
    state: type[FitState] | None = None
    default_heads: Callable[[int, int], str | int] = _all_heads
    compared: bool = True
    needs_vectors: bool = True
    check: Callable[[TransformerBridge], dict[str, str]] | None = None

    def __post_init__(self) -> None:
        if (self.fit is None) != (self.state is None):
            raise ValueError(f"form {self.name!r}: `fit` and `state` come together")


FORMS: dict[str, Form] = {}


def register(form: Form, *, replace: bool = False) -> Form:
    """Add `form` to the registry (the CLI's choices come from it); `replace=True` lets a notebook
    cell that registers a method run again."""
    if form.name in FORMS and not replace:
        raise ValueError(f"steering form {form.name!r} is already registered (register(..., replace=True))")
    FORMS[form.name] = form
    return form


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise DesteinError(f"unknown steering form {name!r}; choose one of {', '.join(FORMS)}")
    return FORMS[name]


def compared_by_default() -> tuple[str, ...]:
    """What `compare` runs without --methods: the baseline and every method that says so."""
    return ("baseline", *(name for name, form in FORMS.items() if form.compared))


_PROCESSORS: ContextVar[tuple[DecodeProcessor, ...]] = ContextVar("destein_processors", default=())
_PAUSED: ContextVar[bool] = ContextVar("destein_paused", default=False)


@contextmanager
def decoding(processors: Sequence[DecodeProcessor]) -> Iterator[None]:
    """Make `processors` the ones the decoding loop calls inside the block (`steering.steer`)."""
    token = _PROCESSORS.set((*_PROCESSORS.get(), *processors))
    try:
        yield
    finally:
        _PROCESSORS.reset(token)


def active_processors() -> tuple[DecodeProcessor, ...]:
    return _PROCESSORS.get()


@contextmanager
def paused() -> Iterator[None]:
    """Forwards inside the block run unsteered and undecorated: a processor's own extra forwards."""
    token, outer = _PAUSED.set(True), _PROCESSORS.set(())
    try:
        yield
    finally:
        _PROCESSORS.reset(outer)
        _PAUSED.reset(token)


def paused_flag() -> bool:
    return _PAUSED.get()
