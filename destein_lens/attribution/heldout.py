"""Held-out pairs, tokenised once, and the two numbers every attribution study reads off a forward.

Each study asks how an intervention on the heads moves the model's preference between the two
sides of pairs it was not built from. Per text, one forward gives:
- the mean log-prob of the text's own tokens, teacher-forced (every token predicted from an earlier
  position; with Gemma's BOS that is every text token);
- the log-probability that the token after the text is a toxic word (`word_ids("toxic")`).
The pair's log-prob gap is the toxic side's mean log-prob minus the non-toxic side's.

Pairs are sorted by length and batched, each side right-padded in its own batch: padding costs
little, and real tokens keep their positions (absolute position embeddings too). Results are per
pair, in the pairs' own order, so intervals can resample pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import einops
import torch
from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..pairs import SteeringPairs
from ..registry import Hooks

SIDES = ("toxic", "nontoxic")


@dataclass(frozen=True, eq=False)
class Side:
    """One side of a batch of pairs: right-padded token ids."""

    ids: torch.Tensor  # [b, p]
    mask: torch.Tensor  # [b, p]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@dataclass(frozen=True, eq=False)
class Batch:
    index: torch.Tensor  # [b]: the pairs' positions in the held-out set
    toxic: Side
    nontoxic: Side

    def side(self, name: str) -> Side:
        return self.toxic if name == "toxic" else self.nontoxic


@dataclass(frozen=True, eq=False)
class HeldOut:
    """Held-out pairs ready to score: tokenised, length-sorted batches and the toxic token set."""

    pairs: SteeringPairs
    batches: tuple[Batch, ...]
    toxic_ids: torch.Tensor  # [n_words]: single-token toxic words

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-pair results of one forward of every held-out text under one intervention."""

    logprob: torch.Tensor  # [2, n_pairs]: mean token log-prob; side 0 toxic, 1 non-toxic
    toxic_logmass: torch.Tensor  # [2, n_pairs]: log p(next token is a toxic word) after the text

    @property
    def gap(self) -> torch.Tensor:
        """[n_pairs]: toxic minus non-toxic mean token log-prob, nats per token."""
        return self.logprob[0] - self.logprob[1]


