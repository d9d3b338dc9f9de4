"""What a decoding-time method's processor wrote at each step: the tests of the decoding methods
(PREADD, LMA, the trained experts, Goodtriever) compare it with their reference formulas."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from destein_lens import SteeringConfig, steer
from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.registry import active_processors
from destein_lens.vectors import DetoxVectors


def recorded_logits(
    model, vectors: DetoxVectors | None, config: SteeringConfig, texts: Sequence[str], new_tokens: int = 4
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every step's rewritten logits [batch, vocab] and the greedy tokens [batch, new_tokens], from
    the method's own (single) processor."""
    seen: list[torch.Tensor] = []
    with steer(model, vectors, config):
        (processor,) = active_processors()
        rewrite = processor.logits

        def record(logits: torch.Tensor) -> torch.Tensor:
            seen.append(rewrite(logits))
            return seen[-1]

        processor.logits = record
        new = generate_ids(model, list(texts), SamplingConfig(do_sample=False, max_new_tokens=new_tokens))
    return seen, new
