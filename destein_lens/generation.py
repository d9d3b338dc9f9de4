"""Batched sampling through the hooked model, with the KV cache, so steering hooks fire every step.

The decoding loop is ours rather than `TransformerBridge.generate` so that (a) every step declares
its absolute token positions (`positions.token_window`), which position-selective steering needs
under the KV cache, (b) sampling draws from an explicit `torch.Generator`, so a seed reproduces a
prompt's samples whatever else is in the batch, and (c) the prefill computes logits for the last
position only, which matters with a 262k-token vocabulary. Each step is one bridge forward
(`return_type="logits_and_cache"`), so every TransformerLens hook fires on every step.

The KV cache needs transformers < 5.24: from 5.24 Hugging Face hands the cache to attention as
`cache=` while TransformerLens 4.3's AttentionBridge reads `past_key_values`, the cache is never
filled and cached decoding degenerates into repetition. pyproject pins transformers below 5.24, and
tests/test_generation.py checks the first cached decode step against a full forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from .errors import DesteinError
from .positions import token_window
from .registry import active_processors

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
_CANDIDATE_MIN = 1e-5  # nucleus candidates: tokens this probable (a few thousand at most)


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. `do_sample` has no default: greedy versus sampling is always a stated choice."""

    do_sample: bool
    max_new_tokens: int = 20
    top_p: float | None = None
    top_k: int | None = None
    temperature: float = 1.0
    n: int = 1
    seed: int = 0
    use_cache: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1 or self.batch_size < 1:
            raise DesteinError("max_new_tokens, samples (n) and batch_size must be at least 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DesteinError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise DesteinError(f"top_k must be at least 1, got {self.top_k}")
        if not self.temperature > 0.0:
            raise DesteinError(f"temperature must be positive, got {self.temperature}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise DesteinError(f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed}")


def protocol_sampling(n: int = 25, seed: int = 0, max_new_tokens: int = 20) -> SamplingConfig:
    """The DExperts/DeStein protocol: nucleus p = 0.9, no top-k, temperature 1, 20 new tokens."""
    return SamplingConfig(do_sample=True, max_new_tokens=max_new_tokens, top_p=0.9, n=n, seed=seed)


def generate(
    model: TransformerBridge,
    prompts: Sequence[str],
    config: SamplingConfig,
    *,
    progress: bool = True,
) -> list[list[str]]:
    """`config.n` continuations (text after the prompt only) for each prompt, in prompt order."""
    check_prompt_texts(prompts)
    texts = [p for p in prompts for _ in range(config.n)]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    out: list[str] = []
    batches = range(0, len(texts), config.batch_size)
    for i in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
        new_ids = generate_ids(model, texts[i : i + config.batch_size], config, generator)
        out.extend(decode_continuations(model, new_ids))
    return [out[j * config.n : (j + 1) * config.n] for j in range(len(prompts))]


def generate_ids(
    model: TransformerBridge,
    texts: Sequence[str],
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """New token ids [batch, max_new_tokens] for left-padded `texts`; pad after a row's EOS.

    `generator` may be one generator per row: then each row's samples depend on its own seed
    only, not on what else shares the batch (the evaluation harness seeds per prompt and sample,
    so runs resume and methods compare on identical random draws).
    """
    return _decode(model, texts, config, generator, logprobs=False)[0]


def generate_scored(
    model: TransformerBridge,
    texts: Sequence[str],
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate_ids`, plus each new token's log-probability under the model's own distribution
    (before temperature, top-k or top-p; 0 after EOS): the unsteered model's perplexity of what it
    wrote, without a second forward over the continuations (`perplexity.perplexity_from_steps`)."""
    ids, logprobs = _decode(model, texts, config, generator, logprobs=True)
    assert logprobs is not None
    return ids, logprobs


@torch.no_grad()
def _decode(
    model: TransformerBridge,
    texts: Sequence[str],
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    *,
    logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_prompt_texts(texts)
    tokenizer = model.tokenizer
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    _check_fits(model, enc.attention_mask.sum(-1).tolist(), config.max_new_tokens)
    device = model.cfg.device
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    batch, prompt_len = ids.shape
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
    elif not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise DesteinError(f"{len(generator)} generators for {batch} rows")
    cache = DynamicCache() if config.use_cache else None
    processors = active_processors()  # decoding-time parts of the steering in force (`steer`)
    for processor in processors:
        processor.start(ids, mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    new_logprobs: list[torch.Tensor] = []
    step_ids, start = ids, 0
    for _ in range(config.max_new_tokens):
        with token_window(start, prompt_len):
            if cache is not None:
                logits, cache = model(
                    step_ids,
                    attention_mask=mask,
                    past_key_values=cache,
                    return_type="logits_and_cache",
                    logits_to_keep=1,
                )
            else:
                logits = model(step_ids, attention_mask=mask, return_type="logits")
        next_logits = logits[:, -1, :].float()
        for processor in processors:
            next_logits = processor.logits(next_logits)
        if config.do_sample:
            token = _sample(next_logits, config, generator).to(device)
        else:
            token = next_logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if logprobs:
            picked = next_logits.gather(-1, token[:, None]).squeeze(-1) - next_logits.logsumexp(-1)
            new_logprobs.append(picked.masked_fill(finished, 0.0))
        finished |= token == eos
        for processor in processors:
            processor.advance(token[:, None])
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(finished.all()):
            break
        if cache is not None:
            step_ids, start = token[:, None], ids.shape[1] - 1
        else:
            step_ids = ids
    new = torch.stack(new_tokens, dim=1)
    fill = torch.full((batch, config.max_new_tokens - new.shape[1]), pad, dtype=new.dtype, device=device)
    ids = torch.cat([new, fill], dim=1)
    if not logprobs:
        return ids, None
    scored = torch.stack(new_logprobs, dim=1).cpu()
    return ids, torch.cat([scored, torch.zeros(batch, fill.shape[1])], dim=1)


def decode_continuations(model: TransformerBridge, new_ids: torch.Tensor) -> list[str]:
    """Text of each row of new token ids, cut at its first EOS."""
    eos = model.tokenizer.eos_token_id
    texts = []
    for row in new_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _sample(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row: temperature, then top-k, then nucleus (top-p), as HF's warpers do.

    The nucleus is sorted out of the candidates holding at least `_CANDIDATE_MIN` probability, not
    out of the whole vocabulary: with 262k tokens a full sort per step costs as much as the model's
    forward. Those candidates are exactly the top tokens, so wherever they hold the nucleus mass the
    result is the full sort's; a row where they do not (a very flat distribution) sorts it all.
    """
    if config.temperature != 1.0:
        logits = logits / config.temperature
    probs = logits.float().softmax(-1).cpu()
    idx = None
    if config.top_k is not None:
        probs, idx = probs.topk(min(config.top_k, probs.shape[-1]), dim=-1)
        probs = probs / probs.sum(-1, keepdim=True)  # HF renormalises after top-k
    generators = [generator] * len(probs) if isinstance(generator, torch.Generator) else generator
    nucleus = config.top_p is not None and config.top_p < 1.0
    if nucleus:
        rows, cols = (probs >= _CANDIDATE_MIN).nonzero(as_tuple=True)
        candidates = cols.split(torch.bincount(rows, minlength=len(probs)).tolist())
    picks = []
    for n, (row, row_generator) in enumerate(zip(probs, generators)):
        order = None
        if nucleus:
            order = candidates[n]
            if row[order].double().sum() < config.top_p:
                order = torch.arange(len(row))
            row, sorted_at = row[order].sort(descending=True)
            order = order[sorted_at]
            mass_above = row.double().cumsum(0) - row.double()
            row = row.masked_fill(mass_above >= config.top_p, 0.0)  # keep while mass above < p
        pick = torch.multinomial(row, 1, generator=row_generator)
        picks.append(pick if order is None else order[pick])
    pick = torch.cat(picks)
    return pick if idx is None else idx.gather(-1, pick[:, None]).squeeze(-1)


def check_prompt_lengths(model: TransformerBridge, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse, before any generation, a prompt that with its continuation exceeds the model's context."""
    check_prompt_texts(prompts)
    _check_fits(model, [len(ids) for ids in model.tokenizer(list(prompts)).input_ids], max_new_tokens)


def _check_fits(model: TransformerBridge, lengths: Sequence[int], max_new_tokens: int) -> None:
    n_ctx = model.cfg.n_ctx
    for i, n in enumerate(lengths):
        if n + max_new_tokens > n_ctx:
            raise DesteinError(
                f"prompt {i} is {n} tokens long; with {max_new_tokens} new tokens it exceeds the "
                f"model's context of {n_ctx} tokens"
            )


def check_prompt_texts(prompts: Sequence[str]) -> None:
    """A list of non-blank strings: an empty prompt would be continued from BOS alone."""
    if isinstance(prompts, str):
        raise DesteinError("prompts must be a list of strings, not a single string")
    if len(prompts) == 0:
        raise DesteinError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DesteinError(f"prompt {i} is empty")
