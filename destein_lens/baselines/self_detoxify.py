"""Self-Detoxify (Toxification Reversal): reverse, at every step, the shift a toxic prefix causes.

Leong et al. 2023, "Self-Detoxifying Language Models via Toxification Reversal" (EMNLP 2023,
arXiv 2310.09573; code cooperleong00/ToxificationReversal, `innerdetox_hook.py`).

Per sequence x, with the negative / positive prefixes of the steering pairs (the vectors' prefixes,
identical to the paper's): the toxification direction of every head is
d_h = z_h(P_neg + x) - z_h(P_pos + x) at the last position (z = attention head output before the
output projection, `hook_z`). On the plain sequence, at the last position of every forward (the
last prompt token, then each generated token, as the released code edits), each steered head is
moved and the norm of all heads together restored (`renorm`):

    z_h <- z_h - alpha * (1 + |d_h|)^0.4 * (1 + relu(cos(z_h, n_h)))^0.6 * d_h

with n_h the head's output at the last token of the negative prefix alone (`neg_end`), and the
released GPT2-large exponents `norm_exp` = 0.4, `neg_sim_exp` = 0.6; alpha = 1 is the released
code, the strength knob scales it. As in the released code, d_h is recomputed at every decoding
step: the two prefixed sequences are decoded beside the plain one, each with its own KV cache, and
follow its generated tokens (`Reversal`, a decoding processor: two extra one-token forwards per
step, run unsteered). The prefixed prompt is the prefix followed by the plain row's text (its
tokens decoded), tokenised together as the released code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from ..activations import hook_name
from ..errors import DesteinError
from ..forms import selected_positions
from ..registry import Form, HookFn, Steering, paused, register
from .prefixed import PrefixedRows

NORM_EXP = 0.4
NEG_SIM_EXP = 0.6
_EPS = 1e-12


@torch.no_grad()
def last_head_outputs(
    model: TransformerBridge, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None = None
) -> torch.Tensor:
    """hook_z at the last position of a left-padded batch, every layer: [batch, L, n_heads, d_head].

    With `cache`, `ids` continue what the cache holds (`mask` covers both) and the cache grows.
    Runs unsteered (`registry.paused`), whatever steering is in force."""
    names = [hook_name("heads", layer) for layer in range(model.cfg.n_layers)]
    last: dict[str, torch.Tensor] = {}

    def keep(name: str) -> HookFn:
        def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            last[name] = z[:, -1]
            return z

        return hook

    with paused(), model.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
        if cache is None:
            model(ids, attention_mask=mask, return_type=None)
        else:
            model(ids, attention_mask=mask, past_key_values=cache, return_type="logits", logits_to_keep=1)
    return torch.stack([last[name] for name in names], dim=1)


def reverse(
    x: torch.Tensor, delta: torch.Tensor, neg_end: torch.Tensor, heads: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The update at one position (module docstring).

    x, delta: [batch, n_heads, d]; neg_end: [n_heads, d]; heads: bool [n_heads], the steered ones.
    """
    norm_scale = (1 + delta.norm(dim=-1, keepdim=True)) ** NORM_EXP
    sim = F.cosine_similarity(x, neg_end.expand_as(x), dim=-1, eps=_EPS).unsqueeze(-1)
    sim_scale = (1 + F.relu(sim)) ** NEG_SIM_EXP
    moved = torch.where(heads.view(1, -1, 1), x - alpha * norm_scale * sim_scale * delta, x)
    old = x.flatten(1).norm(dim=-1).view(-1, 1, 1)
    new = moved.flatten(1).norm(dim=-1).clamp_min(_EPS).view(-1, 1, 1)
    return moved * old / new


class Reversal:
    """The decoding processor: every row's negative- and positive-prefixed sequences, decoded beside
    it (`prefixed.PrefixedRows`), and their last-position head-output difference `delta`
    [batch, L, H, d] for the step in flight, which the hooks read."""

    def __init__(self, model: TransformerBridge, prefixes: tuple[str, str]) -> None:
        self._rows = PrefixedRows(model, prefixes, partial(last_head_outputs, model))
        self.delta: torch.Tensor | None = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        negative, positive = self._rows.start(input_ids, attention_mask)
        self.delta = negative - positive

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def advance(self, tokens: torch.Tensor) -> None:
        negative, positive = self._rows.advance(tokens)
        self.delta = negative - positive


def _build(
    model: TransformerBridge, vectors, config, mask: torch.Tensor, prompts: Sequence[str] | None
) -> Steering:
    negative, positive = vectors.prefixes
    reversal = Reversal(model, (negative, positive))
    enc = model.tokenizer([negative.rstrip()], return_tensors="pt")
    device = model.cfg.device
    neg_end = last_head_outputs(model, enc.input_ids.to(device), enc.attention_mask.to(device))[0]
    hooks = [
        (hook_name("heads", layer), _hook(reversal, layer, neg_end[layer], mask[layer].to(device), config))
        for layer in range(model.cfg.n_layers)
        if mask[layer].any()
    ]
    return Steering(hooks, [reversal])


def _hook(reversal: Reversal, layer: int, neg_end: torch.Tensor, heads: torch.Tensor, config) -> HookFn:
    def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if reversal.delta is None:
            raise DesteinError("self-detoxify steers decoding: call generate() inside steer(...)")
        if not selected_positions(z.shape[1], config.positions, z.device)[-1]:
            return z
        z = z.clone()
        delta = reversal.delta[:, layer].to(z.dtype)
        z[:, -1] = reverse(z[:, -1], delta, neg_end.to(z.dtype), heads, config.alpha)
        return z

    return hook


register(
    Form(
        "self-detoxify",
        "Toxification Reversal: each head's last-position output moved against the toxic-minus-polite "
        "prefix shift, recomputed at every decoding step, adaptively scaled, norm kept",
        _build,
        default_strength=0.1,
        max_strength=5.0,
        grid=(0.1, 0.25, 0.5),
    )
)
