"""ITI, Inference-Time Intervention: the top-K probe heads shifted along their mass-mean direction.

Li et al. 2023, "Inference-Time Intervention: Eliciting Truthful Answers from a Language Model"
(arXiv 2306.03341; code likenneth/honest_llama).

Fit (bare pair texts at the vectors' site, the activations DeStein's probes are fitted on): per
head, theta_h = normalize(mean non-toxic - mean toxic) (the mass-mean shift, "com" direction),
sigma_h = the population std of all training activations projected on theta_h (honest_llama's
`np.std(activations @ direction)`). Heads: the top K of the vectors' ranking, i.e. by held-out
probe accuracy as ITI ranks them; K keeps ITI's proportion, 48 of LLaMA-7B's 1024 heads.
Steer: x_h += alpha * sigma_h * theta_h at the selected positions (honest_llama edits only the
last position of each forward, which under the KV cache is every generated token; the default
here, every position, follows the paper's description). ITI's default on LLaMA-7B: alpha = 15.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_name
from ..forms import head_hook
from ..registry import FitInputs, FitState, Form, Steering, register

ITI_HEAD_FRACTION = 48 / 1024


@dataclass(frozen=True, eq=False)
class MassMeanShift(FitState):
    """Each head's unit mass-mean direction theta [n_layers, n_heads, width] and the spread sigma
    [n_layers, n_heads] of the activations along it."""

    theta: torch.Tensor
    sigma: torch.Tensor


def fit(inputs: FitInputs) -> MassMeanShift:
    """theta and sigma from the bare pair texts."""
    toxic, nontoxic = inputs.bare[:, 0], inputs.bare[:, 1]
    theta = F.normalize(nontoxic.mean(0) - toxic.mean(0), dim=-1)
    both = torch.cat([toxic, nontoxic])
    sigma = einops.einsum(both, theta, "n l h w, l h w -> n l h").std(0, correction=0)
    return MassMeanShift(theta, sigma)


def default_heads(n_layers: int, n_heads: int) -> int:
    """ITI's share of the heads, at least one."""
    return max(1, math.ceil(n_layers * n_heads * ITI_HEAD_FRACTION))


def _build(
    model: TransformerBridge, vectors, config, mask: torch.Tensor, prompts: Sequence[str] | None
) -> Steering:
    fitted = vectors.fit("iti")
    shifts = config.alpha * fitted.sigma.unsqueeze(-1) * fitted.theta  # [L, H, w]
    device, dtype = model.cfg.device, model.cfg.dtype
    hooks = []
    for layer in range(vectors.shape[0]):
        if mask[layer].any():
            hook = head_hook(
                lambda x, shift: x + shift,
                shifts[layer].to(device, dtype),
                mask[layer].to(device),
                vectors.site,
                config.positions,
            )
            hooks.append((hook_name(vectors.site, layer), hook))
    return Steering(hooks)


register(
    Form(
        "iti",
        "ITI: the top-K probe heads shifted by alpha x sigma along their mass-mean direction",
        _build,
        default_strength=4.0,
        max_strength=200.0,
        grid=(2.0, 4.0, 8.0),
        fit=fit,
        state=MassMeanShift,
        default_heads=default_heads,
    )
)
