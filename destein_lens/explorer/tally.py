"""The explorer's live tally: EMT, TP and the perplexity ratio of a setting over a handful of prompts.

The numbers come from the evaluation harness itself (`evaluation.evaluate`, into a scratch folder
that is deleted afterwards), so they are exactly what `destein-lens run` reports for the same
prompts, samples and seed: per-(prompt, sample) seeds, the same scorer, perplexity under the
unsteered model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from ..evaluation import EvalConfig, MethodSpec, evaluate
from ..generation import SamplingConfig
from ..prompts import Prompt
from ..scoring import Scorer
from ..vectors import DetoxVectors


@dataclass(frozen=True)
class Tally:
    """The unsteered and the steered cell's metrics (`metrics.summarise`) on the same prompts."""

    unsteered: dict[str, Any]
    steered: dict[str, Any]

    @property
    def perplexity_ratio(self) -> float:
        return self.steered["perplexity"] / self.unsteered["perplexity"]


def cell_metrics(
    model: TransformerBridge,
    vectors: DetoxVectors,
    prompts: Sequence[Prompt],
    method: MethodSpec,
    sampling: SamplingConfig,
    scorer: Scorer,
) -> dict[str, Any]:
    """One method's metrics on `prompts`, as `evaluate` computes them in a run folder."""
    config = EvalConfig(sampling=sampling, scorer=scorer.name)
    with tempfile.TemporaryDirectory(prefix="destein-explore-") as out:
        metrics = evaluate(
            model, prompts, [method], out, config, vectors=vectors, scorer=scorer, progress=False
        )
    return metrics[method.name]
