"""Activation patching per head: exchange one head's output between the two sides of each pair.

For head (l, h), over the last `k` positions (the window the vectors pool), the toxic text's run
gets the head's `hook_z` from its non-toxic twin ("denoise"), and the non-toxic run gets the
toxic twin's ("noise"). Positions are aligned from each text's end, since twins differ in length.

    patching(l, h) = gap - gap_patched,  gap_patched = logp(toxic | denoised) - logp(non-toxic | noised)

per pair, nats per token. A head whose output only disrupts lowers both sides alike and cancels;
a head that carries toxicity into the prediction narrows the gap (positive). The next-token
metric is read per direction: "patching_denoise_mass" is how much log p(toxic next token) after
the toxic text falls when the head comes from the non-toxic twin, "patching_noise_mass" how
much it rises after the non-toxic text given the toxic twin's head.

TransformerLens's `patching.generic_activation_patch` is not used: it runs the corrupted tokens
without an attention mask (batches of texts of different lengths need one) and copies the clean
activation at the same positions, while twins of different lengths must be aligned at their ends.
The loop is the same shape as its: one patched forward per head per batch of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_name
from ..errors import DesteinError
from ..registry import Hooks
from .effects import Checkpoint, HeadEffects, per_head
from .heldout import SIDES, Batch, HeldOut, Scores, end_activations, end_positions, score


@dataclass(frozen=True, eq=False)
class _Ends:
    """Each side's head outputs at its last k positions, slot j = position length - 1 - j."""

    z: dict[str, torch.Tensor]  # side -> [b, k, n_layers, n_heads, d_head]
    valid: torch.Tensor  # [b, k]: slot j exists on both sides


def patching_effects(
    model: TransformerBridge,
    held: HeldOut,
    *,
    k: int = 8,
    baseline: Scores | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> dict[str, HeadEffects]:
    """Exchange each head's `hook_z` between twins over their last `k` positions (module docstring)."""
    if k < 1:
        raise DesteinError(f"k must be at least 1, got {k}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    base = baseline or score(model, held)
    batches = tqdm(held.batches, desc="patching (cache)", disable=not progress)
    ends = {id(batch): _ends(model, batch, k) for batch in batches}
    ckpt = checkpoint or Checkpoint(None)

    def cell(layer: int, head: int) -> torch.Tensor:
        def hooks(batch: Batch, side: str) -> Hooks:
            return [(hook_name("heads", layer), _patch_hook(batch, side, ends[id(batch)], layer, head))]

        patched = score(model, held, hooks)
        gap = patched.logprob[0] - patched.logprob[1]
        return torch.stack(
            [
                base.gap - gap,
                base.toxic_logmass[0] - patched.toxic_logmass[0],
                patched.toxic_logmass[1] - base.toxic_logmass[1],
            ]
        )

    values = per_head((n_layers, n_heads), cell, ckpt, "patching", progress)
    window = f"last {k} positions"
    return {
        "patching": HeadEffects(
            "patching", values[0], "nats/token", f"gap - gap with the head exchanged between twins ({window})"
        ),
        "patching_denoise_mass": HeadEffects(
            "patching_denoise_mass",
            values[1],
            "nats",
            f"log p(toxic next token) after the toxic text, minus with the non-toxic twin's head ({window})",
        ),
        "patching_noise_mass": HeadEffects(
            "patching_noise_mass",
            values[2],
            "nats",
            "log p(toxic next token) after the non-toxic text with the toxic twin's head, minus without "
            f"({window})",
        ),
    }


@torch.no_grad()
def _ends(model: TransformerBridge, batch: Batch, k: int) -> _Ends:
    names = [hook_name("heads", layer) for layer in range(model.cfg.n_layers)]
    z = {}
    for side in SIDES:
        acts = end_activations(model, batch.side(side), names, k)
        z[side] = torch.stack([acts[n] for n in names], dim=2)  # [b, k, L, H, d]
    span = torch.minimum(batch.toxic.lengths, batch.nontoxic.lengths).clamp(max=k)
    valid = torch.arange(k)[None] < span[:, None]
    return _Ends(z, valid)


def _patch_hook(batch: Batch, side: str, ends: _Ends, layer: int, head: int):
    """Put the twin's head-`head` output into this side's run at the aligned end positions."""
    twin = SIDES[1 - SIDES.index(side)]
    rows, slots = ends.valid.nonzero(as_tuple=True)
    positions = end_positions(batch.side(side).lengths, ends.valid.shape[1])[rows, slots]
    source = ends.z[twin][rows, slots, layer, head]  # [n, d_head]

    def hook(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[rows.to(z.device), positions.to(z.device), head] = source.to(z.device, z.dtype)
        return z

    return hook
