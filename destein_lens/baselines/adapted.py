"""Adapters of the loaded model decoded beside it: what DExperts and DAPT share.

At `start` the batch's own rows (the same token ids and mask, left-padded) go through the plain copy
of the model (`experts.adapters.carrier`) under each adapter, stacked in one forward as a peft
mixed-adapter batch (`adapter_names=`: rows of each adapter apply only its LoRA weights, the frozen
base is computed once for all) with one KV cache; each step feeds the tokens just chosen through it
again, unsteered (`registry.paused`). Measured on gemma-3-270m (2 CPU cores, 16 rows): one mixed
forward and one forward per adapter (`set_adapter` twice, two caches) cost the same per step
within the noise of a shared machine (1.3-1.9 s against 1.4-1.5 s), so the simpler one, one call
and one cache, is used.

`AdapterMix` is the decoding processor of a method that rewrites each step's next-token logits
from the base model's and the adapters', `combine(base, adapted, strength)`, adapted
[n_adapters, batch, vocab]; `adapter_build(kinds, combine)` is such a method's `Form.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from einops import rearrange, repeat
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from ..experts.adapters import carrier, check_adapters, forward
from ..registry import BuildSteering, Steering
from .prefixed import check_every_step

if TYPE_CHECKING:
    from ..steering import SteeringConfig
    from ..vectors import DetoxVectors

# (base next-token logits [batch, vocab], the adapters' [n_adapters, batch, vocab], strength) -> logits
Combine = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class AdapterRows:
    """The batch's rows under each of `kinds`, in one mixed-adapter batch with one KV cache."""

    def __init__(self, bridge: TransformerBridge, kinds: Sequence[str]) -> None:
        self.kinds = tuple(kinds)
        self._model, _ = carrier(bridge, self.kinds)
        self._cache = DynamicCache()
        self._mask = torch.ones(0, 0)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        n, rows = len(self.kinds), ids.shape[0]
        out = forward(
            self._model,
            repeat(ids, "b t -> (k b) t", k=n),
            repeat(self._mask, "b t -> (k b) t", k=n),
            self._cache,
            adapter_names=[kind for kind in self.kinds for _ in range(rows)],
            logits_to_keep=1,
        )
        return rearrange(out.logits[:, -1].float(), "(k b) v -> k b v", k=n)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prefill; the adapters' next-token logits [n_adapters, batch, vocab]."""
        self._cache, self._mask = DynamicCache(), attention_mask
        return self._run(input_ids)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens just chosen [batch, 1]; the adapters' next-token logits."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        return self._run(tokens)


class AdapterMix:
    """The decoding processor: each step's logits rewritten as `combine(base, adapted, strength)`."""

    def __init__(
        self, bridge: TransformerBridge, kinds: Sequence[str], combine: Combine, strength: float
    ) -> None:
        self._rows = AdapterRows(bridge, kinds)
        self._combine = combine
        self._strength = strength
        self._adapted: torch.Tensor | None = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._adapted = self._rows.start(input_ids, attention_mask)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        assert self._adapted is not None, "the decoding loop calls start() first"
        return self._combine(logits, self._adapted, self._strength)

    def advance(self, tokens: torch.Tensor) -> None:
        self._adapted = self._rows.advance(tokens)


def adapter_build(kinds: Sequence[str], combine: Combine) -> BuildSteering:
    """The `Form.build` of an adapter method: one `AdapterMix` at the configured strength, no hooks."""

    def build(
        model: TransformerBridge,
        vectors: DetoxVectors | None,
        config: SteeringConfig,
        mask: torch.Tensor,
        prompts: Sequence[str] | None,
    ) -> Steering:
        check_every_step(config)
        return Steering(processors=[AdapterMix(model, kinds, combine, config.alpha)])

    return build


def adapter_check(kinds: Sequence[str]) -> Callable[[TransformerBridge], dict[str, str]]:
    """The `Form.check` of an adapter method: its adapters exist for the model, and their digests
    (`check_adapters`)."""
    return lambda model: check_adapters(model, kinds)
