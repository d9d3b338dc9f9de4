"""Head attribution: what steering one head alone does to the model's preference for toxic text.

Probe accuracy says a head *separates* toxic from non-toxic text; it does not say that moving the
head along its direction changes what the model writes. This study measures the second thing, head
by head, on held-out pairs (texts the directions were not built from):

    gap = mean over pairs of [mean token log-prob(toxic text) - mean token log-prob(non-toxic text)]
    effect(l, h) = gap(unsteered) - gap(only head (l, h) steered)

A positive effect means steering that head makes the toxic side relatively less likely. The rank
correlation with probe accuracy tells how far DeStein's probe-based head ranking tracks causal
effect. Log-probs are teacher-forced on the bare texts; every token predicted from an earlier
position is scored (Gemma's BOS makes that every text token; without a BOS the first is unscored).
This module computes; `views.attribution_figure` draws the result.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
from scipy.stats import ConstantInputWarning, spearmanr
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .errors import DesteinError
from .pairs import SteeringPairs
from .steering import DEFAULT_STRENGTH, steer
from .vectors import DetoxVectors


@dataclass(frozen=True, eq=False)  # eq=False: == on tensor fields is elementwise, not a bool
class HeadAttribution:
    """Per-head effect of single-head steering on the held-out toxic/non-toxic log-prob gap."""

    effect: torch.Tensor  # [n_layers, n_heads], gap_unsteered - gap_steered, nats per token
    baseline_gap: float  # unsteered gap, nats per token
    alpha: float
    n_pairs: int  # held-out pairs the gap averages over
    spearman: float  # rank correlation of effect with probe accuracy; NaN if either is constant

    def by_effect(self) -> list[tuple[int, int]]:
        """Heads ordered by effect, most detoxifying first (ties: index).

        An order to set beside `DetoxVectors.ranking()`, the one ranking steering uses; not a
        second ranking: nothing steers by it.
        """
        n_heads = self.effect.shape[1]
        effect = self.effect.flatten().tolist()
        return [divmod(i, n_heads) for i in sorted(range(len(effect)), key=lambda i: (-effect[i], i))]


@torch.no_grad()
def mean_token_logprobs(
    model: TransformerBridge, texts: Sequence[str], *, batch_size: int = 32
) -> torch.Tensor:
    """Teacher-forced mean log-prob of each text's own tokens, [n_texts], float32.

    Right padding: real tokens keep their unpadded positions and, causally, never see the pads.
    """
    tokenizer = model.tokenizer
    device = model.cfg.device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = list(texts[i : i + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="right")
        scored = enc.attention_mask[:, 1:].to(device)
        counts = scored.sum(-1)
        if (counts == 0).any():
            j = int((counts == 0).nonzero()[0])
            raise DesteinError(f"text {i + j} is a single token, nothing to score: {batch[j][:60]!r}")
        ids = enc.input_ids.to(device)
        logits = model(ids, attention_mask=enc.attention_mask.to(device), return_type="logits")[:, :-1]
        # log p = logit - logsumexp: no vocabulary-sized temporary beyond the logits themselves
        # (cross_entropy over a [b, v, p] view is several times slower on CPU).
        target = logits.gather(-1, ids[:, 1:, None])[..., 0].float()
        logprobs = target - torch.logsumexp(logits.float(), dim=-1)
        out.append(((logprobs * scored).sum(-1) / counts).cpu())
    return torch.cat(out)


def logprob_gap(model: TransformerBridge, pairs: SteeringPairs, *, batch_size: int = 32) -> float:
    """Mean over pairs of the toxic minus the non-toxic text's mean token log-prob, nats per token."""
    logprobs = mean_token_logprobs(model, list(pairs.toxic + pairs.nontoxic), batch_size=batch_size)
    toxic, nontoxic = einops.rearrange(logprobs, "(side n) -> side n", side=2)
    return float((toxic - nontoxic).mean())


def head_attribution(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held_out: SteeringPairs,
    *,
    alpha: float = DEFAULT_STRENGTH,
    batch_size: int = 32,
    progress: bool = True,
) -> HeadAttribution:
    """Steer each head alone and record how much the held-out log-prob gap shrinks.

    `vectors` should be built on pairs disjoint from `held_out` (e.g. `pairs.split(0.8)`), so the
    study measures generalisation, not the fit. One forward of all held-out texts per head
    (n_layers x n_heads forwards) when they fit in `batch_size`. The default `alpha` is the
    project's usual strength, so each effect is that head's share of the usual steering.
    """
    vectors.check_compatible(model)
    if held_out.sha256() == vectors.pairs_sha256:
        raise DesteinError("held-out pairs are the pairs the vectors were built on; split them first")
    baseline = logprob_gap(model, held_out, batch_size=batch_size)
    n_layers, n_heads = vectors.shape
    effect = torch.zeros(n_layers, n_heads)
    heads = list(itertools.product(range(n_layers), range(n_heads)))
    for layer, head in tqdm(heads, desc="head attribution", unit="head", disable=not progress):
        with steer(model, vectors, alpha=alpha, heads=[(layer, head)]):
            effect[layer, head] = baseline - logprob_gap(model, held_out, batch_size=batch_size)
    return HeadAttribution(
        effect=effect,
        baseline_gap=baseline,
        alpha=float(alpha),
        n_pairs=len(held_out),
        spearman=_spearman(effect, vectors.probe_accuracy),
    )


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation over all heads; NaN (not a warning) when either grid is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)
