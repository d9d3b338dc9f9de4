"""Direct logit attribution: what each head writes straight into the logits, through W_O and W_U.

Two readings, both along the direct path only (head output -> W_O -> the residual stream -> the
final norm -> the unembedding; later layers are skipped, which is what "direct" means):
- per held-out pair, the head's toxic-minus-non-toxic output difference (mean of the last k
  positions, as the vectors pool) mapped to the logits and read as the mean logit of the toxic
  word set minus that of a neutral word set: positive means the head's toxic-side output directly
  promotes toxic words. This is the study's effect, with intervals over pairs;
- per head, the tokens its DeStein move (minus the direction) promotes and suppresses most.
The norms are linearised at the toxic side's actual activations (a Jacobian-vector product at
each of the last k positions, averaged): this is the frozen-scale DLA of TransformerLens's
`apply_ln_to_stack`, generalised to any norm (Gemma's post-attention RMSNorm sits between W_O and
the residual stream, and scales each layer's writes differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import einops
import torch
from torch.func import jvp
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_name
from ..errors import DesteinError
from ..store import load_result, save_result
from ..vectors import DetoxVectors
from .effects import HeadEffects
from .heldout import SIDES, HeldOut, Side, end_activations, end_positions, word_ids

N_TOP = 10


@dataclass(frozen=True, eq=False)
class DirectLogits:
    """DLA of the held-out pairs' head differences (`effects`) and of the detox directions."""

    effects: HeadEffects  # study "dla", logits
    top_ids: torch.Tensor  # [n_layers, n_heads, 2, N_TOP]: tokens the detox move promotes (0), suppresses (1)
    top_logits: torch.Tensor  # [n_layers, n_heads, 2, N_TOP]: their logit change
    top_tokens: list  # [n_layers][n_heads][2][N_TOP] decoded strings of top_ids
    # [n_layers, n_heads]: toxic - neutral mean logit the direction (toxic - non-toxic) writes, per
    # unit of the detox move: positive, like every effect here, means it promotes toxic words
    direction_effect: torch.Tensor

    def __post_init__(self) -> None:
        shape = tuple(self.top_logits.shape)
        if len(shape) != 4 or shape[2] != 2 or tuple(self.top_ids.shape) != shape:
            raise DesteinError(
                f"top_logits and top_ids must both be [n_layers, n_heads, 2, n_top], got {shape} "
                f"and {tuple(self.top_ids.shape)}"
            )
        if tuple(self.direction_effect.shape) != shape[:2] or self.effects.shape != shape[:2]:
            raise DesteinError(
                f"top_logits covers {shape[:2]} heads, direction_effect "
                f"{tuple(self.direction_effect.shape)}, the effects {self.effects.shape}"
            )
        n_layers, n_heads, _, n_top = shape
        rows = self.top_tokens
        if len(rows) != n_layers or any(len(row) != n_heads for row in rows):
            raise DesteinError(f"top_tokens must be [{n_layers}][{n_heads}] lists")
        for layer, row in enumerate(rows):
            for head, sides in enumerate(row):
                if len(sides) != 2 or any(len(side) != n_top for side in sides):
                    raise DesteinError(f"top_tokens of L{layer}H{head} must be 2 lists of {n_top} strings")

    def save(self, path: Path) -> None:
        self.effects.save(path)
        tensors = {
            "top_ids": self.top_ids,
            "top_logits": self.top_logits,
            "direction_effect": self.direction_effect,
        }
        save_result(
            path.with_name(path.name + "_tokens"), "dla_tokens", tensors, {"top_tokens": self.top_tokens}
        )

    @classmethod
    def load(cls, path: Path) -> DirectLogits:
        meta, tensors = load_result(path.with_name(path.name + "_tokens"), "dla_tokens")
        return cls(HeadEffects.load(path), top_tokens=meta["top_tokens"], **tensors)


