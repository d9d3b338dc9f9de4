"""Conditional perplexity of continuations given their prompts, under a reference model.

A continuation's tokens are those that prompt + continuation tokenises to beyond the prompt's own
token count (a token merged across the join counts as the continuation's). The pass is cut to what
the answer needs: each distinct prefix (a prompt's samples share one) runs once and its KV cache
is shared by all of its continuations, so their pass covers the continuation tokens only; only
those positions are unembedded (262k vocabulary on the default model), and the cross-entropy runs
over the contiguous vocabulary axis a few rows at a time (a log-softmax over a transposed
[rows, vocab, tokens] view cost as much as the unembedding itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from .errors import DesteinError

_CE_ROWS = 8  # rows whose logits go to float32 at once: bounds the copy of [rows, tokens, vocab]


@torch.no_grad()
def conditional_perplexity(
    model: TransformerBridge,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[float]:
    """exp(mean NLL of the continuation's tokens given the prompt), one per pair; NaN if empty."""
    if len(prompts) != len(continuations):
        raise DesteinError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        out.extend(_batch_perplexity(model, prompts[i : i + batch_size], continuations[i : i + batch_size]))
    return out


def _batch_perplexity(
    model: TransformerBridge, prompts: Sequence[str], continuations: Sequence[str]
) -> list[float]:
    tokenizer = model.tokenizer
    joined = tokenizer([p + c for p, c in zip(prompts, continuations)]).input_ids
    alone = tokenizer(list(prompts)).input_ids
    heads = [tuple(ids[: len(a)]) for ids, a in zip(joined, alone)]
    tails = [ids[len(a) :] for ids, a in zip(joined, alone)]
    distinct = {head: n for n, head in enumerate(dict.fromkeys(heads))}
    which = torch.tensor([distinct[h] for h in heads], device=model.cfg.device)
    lengths = torch.tensor([len(t) for t in tails])
    width = int(lengths.max())
    if width == 0:
        return [float("nan")] * len(tails)
    pad = tokenizer.pad_token_id
    prefix_ids, prefix_mask = _padded(list(distinct), pad, left=True, device=model.cfg.device)
    logits, cache = model(
        prefix_ids,
        attention_mask=prefix_mask,
        past_key_values=DynamicCache(),
        return_type="logits_and_cache",
        logits_to_keep=1,
    )
    targets, _ = _padded(tails, pad, left=False, device=model.cfg.device)
    nll = _nll(logits[which], targets[:, :1])  # each continuation's first token, after its prefix
    if width > 1:
        cache.reorder_cache(which)  # every row its prefix's keys and values
        ids, mask = _padded(
            [t[:-1] for t in tails], pad, left=False, device=model.cfg.device, width=width - 1
        )
        logits = model(ids, attention_mask=torch.cat([prefix_mask[which], mask], 1), past_key_values=cache)
        nll = torch.cat([nll, _nll(logits, targets[:, 1:])], 1)
    counted = torch.arange(width)[None, :] < lengths[:, None]
    mean = nll.masked_fill(~counted, 0.0).sum(-1) / lengths.clamp_min(1)
    return torch.where(lengths > 0, mean.exp(), torch.full_like(mean, float("nan"))).tolist()


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per [row, position], in float32, on the CPU: a few rows at a
    time, each a fused cross-entropy over the contiguous vocabulary axis."""
    out = []
    for i in range(0, len(logits), _CE_ROWS):
        chunk = logits[i : i + _CE_ROWS]
        nll = F.cross_entropy(
            chunk.flatten(0, 1).float(), targets[i : i + _CE_ROWS].flatten(), reduction="none"
        )
        out.append(nll.view(chunk.shape[:2]).cpu())
    return torch.cat(out)


def _padded(
    rows: Sequence[Sequence[int]], pad: int, *, left: bool, device: str, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to `width` (default: the longest) on one side, with their attention mask."""
    width = max(map(len, rows)) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        at = slice(width - len(row), width) if left else slice(0, len(row))
        ids[n, at] = torch.tensor(row, dtype=torch.long)
        mask[n, at] = 1
    return ids.to(device), mask.to(device)


def perplexity_from_steps(
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    new_ids: torch.Tensor,
    logprobs: torch.Tensor,
) -> list[float | None]:
    """`conditional_perplexity` of each continuation from the generating model's own step
    log-probabilities (`generation.generate_scored`), where that is the same quantity: where
    prompt + continuation tokenises back into the prompt's tokens then exactly the generated ones.
    None for a row that tokenises otherwise (a sampled non-canonical split, a merge across the
    join): those need `conditional_perplexity`."""
    eos = tokenizer.eos_token_id
    joined = tokenizer([p + c for p, c in zip(prompts, continuations)]).input_ids
    alone = tokenizer(list(prompts)).input_ids
    out: list[float | None] = []
    for ids, lps, full, head in zip(new_ids.tolist(), logprobs, joined, alone):
        n = ids.index(eos) if eos in ids else len(ids)
        if full != head + ids[:n]:
            out.append(None)
        elif n == 0:
            out.append(float("nan"))
        else:
            out.append(float((-lps[:n].double().mean()).exp()))
    return out
