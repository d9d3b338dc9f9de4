"""Gradient attribution: every head's patching and steering effect from one forward and one
backward per batch of pairs and side, instead of one forward per head.

Both are first-order Taylor estimates of the exact studies (`patching`, `steering`), read off the
gradient g = d(mean token log-prob of the text) / d(activation) of each side's own run:

- attribution patching (AtP; Nanda 2023, Kramár et al. 2024, arXiv 2403.00745) of the exact
  exchange of head (l, h)'s `hook_z` between twins over their last k aligned positions:

      atp_patching(l, h) = sum over the window of (z_toxic - z_nontoxic) . (g_toxic + g_nontoxic)

  (the toxic run's change is (z_nt - z_t) . g_t, the non-toxic run's (z_t - z_nt) . g_nt, and the
  gap is their difference);
- the first-order effect of steering head (l, h) alone with any head-wise form at strength alpha:

      atp_steering(l, h) = -(offset_toxic . g_toxic - offset_nontoxic . g_nontoxic),

  offset = the form's hook applied with only that head selected, minus the activation, at the
  actual activations of every real position (for a whole-layer form such as the released code's,
  the offset spans the layer, exactly as steering that head alone moves it).

Of AtP*'s two fixes, the QK fix does not apply: it corrects patches of attention queries and keys,
whose effect passes through the head's own softmax, while these nodes are head outputs `hook_z`,
downstream of it. GradDrop (against paths that cancel) would cost a backward per layer; the
estimates are instead checked against the exact studies (`agreement`, `benchmarks/`). The gap is the
metric, as in the exact studies; both carry nats per token and the exact studies' sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_name
from ..registry import DEFAULT_STRENGTH
from ..steering import SteeringConfig, build_steering
from ..vectors import DetoxVectors
from .effects import HeadEffects
from .heldout import SIDES, Batch, HeldOut, end_positions, score_side


def gradient_effects(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    *,
    k: int = 8,
    alpha: float = DEFAULT_STRENGTH,
    form: str = "destein",
    progress: bool = True,
) -> dict[str, HeadEffects]:
    """ "atp_patching" and "atp_steering" per head and held-out pair (module docstring)."""
    patching, steering = _attribute(model, vectors, held, (form,), alpha, k, progress)
    window = f"last {k} positions"
    return {
        "atp_patching": HeadEffects(
            "atp_patching",
            patching,
            "nats/token",
            f"attribution patching (first order) of exchanging the head between twins ({window})",
        ),
        "atp_steering": HeadEffects(
            "atp_steering",
            steering[form],
            "nats/token",
            f"first-order gap(unsteered) - gap(head steered alone, {form} alpha {alpha:g})",
        ),
    }


def first_order_steering(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    forms: Sequence[str],
    *,
    alpha: float = DEFAULT_STRENGTH,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per form, [n_layers, n_heads, n_pairs]: the first-order steering effect alone (the causal
    ranking's score), every form from the same forwards and backwards."""
    return _attribute(model, vectors, held, forms, alpha, None, progress)[1]


