"""ActAdd / CAA: one residual-stream direction added at every position.

Turner et al. 2023, "Activation Addition" (arXiv 2308.10248); Rimsky et al. 2024, "Steering Llama 2
via Contrastive Activation Addition" (arXiv 2312.06681).

Fit (bare pair texts, each side the mean of its last k tokens, as DeStein pools): at every layer
l, v_l = mean over pairs of resid_pre_l(non-toxic) - resid_pre_l(toxic), and the layer's
separation d'_l = (mean non-toxic - mean toxic projection on v_l / |v_l|) / pooled within-class
std of those projections. The layer rule: steer the layer of largest d' (ties: the earliest).
d' is the mean-difference direction's own signal-to-noise, so the rule picks where adding it
moves text furthest relative to the spread it lives in; layer 0 (the token embeddings) is
excluded, since there a mean difference is a bag of nicer words, not a representation.
Steer: resid_pre_l += c * v_l at the selected positions; c = 1 moves the toxic mean onto the
non-toxic mean at that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_activations
from ..forms import selected_positions
from ..registry import FitInputs, FitState, Form, Steering, register


def resid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True, eq=False)
class ResidualDirections(FitState):
    """Per layer: the mean non-toxic - toxic residual [n_layers, d_model] and its d' [n_layers]."""

    directions: torch.Tensor
    separation: torch.Tensor


def fit(inputs: FitInputs) -> ResidualDirections:
    """The directions and their separation, from the pairs' residual streams."""
    names = [resid_name(layer) for layer in range(inputs.model.cfg.n_layers)]
    opts = {"k": inputs.k, "batch_size": inputs.batch_size, "progress": inputs.progress, "desc": "actadd"}
    toxic = hook_activations(inputs.model, list(inputs.pairs.toxic), names, **opts)
    nontoxic = hook_activations(inputs.model, list(inputs.pairs.nontoxic), names, **opts)
    directions = (nontoxic - toxic).mean(0)
    return ResidualDirections(directions, separation(toxic, nontoxic, directions))


def separation(toxic: torch.Tensor, nontoxic: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """d' of each layer's direction: [n, L, d] x2 and [L, d] -> [L]."""
    unit = F.normalize(directions, dim=-1)
    proj_t = einops.einsum(toxic, unit, "n l d, l d -> n l")
    proj_n = einops.einsum(nontoxic, unit, "n l d, l d -> n l")
    pooled = ((proj_t.var(0) + proj_n.var(0)) / 2).sqrt()
    return (proj_n.mean(0) - proj_t.mean(0)) / pooled


def chosen_layer(separation: torch.Tensor) -> int:
    """The layer rule (module docstring): the largest d' after the embeddings, the earliest on ties."""
    candidates = separation[1:] if len(separation) > 1 else separation
    offset = 1 if len(separation) > 1 else 0
    return int(torch.argmax(candidates)) + offset  # argmax returns the first maximum


def _build(
    model: TransformerBridge, vectors, config, mask: torch.Tensor, prompts: Sequence[str] | None
) -> Steering:
    fitted = vectors.fit("actadd")
    layer = chosen_layer(fitted.separation)
    shift = (config.alpha * fitted.directions[layer]).to(model.cfg.device, model.cfg.dtype)
    positions = config.positions

    def hook(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        keep = selected_positions(resid.shape[1], positions, resid.device).view(1, -1, 1)
        return torch.where(keep, resid + shift, resid)

    return Steering([(resid_name(layer), hook)])


register(
    Form(
        "actadd",
        "ActAdd/CAA: c x the mean non-toxic - toxic residual difference added at one layer",
        _build,
        default_strength=1.0,
        max_strength=50.0,
        grid=(0.5, 1.0, 2.0),
        head_wise=False,
        fit=fit,
        state=ResidualDirections,
    )
)