@torch.no_grad()
def direct_logit_attribution(
    model: TransformerBridge, vectors: DetoxVectors, held: HeldOut, *, k: int = 8
) -> DirectLogits:
    """The module docstring's two readings; a few forwards, no per-head runs."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    unembed = model.W_U.float()  # [d_model, vocab]
    toxic = word_ids(model.tokenizer, "toxic")
    neutral = word_ids(model.tokenizer, "neutral")
    contrast = unembed[:, toxic].mean(-1) - unembed[:, neutral].mean(-1)  # [d_model]
    per_pair = torch.zeros(n_layers, n_heads, len(held))
    moved = torch.zeros(n_layers, n_heads, model.cfg.d_model)  # the detox move's direct write, summed
    count = 0
    for batch in held.batches:
        acts = {side: _batch_acts(model, batch.side(side), k) for side in SIDES}
        _, post_in, final_in, valid = acts["toxic"]
        diff = _window_mean(acts["toxic"][0], valid) - _window_mean(acts["nontoxic"][0], acts["nontoxic"][3])
        for layer in range(n_layers):
            # head outputs through W_O: [b, H, d_model]
            written = einops.einsum(diff[:, layer], model.W_O[layer].float(), "b h d, h d m -> b h m")
            pre = None if post_in is None else post_in[:, :, layer]
            direct = _direct(model, layer, written, pre, final_in, valid)
            per_pair[layer, :, batch.index] = einops.einsum(direct, contrast, "b h m, m -> h b")
            move = einops.einsum(
                -vectors.directions[layer].float(), model.W_O[layer].float(), "h d, h d m -> h m"
            )
            move = einops.repeat(move, "h m -> b h m", b=len(batch.index))
            moved[layer] += _direct(model, layer, move, pre, final_in, valid).sum(0)
        count += len(batch.index)
    moved /= count
    logits = einops.einsum(moved, unembed, "l h m, m v -> l h v")
    top_up = logits.topk(N_TOP, dim=-1)
    top_down = (-logits).topk(N_TOP, dim=-1)
    top_ids = torch.stack([top_up.indices, top_down.indices], dim=2)
    top_logits = torch.stack([top_up.values, -top_down.values], dim=2)
    decode = model.tokenizer.convert_ids_to_tokens
    top_tokens = [[[decode(ids.tolist()) for ids in head] for head in layer] for layer in top_ids]
    meaning = "toxic - neutral mean logit written directly by the head's toxic - non-toxic output difference"
    return DirectLogits(
        effects=HeadEffects("dla", per_pair, "logit", meaning),
        top_ids=top_ids,
        top_logits=top_logits,
        top_tokens=top_tokens,
        direction_effect=-einops.einsum(moved, contrast, "l h m, m -> l h"),
    )


def _batch_acts(
    model: TransformerBridge, side: Side, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(hook_z [b, k, L, H, d], post-attention-norm inputs [b, k, L, m] or None, final-norm inputs
    [b, k, m], valid [b, k]) at each text's last k positions (slot j = position length - 1 - j)."""
    layers = range(model.cfg.n_layers)
    heads = [hook_name("heads", layer) for layer in layers]
    post = [f"blocks.{layer}.attn.hook_out" for layer in layers] if _post_norms(model) else []
    acts = end_activations(model, side, [*heads, *post, "ln_final.hook_in"], k)
    z = torch.stack([acts[n] for n in heads], dim=2)
    pre = torch.stack([acts[n] for n in post], dim=2) if post else None
    return z, pre, acts["ln_final.hook_in"], end_positions(side.lengths, k) >= 0


def _window_mean(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.float() / valid.sum(-1, keepdim=True)
    return einops.einsum(z, w, "b k l h d, b k -> b l h d")


def _post_norms(model: TransformerBridge) -> list | None:
    """The norm between each attention output and the residual stream (Gemma), or None."""
    if not hasattr(model.blocks[0], "ln1_post"):
        return None
    return [block.ln1_post.original_component for block in model.blocks]


def _direct(
    model: TransformerBridge,
    layer: int,
    written: torch.Tensor,
    post_in: torch.Tensor | None,
    final_in: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """[b, H, m] attention-output writes -> their direct effect on the final normed stream, [b, H, m],
    linearised at each of the last k positions and averaged over the valid ones."""
    tangent = einops.repeat(written, "b h m -> b k h m", k=valid.shape[1])
    if post_in is not None:
        point = einops.repeat(post_in, "b k m -> b k h m", h=written.shape[1])
        tangent = _jvp(_post_norms(model)[layer], point, tangent)
    point = einops.repeat(final_in, "b k m -> b k h m", h=written.shape[1])
    out = _jvp(model.ln_final.original_component, point, tangent)
    w = valid.float() / valid.sum(-1, keepdim=True)
    return einops.einsum(out, w, "b k h m, b k -> b h m")


def _jvp(norm: torch.nn.Module, point: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The norm's Jacobian at `point` applied to `tangent`, in the norm's own dtype, as float32."""
    dtype = next(norm.parameters()).dtype
    return jvp(norm, (point.to(dtype).contiguous(),), (tangent.to(dtype).contiguous(),))[1].float()
