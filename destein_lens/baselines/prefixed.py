"""Prefixed twins of a decoding batch: what the prefix-contrast methods (Self-Detoxify, PREADD, LMA) share.

At `start` every plain row's text (its tokens decoded) is put behind each prefix and tokenised
together, left-padded, as Self-Detoxify's released code and PREADD's `method_preadd.py` build their
prefixed prompts (prefix string + prompt string); each prefixed batch is prefilled with a KV cache
of its own and then follows the plain rows' chosen tokens one step at a time (pad after a row's
EOS, like the plain rows). What each forward yields is the caller's `read(ids, mask, cache)`, run
unsteered (`registry.paused`).

`PrefixContrast` is the decoding processor of a method that rewrites each step's next-token
logits from the plain row's and its prefixed twin's, `combine(plain, prefixed, strength)`;
`contrast_build(combine)` is such a method's `Form.build`, the twin behind the vectors' toxic
prefix (the one Self-Detoxify and DeStein's prefixed pairs use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from ..errors import DesteinError
from ..registry import BuildSteering, Steering, paused

if TYPE_CHECKING:
    from ..steering import SteeringConfig
    from ..vectors import DetoxVectors

T = TypeVar("T")
# (input ids, attention mask covering the cache and ids, the side's cache) -> what one forward yields
Read = Callable[[torch.Tensor, torch.Tensor, DynamicCache], T]
# (plain next-token logits [batch, vocab], prefixed ones, strength) -> the logits to sample from
Combine = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class PrefixedRows(Generic[T]):
    """Every row of a decoding batch behind each of `prefixes`, decoded beside it, one KV cache each."""

    def __init__(self, model: TransformerBridge, prefixes: Sequence[str], read: Read[T]) -> None:
        self.model = model
        self.prefixes = tuple(prefixes)
        self.read = read
        self._sides: list[tuple[DynamicCache, torch.Tensor]] = []

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[T]:
        """Prefill each prefixed batch; `read`'s result per prefix."""
        tokenizer, device = self.model.tokenizer, self.model.cfg.device
        texts = [
            tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(input_ids, attention_mask)
        ]
        outputs, self._sides = [], []
        for prefix in self.prefixes:
            enc = tokenizer(
                [prefix + t for t in texts], return_tensors="pt", padding=True, padding_side="left"
            )
            ids, mask, cache = enc.input_ids.to(device), enc.attention_mask.to(device), DynamicCache()
            outputs.append(self.read(ids, mask, cache))
            self._sides.append((cache, mask))
        return outputs

    def advance(self, tokens: torch.Tensor) -> list[T]:
        """Feed the tokens just chosen [batch, 1] to every prefixed batch; `read`'s result per prefix."""
        outputs, sides = [], []
        for cache, mask in self._sides:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            outputs.append(self.read(tokens, mask, cache))
            sides.append((cache, mask))
        self._sides = sides
        return outputs


@torch.no_grad()
def next_token_logits(
    model: TransformerBridge, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
) -> torch.Tensor:
    """Float32 next-token logits [batch, vocab] of one cached forward, run unsteered; the cache grows."""
    with paused():
        logits = model(
            ids, attention_mask=mask, past_key_values=cache, return_type="logits", logits_to_keep=1
        )
    return logits[:, -1].float()


class PrefixContrast:
    """The decoding processor: each step's logits rewritten as `combine(plain, prefixed, strength)`."""

    def __init__(self, model: TransformerBridge, prefix: str, combine: Combine, strength: float) -> None:
        self._rows = PrefixedRows(model, [prefix], partial(next_token_logits, model))
        self._combine = combine
        self._strength = strength
        self._prefixed: torch.Tensor | None = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        (self._prefixed,) = self._rows.start(input_ids, attention_mask)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        assert self._prefixed is not None, "the decoding loop calls start() first"
        return self._combine(logits, self._prefixed, self._strength)

    def advance(self, tokens: torch.Tensor) -> None:
        (self._prefixed,) = self._rows.advance(tokens)


def check_every_step(config: SteeringConfig) -> None:
    """A decoding-time method acts on every step's distribution: it takes positions='all' only."""
    if config.positions != "all":
        raise DesteinError(
            f"{config.form} rewrites the next-token distribution of every step: it takes positions='all'"
        )


def contrast_build(combine: Combine) -> BuildSteering:
    """The `Form.build` of a prefix-contrast method: one `PrefixContrast` behind the vectors' toxic
    prefix at the configured strength, no hooks."""

    def build(
        model: TransformerBridge,
        vectors: DetoxVectors,
        config: SteeringConfig,
        mask: torch.Tensor,
        prompts: Sequence[str] | None,
    ) -> Steering:
        check_every_step(config)
        toxic, _ = vectors.prefixes
        return Steering(processors=[PrefixContrast(model, toxic, combine, config.alpha)])

    return build
