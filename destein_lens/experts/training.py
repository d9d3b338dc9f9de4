"""Train one LoRA adapter of the model: an expert on one side of the pairs, or GeDi's class-conditional model.

The pairs are split once, by a seeded shuffle of pair indices: the first `held_out` pairs are kept
out of every adapter (their texts give the held-out loss, on texts none of the three saw), the next
`max_texts` are the training pool.

- expert / antiexpert (DExperts, DAPT): causal-LM fine-tuning on one side, its texts one per line
  and packed into blocks of `block_size` tokens, as DExperts' `finetune_gpt2.py` reads its
  one-text-per-line files (behind the tokenizer's own leading tokens, e.g. Gemma's BOS).
- gedi: every text behind each control code (`GEDI_CODES`), GeDi's hybrid loss (Krause et al.
  2021; salesforce/GeDi `train_GeDi.py`): lambda x the generative loss under the text's own code
  + (1 - lambda) x the cross-entropy of the class posterior, whose logits are the learned
  `logit_scale` x each code's mean token log-likelihood of the text.

AdamW with a linear decay to 0 (the reference scripts' schedule), LoRA on peft's default targets
for the architecture (query and value projections), no dropout, so a seed repeats a run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm.auto import tqdm

from ..errors import DesteinError, reason
from ..pairs import SteeringPairs
from .settings import GEDI_CODES, KINDS, TrainSettings


@dataclass(frozen=True)
class Split:
    """The held-out and training pairs' texts, per side."""

    train: dict[str, list[str]]
    held_out: dict[str, list[str]]


def split_pairs(pairs: SteeringPairs, settings: TrainSettings) -> Split:
    """The seeded split of pair indices (module docstring); refused when no training pair is left."""
    if len(pairs) <= settings.held_out:
        raise DesteinError(
            f"{len(pairs)} pairs in {pairs.source} leave none to train on "
            f"after --held-out {settings.held_out}"
        )
    order = random.Random(settings.seed).sample(range(len(pairs)), len(pairs))
    held, train = order[: settings.held_out], order[settings.held_out :][: settings.max_texts]
    sides = {"toxic": pairs.toxic, "nontoxic": pairs.nontoxic}
    return Split(
        train={side: [texts[i] for i in train] for side, texts in sides.items()},
        held_out={side: [texts[i] for i in held] for side, texts in sides.items()},
    )


def packed_blocks(tokenizer: Any, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """The texts one per line, tokenised as one stream and cut into blocks [n, block_size], each behind
    the tokenizer's leading special tokens; the last partial block is dropped."""
    lead = tokenizer("").input_ids
    stream = [i for t in texts for i in tokenizer(t + "\n", add_special_tokens=False).input_ids]
    width = block_size - len(lead)
    n = len(stream) // width if width > 0 else 0
    if n == 0:
        raise DesteinError(f"{len(texts)} texts make no block of {block_size} tokens; use more texts")
    blocks = rearrange(torch.tensor(stream[: n * width]), "(n w) -> n w", w=width)
    return torch.cat([repeat(torch.tensor(lead, dtype=blocks.dtype), "l -> n l", n=n), blocks], dim=1)


def coded_batch(
    tokenizer: Any, texts: Sequence[str], code: str, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, scored) of `code + text` for each text, right-padded; `scored` marks the text's
    tokens (the ones after the tokenizer's leading tokens and the code)."""
    enc = tokenizer(
        [code + t for t in texts],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        truncation=True,
        max_length=max_tokens,
    )
    n_code = len(tokenizer(code).input_ids)
    scored = (enc.attention_mask.cumsum(-1) > n_code) & enc.attention_mask.bool()
    return enc.input_ids, enc.attention_mask, scored


def mean_logprob(model: Any, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Each row's mean log-probability of its `scored` tokens [batch] (GeDi's class logit)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), ids[:, 1:].flatten(), reduction="none")
    kept = scored[:, 1:].float()
    return -(rearrange(nll, "(b t) -> b t", b=ids.shape[0]) * kept).sum(-1) / kept.sum(-1)


def code_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """[batch, 2]: each text's mean token log-likelihood behind each of `GEDI_CODES`."""
    return torch.stack(
        [mean_logprob(model, *coded_batch(tokenizer, texts, code, max_tokens)) for code in GEDI_CODES], -1
    )


@dataclass
class Objective:
    """One kind's training: a loss per step, and the held-out numbers for the adapter and the base."""

    loss: Callable[[], torch.Tensor]  # the next step's loss to minimise
    held_out: Callable[[], dict[str, float]]
    parameters: list[torch.nn.Parameter]
    state: Callable[[], dict[str, float]]  # extra trained values stored in the metadata


