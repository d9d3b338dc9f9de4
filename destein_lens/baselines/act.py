"""Linear-AcT: an affine transport map per unit, from the toxic to the non-toxic activations.

Rodriguez et al. 2025, "Controlling Language and Diffusion Models by Transporting Activations"
(ICLR 2025, arXiv 2410.23054; code apple/ml-act, `linear_ot`).

As in ml-act:
- Sites: the outputs of the post-attention and post-feed-forward norms of every layer where the
  architecture has them (their Gemma-2 config, `.*post_attention_layernorm`,
  `.*post_feedforward_layernorm`), else the two pre-norms' outputs (their GPT-2 config, `ln_1`,
  `ln_2`); every unit of every layer.
- Estimation: each text is mean-pooled over its real tokens (`pooling_op: mean`); per unit the N
  toxic (source) and N non-toxic (target) values are sorted (1-D optimal transport) and
  T(x) = w x + b is fitted by least squares on the sorted pairs: w = cov(x, y) / var(x),
  b = mean(y) - w mean(x). Layers are fitted in order, each on activations computed with the
  earlier layers' maps on (`incremental`), so a layer's map sees what it will see at inference.
- Support: the map acts only where min(source) < x < max(source) of that unit (`q_0_100` as a
  mask, not a clamp); elsewhere x is left alone.
- Steer with strength lambda in [0, 1]: x <- (1 - lambda) x + lambda T(x) at every selected position
  (ml-act: every token, prompt and generated); ml-act evaluates toxicity at lambda = 1.
The one difference: the maps are fitted on the steering pairs (bare texts), not on Jigsaw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_activations
from ..forms import selected_positions
from ..registry import FitInputs, FitState, Form, HookFn, Hooks, Steering, register

_EPS = 1e-12
_MAPS = ("scale", "shift", "low", "high")


@dataclass(frozen=True, eq=False)
class TransportMaps(FitState):
    """Per layer and transported site, each [n_layers, 2, d_model]: T(x) = scale x + shift on the
    source's support [low, high]."""

    scale: torch.Tensor
    shift: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


def site_names(model: TransformerBridge) -> list[tuple[str, str]]:
    """The two transported hook points of every layer (module docstring)."""
    post = "blocks.0.ln1_post.hook_out" in model.hook_dict
    kinds = ("ln1_post", "ln2_post") if post else ("ln1", "ln2")
    return [tuple(f"blocks.{layer}.{kind}.hook_out" for kind in kinds) for layer in range(model.cfg.n_layers)]


def linear_transport(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, least squares of sorted target on sorted source: (w, b), each source.shape[1:]."""
    x, y = source.sort(0).values, target.sort(0).values
    dx, dy = x - x.mean(0), y - y.mean(0)
    w = (dx * dy).sum(0) / (dx * dx).sum(0).clamp_min(_EPS)
    return w, y.mean(0) - w * x.mean(0)


def fit(inputs: FitInputs) -> TransportMaps:
    """The maps, fitted layer after layer."""
    model = inputs.model
    names = site_names(model)
    maps: dict[str, list[torch.Tensor]] = {key: [] for key in _MAPS}
    texts = list(inputs.pairs.toxic) + list(inputs.pairs.nontoxic)
    for layer in tqdm(range(len(names)), desc="Linear-AcT maps", unit="layer", disable=not inputs.progress):
        earlier = TransportMaps(**{k: torch.stack(v) for k, v in maps.items()}) if layer else None
        hooks = _hooks(model, names[:layer], earlier, 1.0, "all") if earlier else []
        with model.hooks(fwd_hooks=hooks):
            pooled = hook_activations(
                model,
                texts,
                names[layer],
                k=None,
                batch_size=max(inputs.batch_size, 32),
                progress=False,
                stop_at_layer=layer + 1,
            )
        source, target = pooled.chunk(2)
        scale, shift = linear_transport(source, target)
        for key, value in zip(maps, (scale, shift, source.min(0).values, source.max(0).values)):
            maps[key].append(value)
    return TransportMaps(**{key: torch.stack(values) for key, values in maps.items()})


def transport(x: torch.Tensor, scale, shift, low, high, strength: float) -> torch.Tensor:
    """(1 - strength) x + strength T(x) inside the unit's support, x outside it."""
    inside = (x > low) & (x < high)
    return torch.where(inside, x + strength * (scale * x + shift - x), x)


def _hooks(
    model: TransformerBridge,
    names: Sequence[tuple[str, str]],
    maps: TransportMaps,
    strength: float,
    positions: str,
) -> Hooks:
    device, dtype = model.cfg.device, model.cfg.dtype
    hooks = []
    for layer, pair in enumerate(names):
        for i, name in enumerate(pair):
            params = [getattr(maps, key)[layer, i].to(device, dtype) for key in _MAPS]
            hooks.append((name, _hook(params, strength, positions)))
    return hooks


def _hook(params: list[torch.Tensor], strength: float, positions: str) -> HookFn:
    def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        keep = selected_positions(x.shape[1], positions, x.device).view(1, -1, 1)
        return torch.where(keep, transport(x, *params, strength), x)

    return hook


def _build(
    model: TransformerBridge, vectors, config, mask: torch.Tensor, prompts: Sequence[str] | None
) -> Steering:
    return Steering(_hooks(model, site_names(model), vectors.fit("act"), config.alpha, config.positions))


register(
    Form(
        "act",
        "Linear-AcT: per-unit affine transport maps (sorted toxic -> non-toxic) at every norm output",
        _build,
        default_strength=0.5,
        max_strength=1.0,
        grid=(0.25, 0.5, 1.0),
        head_wise=False,
        fit=fit,
        state=TransportMaps,
    )
)
