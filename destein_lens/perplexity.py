"""Conditional perplexity of continuations given their prompts, under a reference model.

Only the continuation positions are unembedded (`logits_to_keep`): with a 262k-token vocabulary,
logits for every position of a batch cost gigabytes and most of the time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from .errors import DesteinError


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
    tokenizer = model.tokenizer
    device = model.cfg.device
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        batch_p, batch_c = prompts[i : i + batch_size], continuations[i : i + batch_size]
        prompt_lens = torch.tensor([len(ids) for ids in tokenizer(list(batch_p)).input_ids])
        enc = tokenizer(
            [p + c for p, c in zip(batch_p, batch_c)], return_tensors="pt", padding=True, padding_side="left"
        )
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        cont_lens = (enc.attention_mask.sum(-1) - prompt_lens).clamp_min(0)
        keep = int(cont_lens.max()) + 1
        logits = model(ids, attention_mask=mask, logits_to_keep=keep)[:, -keep:-1].float()
        targets = ids[:, -keep + 1 :] if keep > 1 else ids[:, :0]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()
        # Left padding right-aligns every row: its continuation is its last cont_len targets.
        offsets = torch.arange(keep - 1).flip(0)  # distance of each target from the end
        in_cont = offsets[None, :] < cont_lens[:, None]
        counts = in_cont.sum(-1)
        mean_nll = (nll * in_cont).sum(-1) / counts.clamp_min(1)
        ppl = torch.where(counts > 0, mean_nll.exp(), torch.full_like(mean_nll, float("nan")))
        out.extend(ppl.tolist())
    return out


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