def _attribute(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    forms: Sequence[str],
    alpha: float,
    k: int | None,
    progress: bool,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """AtP of patching over the last `k` positions (None: skipped) and each form's steering."""
    n_layers, n_heads = vectors.shape
    single = {form: _single_head_hooks(model, vectors, alpha, form) for form in forms}
    patching = torch.zeros(n_layers, n_heads, len(held)) if k is not None else None
    steering = {form: torch.zeros(n_layers, n_heads, len(held)) for form in forms}
    for batch in tqdm(held.batches, desc="gradient attribution", disable=not progress):
        sides = {name: _side_gradients(model, batch, name, held.toxic_ids, vectors.site) for name in SIDES}
        if patching is not None:
            patching[..., batch.index] = _atp_patching(batch, sides, k)
        for form in forms:
            steering[form][..., batch.index] = _first_order_steering(model, sides, single[form])
    return patching, steering


@dataclass(frozen=True, eq=False)
class _Side:
    """One side's activations and gradients of its mean log-prob, float32 on the CPU."""

    z: torch.Tensor  # [b, p, n_layers, n_heads, d_head]: hook_z
    gz: torch.Tensor  # and its gradient
    site: list[torch.Tensor]  # per layer, the vectors' site activation
    gsite: list[torch.Tensor]  # and its gradient
    lengths: torch.Tensor  # [b]


def _side_gradients(
    model: TransformerBridge, batch: Batch, side: str, toxic_ids: torch.Tensor, site: str
) -> _Side:
    """One forward and one backward of one side of a batch."""
    names = [hook_name("heads", layer) for layer in range(model.cfg.n_layers)]
    site_names = [hook_name(site, layer) for layer in range(model.cfg.n_layers)]
    wanted = list(dict.fromkeys(names + site_names))
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            if not kept:  # the first hook point: a leaf, so every later activation carries a graph
                act = act.detach().requires_grad_(True)
            kept[name] = act
            return act

        return hook

    with torch.enable_grad():
        logprob, _ = score_side(model, batch.side(side), toxic_ids, [(n, keep(n)) for n in wanted])
        grads = torch.autograd.grad(logprob.sum(), [kept[n] for n in wanted])
    grad = dict(zip(wanted, grads))

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu()

    return _Side(
        torch.stack([cpu(kept[n]) for n in names], dim=2),
        torch.stack([cpu(grad[n]) for n in names], dim=2),
        [cpu(kept[n]) for n in site_names],
        [cpu(grad[n]) for n in site_names],
        batch.side(side).lengths,
    )


def _atp_patching(batch: Batch, sides: dict[str, _Side], k: int) -> torch.Tensor:
    """[n_layers, n_heads, b]: AtP of exchanging each head over the aligned last-k window."""
    t, n = sides["toxic"], sides["nontoxic"]
    span = torch.minimum(t.lengths, n.lengths).clamp(max=k)
    valid = torch.arange(k)[None] < span[:, None]  # [b, k]
    rows = torch.arange(len(span))[:, None]
    at = {name: end_positions(s.lengths, k).clamp_min(0) for name, s in sides.items()}
    z_t, z_n = t.z[rows, at["toxic"]], n.z[rows, at["nontoxic"]]  # [b, k, L, H, d]
    g = t.gz[rows, at["toxic"]] + n.gz[rows, at["nontoxic"]]
    terms = ((z_t - z_n) * g).sum(-1) * valid[..., None, None]  # [b, k, L, H]
    return terms.sum(1).permute(1, 2, 0)


def _single_head_hooks(model: TransformerBridge, vectors: DetoxVectors, alpha: float, form: str) -> dict:
    """(layer, head) -> the form's hook with only that head selected (one hook, on its layer)."""
    out = {}
    for layer in range(vectors.shape[0]):
        for head in range(vectors.shape[1]):
            config = SteeringConfig(alpha=alpha, heads=[(layer, head)], form=form)
            ((name, fn),) = build_steering(model, vectors, config).hooks
            out[layer, head] = (name, fn)
    return out


@torch.no_grad()
def _first_order_steering(model: TransformerBridge, sides: dict[str, _Side], single: dict) -> torch.Tensor:
    """[n_layers, n_heads, b]: -(offset . g) of the toxic side minus that of the non-toxic side."""
    n_layers = len(sides["toxic"].site)
    n_heads = len(single) // n_layers
    out = torch.zeros(n_layers, n_heads, len(sides["toxic"].lengths))
    device, dtype = model.cfg.device, model.cfg.dtype
    for (layer, head), (name, fn) in single.items():
        hook = model.hook_dict[name]
        change = []
        for s in sides.values():
            act = s.site[layer].to(device, dtype)
            offset = (fn(act.clone(), hook) - act).float().cpu()
            change.append(-(offset * s.gsite[layer]).flatten(1).sum(-1))
        out[layer, head] = change[0] - change[1]
    return out
