"""Steering: fuse the detox directions into the heads' outputs through hook points, inside a context.

    with steer(model, vectors, alpha=0.4, heads=16, positions="all"):
        texts = generate(model, prompts, config)

Forms (x_h is head h's output at one position, v_h its direction, w_h = 1 + probe accuracy):
- "destein" (default), the paper's head-wise fusion with the released code's norm-preserving update:
  x_h' = ||x_h|| * normalize(x_h / ||x_h|| - alpha * w_h * normalize(v_h));
- "released_code", what the authors' code executes: per layer, the whole vector x (all slices) is
  moved along u = normalize(concat_h(w_h * v_h)): x' = ||x|| * normalize(x / ||x|| - alpha * u).
  With site "attn_out_slices" this is the faithful replication;
- "additive", the paper's stated h + alpha * z with z = non-toxic - toxic: x_h' = x_h - alpha * w_h * v_h.

Heads: "all", an int k (the top-k heads by held-out probe accuracy) or a list of (layer, head).
Positions: "all", "prompt" or "generated", from the absolute positions the decoding loop declares
(`positions.token_window`), so they are right under the KV cache. alpha = 0 or an empty head set
registers no hook at all: the model is untouched, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from .activations import as_heads, hook_name
from .errors import DesteinError
from .positions import prompt_mask
from .vectors import DetoxVectors

Form = Literal["destein", "released_code", "additive"]
Positions = Literal["all", "prompt", "generated"]
Heads = str | int | Sequence[tuple[int, int]]
FORMS: tuple[str, ...] = ("destein", "released_code", "additive")
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")
# The one default steering strength (CLI, figures, attribution, notebooks, README). On
# gemma-3-270m the benchmark sweep puts the useful all-heads range at 0.05-0.15 (perplexity
# x1.3 at 0.1, x3.7 at 0.15); by 0.4 the text degenerates.
DEFAULT_STRENGTH = 0.1
_EPS = 1e-12  # a zero output (rare; e.g. a fully masked position) stays put instead of turning NaN


def head_mask(vectors: DetoxVectors, heads: Heads) -> torch.Tensor:
    """Bool [n_layers, n_heads] of the heads to steer."""
    n_layers, n_heads = vectors.shape
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    if isinstance(heads, str):
        if heads != "all":
            raise DesteinError(
                f"heads must be 'all', an int k (top-k) or a list of (layer, head); got {heads!r}"
            )
        mask[:] = True
    elif isinstance(heads, int):
        if not 0 <= heads <= n_layers * n_heads:
            raise DesteinError(f"top-k heads: k must be between 0 and {n_layers * n_heads}, got {heads}")
        for layer, head in vectors.ranking()[:heads]:
            mask[layer, head] = True
    else:
        for item in heads:
            layer, head = item
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise DesteinError(
                    f"head ({layer}, {head}) is out of range for {n_layers} layers x {n_heads} heads"
                )
            mask[layer, head] = True
    return mask


def steering_hooks(
    model: TransformerBridge,
    vectors: DetoxVectors,
    alpha: float,
    *,
    heads: Heads = "all",
    positions: Positions = "all",
    form: Form = "destein",
) -> list[tuple[str, Callable[[torch.Tensor, HookPoint], torch.Tensor]]]:
    """(hook name, hook function) pairs implementing the steering; `steer` is the usual entry point."""
    vectors.check_compatible(model)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise DesteinError(f"alpha must be a finite number, got {alpha!r}")
    if form not in FORMS:
        raise DesteinError(f"unknown steering form {form!r}; choose one of {', '.join(FORMS)}")
    if positions not in POSITIONS:
        raise DesteinError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    mask = head_mask(vectors, heads)
    if alpha == 0 or not mask.any():
        return []
    dtype, device = model.cfg.dtype, model.cfg.device
    # alpha * w_h, zero on heads left alone: [n_layers, n_heads, 1]
    scale = (alpha * vectors.head_weights * mask).unsqueeze(-1)
    n_heads = vectors.shape[1]
    hooks = []
    for layer in range(vectors.shape[0]):
        if not mask[layer].any():
            continue
        v = vectors.directions[layer]
        if form == "destein":
            offset = scale[layer] * F.normalize(v, dim=-1)
        elif form == "released_code":
            weighted = (vectors.head_weights[layer] * mask[layer]).unsqueeze(-1) * v
            offset = alpha * F.normalize(weighted.flatten(), dim=0).reshape(v.shape)
        else:
            offset = scale[layer] * v
        # released_code moves the whole layer vector; the other forms only the selected heads.
        moved_heads = torch.ones_like(mask[layer]) if form == "released_code" else mask[layer]
        fn = _hook(offset.to(device, dtype), moved_heads.to(device), vectors.site, n_heads, form, positions)
        hooks.append((hook_name(vectors.site, layer), fn))
    return hooks


@contextmanager
def steer(
    model: TransformerBridge,
    vectors: DetoxVectors,
    alpha: float,
    *,
    heads: Heads = "all",
    positions: Positions = "all",
    form: Form = "destein",
) -> Iterator[TransformerBridge]:
    """Steer `model` inside the block; hooks are removed on exit, also after an exception."""
    hooks = steering_hooks(model, vectors, alpha, heads=heads, positions=positions, form=form)
    with model.hooks(fwd_hooks=hooks):
        yield model


def _hook(
    offset: torch.Tensor, heads: torch.Tensor, site: str, n_heads: int, form: str, positions: str
) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """A hook moving the outputs of `heads` by `offset` ([n_heads, width]) in `form`."""

    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = as_heads(act, site, n_heads)  # [batch, pos, n_heads, width]
        if form == "destein":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            moved = norm * F.normalize(x / norm - offset, dim=-1)
        elif form == "released_code":
            flat = einops.rearrange(x, "b p h w -> b p (h w)")
            norm = flat.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            moved_flat = norm * F.normalize(flat / norm - offset.flatten(), dim=-1)
            moved = einops.rearrange(moved_flat, "b p (h w) -> b p h w", h=n_heads)
        else:
            moved = x - offset
        keep = heads.view(1, 1, -1, 1)
        if positions != "all":
            in_prompt = prompt_mask(x.shape[1], x.device)
            selected = in_prompt if positions == "prompt" else ~in_prompt
            keep = keep & selected.view(1, -1, 1, 1)
        out = torch.where(keep, moved, x)
        return out if site == "heads" else einops.rearrange(out, "b p h w -> b p (h w)")

    return hook
