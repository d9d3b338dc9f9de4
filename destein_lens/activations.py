"""Per-head activations of texts: cached with `run_with_cache`, reduced to the mean of the last k tokens.

Two sites, because the paper and the released code disagree about where DeStein reads and steers:
- "heads" (default): `blocks.{l}.attn.hook_z`, each attention head's output before the output
  projection, [n_heads, d_head]: the head-wise shape the paper describes;
- "attn_out_slices": what the authors' code actually reads: the attention output right after the
  output projection (`blocks.{l}.attn.hook_out`, the o_proj / c_proj output) cut into n_heads
  contiguous slices of d_model / n_heads. These slices are not attention heads. On GPT-2, LLaMA
  and OPT this hook equals `blocks.{l}.hook_attn_out` and the slice width equals d_head; on Gemma,
  `hook_attn_out` comes after the post-attention norm, so the o_proj output is the faithful site.

Texts are run in left-padded batches and reduced batch by batch, so memory stays flat in the
number of texts; batched results equal one-text-at-a-time results (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import einops
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .errors import DesteinError
from .pairs import SteeringPairs

Site = Literal["heads", "attn_out_slices"]
SITES: tuple[str, ...] = ("heads", "attn_out_slices")


def hook_name(site: Site, layer: int) -> str:
    """The hook point a site reads (and steering writes) at `layer`."""
    check_site(site)
    return f"blocks.{layer}.attn.hook_z" if site == "heads" else f"blocks.{layer}.attn.hook_out"


def check_site(site: str) -> None:
    if site not in SITES:
        raise DesteinError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")


def slice_width(model: TransformerBridge, site: Site) -> int:
    """Width of one "head" at `site`: d_head, or d_model / n_heads for attn_out slices."""
    cfg = model.cfg
    if site == "heads":
        return cfg.d_head
    if cfg.d_model % cfg.n_heads:
        raise DesteinError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
    return cfg.d_model // cfg.n_heads


def as_heads(act: torch.Tensor, site: Site, n_heads: int) -> torch.Tensor:
    """[batch, pos, n_heads, width] view of a hook's activation at `site`."""
    if site == "heads":
        return act
    return einops.rearrange(act, "b p (h w) -> b p h w", h=n_heads)


def text_activations(
    model: TransformerBridge,
    texts: Sequence[str],
    *,
    site: Site = "heads",
    k: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Mean over each text's last `k` real tokens: [n_texts, n_layers, n_heads, width], float32."""
    check_site(site)
    names = [hook_name(site, layer) for layer in range(model.cfg.n_layers)]
    acts = hook_activations(model, texts, names, k=k, batch_size=batch_size, progress=progress, desc=site)
    return einops.rearrange(acts, "n l (h w) -> n l h w", h=model.cfg.n_heads)


@torch.no_grad()
def hook_activations(
    model: TransformerBridge,
    texts: Sequence[str],
    names: Sequence[str],
    *,
    k: int | None = 8,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "hooks",
    stop_at_layer: int | None = None,
) -> torch.Tensor:
    """Each hook's activation pooled per text: [n_texts, len(names), width], float32.

    `k`: the mean of the text's last k real tokens (DeStein's pooling); None: the mean of all
    its real tokens (Linear-AcT's `pooling_op: mean`). Hooks must share one width.
    `stop_at_layer`: run the blocks before it only (the hooks must lie there).
    """
    if k is not None and k < 1:
        raise DesteinError(f"k must be at least 1, got {k}")
    if len(texts) == 0:
        raise DesteinError("no texts to run")
    tokenizer = model.tokenizer
    wanted = set(names)
    out = []
    starts = range(0, len(texts), batch_size)
    for i in tqdm(
        starts, desc=f"activations ({desc})", unit="batch", disable=not progress or len(starts) < 2
    ):
        batch = list(texts[i : i + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left")
        lengths = enc.attention_mask.sum(-1)
        short = (lengths < (k or 1)).nonzero().flatten().tolist()
        if short:
            j = short[0]
            raise DesteinError(
                f"text {i + j} has {int(lengths[j])} tokens, fewer than k={k}: {batch[j][:60]!r}"
            )
        device = model.cfg.device
        _, cache = model.run_with_cache(
            enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            names_filter=lambda name: name in wanted,
            stop_at_layer=stop_at_layer,
            logits_to_keep=1,  # the logits go unused: unembed no position but one (262k vocabulary)
        )
        flat = [einops.rearrange(cache[n], "b p ... -> b p (...)").float() for n in names]
        if k is None:  # mean over the real tokens, wherever the padding is
            weights = (enc.attention_mask / lengths[:, None]).to(device)
            pooled = [einops.einsum(x, weights, "b p w, b p -> b w") for x in flat]
        else:  # left padding puts every text's last k tokens in the last k positions
            pooled = [x[:, -k:].mean(1) for x in flat]
        out.append(torch.stack(pooled, dim=1).cpu())
        del cache
    return torch.cat(out)


def pair_activations(
    model: TransformerBridge,
    pairs: SteeringPairs,
    *,
    prefixes: tuple[str, str] | None,
    site: Site = "heads",
    k: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """[n_pairs, 2, n_layers, n_heads, width]; side 0 toxic, side 1 non-toxic.

    `prefixes` = (toxic, non-toxic) contrastive prefixes prepended to each side, as DeStein does
    for its directions; None runs the bare pair texts (the default for probes, see `probes`).
    """
    if prefixes is None:
        toxic, nontoxic = list(pairs.toxic), list(pairs.nontoxic)
    else:
        toxic, nontoxic = pairs.prefixed(*prefixes)
    acts = text_activations(model, toxic + nontoxic, site=site, k=k, batch_size=batch_size, progress=progress)
    return einops.rearrange(acts, "(side n) l h w -> n side l h w", side=2)