def word_ids(tokenizer, kind: str) -> torch.Tensor:
    """Token ids of the packaged `kind` ("toxic" or "neutral") word list.

    A word counts in each spelling (with and without a leading space, lower case and capitalised)
    that the tokenizer encodes as one token; multi-token spellings are left out, since their first
    token (" f", " sh") is not the word.
    """
    text = resources.files("destein_lens.data").joinpath(f"{kind}_words.txt").read_text(encoding="utf-8")
    words = [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    ids = set()
    for word in words:
        for spelling in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            tokens = tokenizer(spelling, add_special_tokens=False).input_ids
            if len(tokens) == 1:
                ids.add(tokens[0])
    if not ids:
        raise DesteinError(f"no word of the {kind} list is a single token for this tokenizer")
    return torch.tensor(sorted(ids))


def held_out(model: TransformerBridge, pairs: SteeringPairs, *, batch_size: int = 32) -> HeldOut:
    """Tokenise `pairs` into length-sorted batches of `batch_size` pairs."""
    if len(pairs) == 0:
        raise DesteinError("no held-out pairs")
    if batch_size < 1:
        raise DesteinError(f"batch size must be at least 1, got {batch_size}")
    tokenizer = model.tokenizer
    length = [len(tokenizer(t + " " + n).input_ids) for t, n in zip(pairs.toxic, pairs.nontoxic)]
    order = sorted(range(len(pairs)), key=lambda i: (length[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        sides = []
        for texts in (pairs.toxic, pairs.nontoxic):
            enc = tokenizer(
                [texts[i] for i in index], return_tensors="pt", padding=True, padding_side="right"
            )
            short = (enc.attention_mask.sum(-1) < 2).nonzero().flatten().tolist()
            if short:
                raise DesteinError(
                    f"held-out text {texts[index[short[0]]]!r} is a single token, nothing to score"
                )
            sides.append(Side(enc.input_ids, enc.attention_mask))
        batches.append(Batch(torch.tensor(index), *sides))
    return HeldOut(pairs, tuple(batches), word_ids(tokenizer, "toxic"))


def end_positions(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """[b, k]: position length - 1 - j of each text's slot j (negative where the text is shorter)."""
    return lengths[:, None] - 1 - torch.arange(k)[None]


@torch.no_grad()
def end_activations(
    model: TransformerBridge, side: Side, names: Sequence[str], k: int
) -> dict[str, torch.Tensor]:
    """Each hook's activation at each text's last `k` positions, one cached forward: name ->
    [b, k, ...] float32 on the CPU, slot j at `end_positions` (position 0 where the text is shorter)."""
    wanted = set(names)
    device = model.cfg.device
    _, cache = model.run_with_cache(
        side.ids.to(device), attention_mask=side.mask.to(device), names_filter=lambda n: n in wanted
    )
    at = end_positions(side.lengths, k).clamp_min(0)
    rows = torch.arange(len(at))[:, None]
    return {name: cache[name].float().cpu()[rows, at] for name in names}


def score_side(
    model: TransformerBridge, side: Side, toxic_ids: torch.Tensor, hooks: Hooks = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of one side under `hooks`: (mean token log-prob [b], toxic log-mass [b]), on the
    model's device; differentiable (the gradient studies take its backward), so callers that only
    score run it under `torch.no_grad()`.

    Half the cost of a forward is the unembedding and the vocabulary-wide logsumexp. Both are done
    on the real tokens only, from the final norm's output (`ln_final.hook_out`), and the logsumexp
    runs over vocabulary chunks, so no [tokens, vocab] tensor is made. The model itself unembeds
    only each row's last position (`logits_to_keep=1`), which checks our unembedding on every call.
    """
    device = model.cfg.device
    ids, mask = side.ids.to(device), side.mask.to(device)
    final: list[torch.Tensor] = []
    keep = ("ln_final.hook_out", lambda x, hook: final.append(x) or x)
    with model.hooks(fwd_hooks=[*hooks, keep]):
        own = model(ids, attention_mask=mask, return_type="logits", logits_to_keep=1)[:, -1].float()
    h = final[0][mask.bool()]  # [n_real, d_model], rows in (text, position) order
    lengths = side.lengths.to(device)
    ends = torch.cumsum(lengths, 0) - 1  # each text's last row
    longest = int(side.lengths.argmax())  # its last position is the model's own last-position row
    norm, checked = _logsumexp(model, h, check_row=int(ends[longest]))
    if not torch.allclose(checked, own[longest], rtol=1e-4, atol=1e-4):
        raise DesteinError("cannot reproduce this model's unembedding from its final norm; please report it")
    is_last = torch.zeros(len(h), dtype=torch.bool, device=device)
    is_last[ends] = True
    targets = ids[mask.bool()][1:][~is_last[:-1]]  # the next token of every row but a text's last
    logprob = _token_logits(model, h[~is_last], targets) - norm[~is_last]
    text = torch.repeat_interleave(torch.arange(len(ids), device=device), lengths - 1)
    mean_logprob = torch.zeros(len(ids), device=device).index_add_(0, text, logprob) / (lengths - 1)
    words = toxic_ids.to(device)
    toxic = _softcap(model, (h[ends] @ model.W_U[:, words] + model.b_U[words]).float())  # [b, n_words]
    toxic_logmass = torch.logsumexp(toxic, dim=-1) - norm[ends]
    return mean_logprob, toxic_logmass


def _token_logits(model: TransformerBridge, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[n]: each row's logit of its own token (`tokens` [n])."""
    logits = einops.einsum(h, model.W_U[:, tokens], "n d, d n -> n") + model.b_U[tokens]
    return _softcap(model, logits.float())


def _logsumexp(
    model: TransformerBridge, h: torch.Tensor, check_row: int, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the vocabulary of each row's logits, a vocabulary chunk at a time (online);
    and the full logits of `check_row`."""
    running_max = torch.full((len(h),), -torch.inf, device=h.device)
    total = torch.zeros(len(h), device=h.device)
    checked = []
    for start in range(0, model.W_U.shape[1], chunk):
        logits = _softcap(
            model, (h @ model.W_U[:, start : start + chunk] + model.b_U[start : start + chunk]).float()
        )
        checked.append(logits[check_row])
        new_max = torch.maximum(running_max, logits.amax(-1))
        total = total * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        running_max = new_max
    return running_max + torch.log(total), torch.cat(checked)


def _softcap(model: TransformerBridge, logits: torch.Tensor) -> torch.Tensor:
    """The model's logit soft-cap (Gemma 2), if it has one."""
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


@torch.no_grad()
def score(
    model: TransformerBridge,
    held: HeldOut,
    hooks: Hooks | Callable[[Batch, str], Hooks] = (),
    *,
    sides: Sequence[str] = SIDES,
) -> Scores:
    """Every held-out text under `hooks` (a list, or a function of the batch and side).

    Sides not in `sides` are left NaN: a patch that edits one side only needs no forward of
    the other.
    """
    logprob = torch.full((2, len(held)), float("nan"))
    logmass = torch.full((2, len(held)), float("nan"))
    for batch in held.batches:
        for s, name in enumerate(SIDES):
            if name not in sides:
                continue
            batch_hooks = hooks(batch, name) if callable(hooks) else hooks
            lp, lm = score_side(model, batch.side(name), held.toxic_ids, batch_hooks)
            logprob[s, batch.index] = lp.cpu()
            logmass[s, batch.index] = lm.cpu()
    return Scores(logprob, logmass)
