"""DeStein's head-wise forms, and the head-hook machinery other head-wise methods share.

Each form is one entry of the method registry (`registry.FORMS`, `registry.register`): it turns
(model, vectors, config) into the hooks that move the head outputs; `steering.steer` installs
them for the duration of a block.

The three DeStein forms are head-wise (x_h is head h's output at one position, v_h its direction,
w_h = 1 + probe accuracy, alpha the strength):
- "destein" (default), the paper's head-wise fusion with the released code's norm-preserving
  update: x_h' = ||x_h|| * normalize(x_h / ||x_h|| - alpha * w_h * normalize(v_h));
- "released_code", what the authors' code executes: per layer, the whole vector x (all slices)
  moves along u = normalize(concat_h(w_h * v_h)): x' = ||x|| * normalize(x / ||x|| - alpha * u).
  With site "attn_out_slices" this is the faithful replication;
- "additive", the paper's stated h + alpha * z with z = non-toxic - toxic: x_h' = x_h - alpha * w_h * v_h.
Each is an offset built once per layer and an operator `(activation, offset) -> moved activation`.

"destein-gated" is "destein" with the strength set per position by DeStein's own probes: at
position t, head h moves with alpha * g_{t,h}, g = sigmoid((probe logit of x_h - GATE_THRESHOLD) /
GATE_TEMPERATURE), the logit from head h's ranking probe (`DetoxVectors.probe_weight/bias`).
The defaults, threshold 0 and temperature 1, make g the probe's own probability that the head's
output is toxic: text the probes read as benign is barely moved. With g = 1 it is "destein", bit
for bit. The probes were fitted on the mean of a text's last k tokens, so per-token logits are
off their training distribution; the gate's defaults are a principled start, not a calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import einops
import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from .activations import as_heads, hook_name
from .errors import DesteinError
from .positions import prompt_mask
from .registry import Form, HookFn, Steering, register

if TYPE_CHECKING:
    from .steering import SteeringConfig
    from .vectors import DetoxVectors

GATE_THRESHOLD = 0.0
GATE_TEMPERATURE = 1.0
_EPS = 1e-12  # a zero output (rare; e.g. a fully masked position) stays put instead of turning NaN


# --- head-wise forms: an offset per layer, an operator per hook call --------------------------

# (directions [n_heads, w], weights [n_heads], steered mask [n_heads], alpha) -> offset [n_heads, w]
Offset = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# (activation [batch, pos, n_heads, w], offset [n_heads, w]) -> moved activation, same shape
Move = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def head_form(
    name: str,
    summary: str,
    offset: Offset,
    move: Move,
    *,
    whole_layer: bool = False,
    gated: bool = False,
    **entry: Any,
) -> Form:
    """A form acting on the per-head outputs of the vectors' site, at the configured positions.

    `whole_layer`: the move touches every head of a steered layer (the released code's update),
    not only the steered heads. `gated`: the offset is scaled per position and head by the probe
    gate (see the module docstring).
    """

    def build(
        model: TransformerBridge,
        vectors: DetoxVectors,
        config: SteeringConfig,
        mask: torch.Tensor,
        prompts: Sequence[str] | None,
    ) -> Steering:
        dtype, device = model.cfg.dtype, model.cfg.device
        if gated and vectors.probe_weight is None:
            raise DesteinError(
                f"{name} needs the probes, which these vectors (an older file) lack: rebuild them"
            )
        hooks = []
        for layer in range(vectors.shape[0]):
            if not mask[layer].any():
                continue
            layer_offset = offset(
                vectors.directions[layer], vectors.head_weights[layer], mask[layer], config.alpha
            )
            moved_heads = torch.ones_like(mask[layer]) if whole_layer else mask[layer]
            layer_move = move
            if gated:
                probe = (vectors.probe_weight[layer], vectors.probe_bias[layer])
                layer_move = _gated(move, *(t.to(device, dtype) for t in probe))
            hook = head_hook(
                layer_move,
                layer_offset.to(device, dtype),
                moved_heads.to(device),
                vectors.site,
                config.positions,
            )
            hooks.append((hook_name(vectors.site, layer), hook))
        return Steering(hooks)

    return Form(name, summary, build, **entry)


def head_hook(move: Move, offset: torch.Tensor, heads: torch.Tensor, site: str, positions: str) -> HookFn:
    """Apply `move` to the selected heads at the selected positions; leave the rest bit for bit."""
    n_heads = heads.shape[0]

    def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = as_heads(act, site, n_heads)  # [batch, pos, n_heads, width]
        keep = heads.view(1, 1, -1, 1) & selected_positions(x.shape[1], positions, x.device).view(1, -1, 1, 1)
        out = torch.where(keep, move(x, offset), x)
        return out if site == "heads" else einops.rearrange(out, "b p h w -> b p (h w)")

    return hook


def selected_positions(seq_len: int, positions: str, device: torch.device) -> torch.Tensor:
    """Bool [seq_len]: which positions of the forward in flight `positions` selects."""
    if positions == "all":
        return torch.ones(seq_len, dtype=torch.bool, device=device)
    in_prompt = prompt_mask(seq_len, device)
    return in_prompt if positions == "prompt" else ~in_prompt


def _gated(move: Move, weight: torch.Tensor, bias: torch.Tensor) -> Move:
    """`move` with the offset scaled by each head's probe gate at each position."""

    def gated_move(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        logit = einops.einsum(x, weight, "b p h w, h w -> b p h") + bias
        gate = torch.sigmoid((logit - GATE_THRESHOLD) / GATE_TEMPERATURE)
        return move(x, gate.unsqueeze(-1) * offset)

    return gated_move


def _fuse(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """||x|| * normalize(x / ||x|| - offset) along the last axis: the released code's fusion."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return norm * F.normalize(x / norm - offset, dim=-1)


def _scaled(weights: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * w_h on the steered heads, 0 elsewhere: [n_heads, 1]."""
    return (alpha * weights * mask).unsqueeze(-1)


def _destein_offset(v: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    return _scaled(w, mask, alpha) * F.normalize(v, dim=-1)


def _fuse_whole_layer(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    flat = einops.rearrange(x, "b p h w -> b p (h w)")
    moved = _fuse(flat, einops.rearrange(offset, "h w -> (h w)"))
    return einops.rearrange(moved, "b p (h w) -> b p h w", h=x.shape[2])


def _released_code_offset(v: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    weighted = einops.rearrange((w * mask).unsqueeze(-1) * v, "h w -> (h w)")
    return alpha * einops.rearrange(F.normalize(weighted, dim=0), "(h w) -> h w", h=v.shape[0])


register(
    head_form(
        "destein",
        "head-wise fusion along each head's normalised direction, norm kept (the paper)",
        _destein_offset,
        _fuse,
        default_strength=0.05,
        grid=(0.05, 0.075, 0.1),
    )
)
register(
    head_form(
        "destein-gated",
        "destein with each head's strength at each position scaled by its probe's toxic probability",
        _destein_offset,
        _fuse,
        gated=True,
        default_strength=0.1,
        grid=(0.1, 0.2, 0.3),
    )
)
register(
    head_form(
        "released_code",
        "the whole layer vector moved along concat(w_h v_h), norm kept (the authors' code)",
        _released_code_offset,
        _fuse_whole_layer,
        whole_layer=True,
        default_strength=0.075,
        grid=(0.05, 0.075, 0.1),
    )
)
register(
    head_form(
        "additive",
        "x_h - alpha w_h v_h (the paper's stated update)",
        lambda v, w, mask, alpha: _scaled(w, mask, alpha) * v,
        lambda x, offset: x - offset,
        # barely moves the text at DeStein's strengths; left out of the calibration
        compared=False,
    )
)
