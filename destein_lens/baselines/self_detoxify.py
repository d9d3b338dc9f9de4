"""Self-Detoxify (Toxification Reversal): reverse, per prompt, the shift a toxic prefix causes.

Leong et al. 2023, "Self-Detoxifying Language Models via Toxification Reversal" (EMNLP 2023,
arXiv 2310.09573; code cooperleong00/ToxificationReversal, `innerdetox_hook.py`).

Per prompt x, with the negative / positive prefixes of the steering pairs (the vectors' prefixes,
identical to the paper's): the toxification direction of every head is
d_h = z_h(P_neg + x) - z_h(P_pos + x) at the last position (z = attention head output before the
output projection, `hook_z`). On the plain prompt, at the last position of every forward (the
last prompt token, then each generated token, as the released code edits), each steered head is
moved and the norm of all heads together restored (`renorm`):

    z_h <- z_h - alpha * (1 + |d_h|)^0.4 * (1 + relu(cos(z_h, n_h)))^0.6 * d_h

with n_h the head's output at the last token of the negative prefix alone (`neg_end`), and the
released GPT2-large exponents `norm_exp` = 0.4, `neg_sim_exp` = 0.6; alpha = 1 is the released
code, the strength knob scales it. One difference: the released code recomputes d_h at every
decoding step from prefixed runs that follow the generated tokens (two extra forwards per step);
here d_h is taken once per prompt (two extra forwards per prompt), as `baselines.md` describes,
so generation keeps the model's own decoding loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from ..activations import hook_name
from ..errors import DesteinError
from ..forms import Form, HookFn, Hooks, register, selected_positions

NORM_EXP = 0.4
NEG_SIM_EXP = 0.6
_EPS = 1e-12


@torch.no_grad()
def last_head_outputs(model: TransformerBridge, texts: Sequence[str]) -> torch.Tensor:
    """hook_z at each text's last token, every layer: [n_texts, n_layers, n_heads, d_head]."""
    names = [hook_name("heads", layer) for layer in range(model.cfg.n_layers)]
    enc = model.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    device = model.cfg.device
    _, cache = model.run_with_cache(
        enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), names_filter=names
    )
    return torch.stack([cache[name][:, -1] for name in names], dim=1)


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


def _build(
    model: TransformerBridge, vectors, config, mask: torch.Tensor, prompts: Sequence[str] | None
) -> Hooks:
    if prompts is None:
        raise DesteinError("self-detoxify needs the batch's prompts: steer(..., prompts=texts)")
    negative, positive = vectors.prefixes
    unique = list(dict.fromkeys(prompts))
    outputs = last_head_outputs(model, [negative + p for p in unique] + [positive + p for p in unique])
    deltas = outputs[: len(unique)] - outputs[len(unique) :]  # [n_unique, L, H, d]
    rows = torch.tensor([unique.index(p) for p in prompts])
    per_row = deltas[rows].to(model.cfg.dtype)  # [batch, L, H, d]
    neg_end = last_head_outputs(model, [negative.rstrip()])[0].to(model.cfg.dtype)
    return [
        (
            hook_name("heads", layer),
            _hook(per_row[:, layer], neg_end[layer], mask[layer].to(per_row.device), config),
        )
        for layer in range(model.cfg.n_layers)
        if mask[layer].any()
    ]


def _hook(delta: torch.Tensor, neg_end: torch.Tensor, heads: torch.Tensor, config) -> HookFn:
    def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if not selected_positions(z.shape[1], config.positions, z.device)[-1]:
            return z
        z = z.clone()
        z[:, -1] = reverse(z[:, -1], delta, neg_end, heads, config.alpha)
        return z

    return hook


register(
    Form(
        "self-detoxify",
        "Toxification Reversal: each head's last-position output moved against its per-prompt "
        "toxic-minus-polite prefix shift, adaptively scaled, norm kept",
        _build,
        default_strength=0.1,
        max_strength=5.0,
        grid=(0.1, 0.25, 0.5),
    )
)