def _cycle(n: int, seed: int) -> Iterator[int]:
    """Indices 0..n-1 in a fresh seeded order each pass."""
    rng = random.Random(seed)
    while True:
        yield from rng.sample(range(n), n)


def _expert(model: Any, tokenizer: Any, split: Split, side: str, settings: TrainSettings) -> Objective:
    blocks = packed_blocks(tokenizer, split.train[side], settings.block_size)
    held = packed_blocks(tokenizer, split.held_out[side], settings.block_size)
    order = _cycle(len(blocks), settings.seed)

    def loss() -> torch.Tensor:
        batch = blocks[[next(order) for _ in range(settings.batch_size)]].to(model.device)
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        chunks = held.split(settings.batch_size)
        losses = [float(model(input_ids=c.to(model.device), labels=c.to(model.device)).loss) for c in chunks]
        return {"held_out_loss": sum(x * len(c) for x, c in zip(losses, chunks)) / len(held)}

    return Objective(loss, held_out, [], dict)


def _gedi(model: Any, tokenizer: Any, split: Split, settings: TrainSettings) -> Objective:
    scale = torch.nn.Parameter(torch.ones((), device=model.device))  # GeDi's learned logit_scale
    sides = ("nontoxic", "toxic")  # class 0 is GEDI_CODES[0], the desired (clean) one
    orders = {side: _cycle(len(split.train[side]), settings.seed + n) for n, side in enumerate(sides)}

    per_side = max(1, settings.batch_size // 2)

    def loss() -> torch.Tensor:
        texts = [split.train[s][next(orders[s])] for s in sides for _ in range(per_side)]
        labels = repeat(torch.arange(2), "c -> (c n)", n=per_side).to(model.device)
        per_code = code_logprobs(model, tokenizer, texts, settings.block_size)
        generative = -per_code.gather(-1, labels[:, None]).mean()
        discriminative = F.cross_entropy(scale * per_code, labels)
        return settings.gen_weight * generative + (1 - settings.gen_weight) * discriminative

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        # batches of similar length: little padding
        labelled = sorted(
            ((t, c) for c, s in enumerate(sides) for t in split.held_out[s]), key=lambda tc: len(tc[0])
        )
        texts = [t for t, _ in labelled]
        labels = torch.tensor([c for _, c in labelled], device=model.device)
        step = settings.batch_size
        per_code = torch.cat(
            [
                code_logprobs(model, tokenizer, texts[i : i + step], settings.block_size)
                for i in range(0, len(texts), step)
            ]
        )
        return {
            "held_out_loss": float(-per_code.gather(-1, labels[:, None]).mean()),
            "held_out_accuracy": float((per_code.argmax(-1) == labels).float().mean()),
        }

    return Objective(loss, held_out, [scale], lambda: {"logit_scale": scale.item()})


def train_adapter(
    model: Any,
    tokenizer: Any,
    pairs: SteeringPairs,
    kind: str,
    settings: TrainSettings,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train adapter `kind` on the plain HF `model` (wrapped in place by peft); returns the peft model
    and the report stored with the adapter (loss curve, held-out numbers, times)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    split = split_pairs(pairs, settings)
    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    try:
        peft_model = get_peft_model(model, config, adapter_name=kind)
    except ValueError as e:  # no default LoRA targets for this architecture
        raise DesteinError(f"cannot put LoRA adapters on this model ({reason(e)})") from e
    side = KINDS[kind]
    objective = (
        _gedi(peft_model, tokenizer, split, settings)
        if side == "both"
        else _expert(peft_model, tokenizer, split, side, settings)
    )
    trained = [p for p in peft_model.parameters() if p.requires_grad] + objective.parameters
    optimiser = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimiser, 0, settings.steps)
    curve: list[float] = []
    start = time.monotonic()
    peft_model.train()
    bar = tqdm(range(settings.steps), desc=f"training {kind}", unit="step", disable=not progress)
    for _ in bar:
        loss = objective.loss()
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    train_seconds = time.monotonic() - start
    peft_model.eval()
    start = time.monotonic()
    adapted = objective.held_out()
    with peft_model.disable_adapter():
        base = objective.held_out()
    report = {
        "kind": kind,
        "side": side,
        "settings": settings.to_dict(),
        "texts": {"train": len(split.train["toxic"]), "held_out": len(split.held_out["toxic"])},
        "loss_curve": curve,
        **adapted,
        **{f"base_{key}": value for key, value in base.items()},
        **objective.state(),
        "train_seconds": train_seconds,
        "eval_seconds": time.monotonic() - start,
        "torch_threads": torch.get_num_threads(),
    }
    return peft_model, report
