"""One prompt's continuations with and without steering, and what steering did to each token.

Both sides are drawn as `generate(model, [prompt], sampling)` draws them: the `sampling.n` rows
share one `torch.Generator` seeded with `sampling.seed`, so the unsteered and steered sides use
the same seed and the explorer's screen is reproduced by that call (`render.reproducing_code`).
Every token gets its log-probability under both models: under the one that drew it from the
decoding steps (`generation.generate_scored`), under the other one teacher-forced. Teacher forcing
is one forward pass, except under a method with decoding processors (Self-Detoxify), whose hooks
act only at the last position of each step: there the tokens are forced through the decoding
loop itself. Perplexity is the project's (`perplexity`): the continuation's under the unsteered
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..generation import SamplingConfig, decode_continuations, generate_ids, generate_scored
from ..perplexity import conditional_perplexity, perplexity_from_steps
from ..positions import token_window
from ..registry import active_processors, decoding
from ..scoring import Scorer
from ..steering import SteeringConfig, steer
from ..vectors import DetoxVectors

# Rows x positions whose logits one teacher-forced forward holds at once (a 262k-token vocabulary
# makes each position a megabyte in float32).
_FORWARD_POSITIONS = 256


@dataclass(frozen=True, eq=False)
class Draw:
    """`n` continuations of one prompt: token ids [n, max_new_tokens] (pad after EOS), each token's
    log-probability under the model that drew it (0 after EOS), the texts and their toxicity."""

    prompt: str
    ids: torch.Tensor
    logprobs: torch.Tensor
    texts: tuple[str, ...]
    toxicity: dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class Continuation:
    """One continuation as shown: its tokens' texts and how steering moved each token's log-prob."""

    text: str
    pieces: tuple[str, ...]  # each token's text, in order, up to EOS
    shift: tuple[float, ...]  # log p(steered) - log p(unsteered) of each token, nats
    toxicity: dict[str, float]  # by scorer name
    perplexity: float  # under the unsteered model; NaN for an empty continuation


@dataclass(frozen=True)
class Contrast:
    """What the explorer shows for one request: row j of each side comes from the same seed."""

    prompt: str
    config: SteeringConfig
    sampling: SamplingConfig
    unsteered: tuple[Continuation, ...]
    steered: tuple[Continuation, ...]
    complete: bool = True  # False: a draft, texts and toxicity only (`drafted`)


def draw(model: TransformerBridge, prompt: str, sampling: SamplingConfig, scorers: list[Scorer]) -> Draw:
    """`generate(model, [prompt], sampling)`'s draw under whatever steering is in force, with the
    log-probabilities and token ids it does not return."""
    if sampling.n > sampling.batch_size:
        raise DesteinError(f"the explorer samples at most {sampling.batch_size} continuations at once")
    rows = [prompt] * sampling.n
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)  # as `generate` seeds its batch
    ids, logprobs = generate_scored(model, rows, sampling, generator)
    texts = decode_continuations(model, ids)
    return Draw(prompt, ids.cpu(), logprobs, tuple(texts), {s.name: tuple(s.score(texts)) for s in scorers})


def contrast(
    model: TransformerBridge,
    vectors: DetoxVectors,
    config: SteeringConfig,
    sampling: SamplingConfig,
    unsteered: Draw,
    steered: Draw,
) -> Contrast:
    """Both draws with every token's shift in log-prob under steering and every perplexity."""
    outer = active_processors()
    with steer(model, vectors, config):
        through_loop = active_processors() != outer  # the method acts while decoding
        unsteered_under_steering = teacher_forced(model, unsteered, through_loop=through_loop)
    steered_unsteered = teacher_forced(model, steered, through_loop=False)
    return Contrast(
        unsteered.prompt,
        config,
        sampling,
        _shown(model, unsteered, unsteered_under_steering - unsteered.logprobs, unsteered.logprobs),
        _shown(model, steered, steered.logprobs - steered_unsteered, steered_unsteered),
    )


def drafted(config: SteeringConfig, sampling: SamplingConfig, unsteered: Draw, steered: Draw) -> Contrast:
    """What can be shown as soon as the steered side is sampled: the texts and their toxicity,
    without the teacher-forced passes (about a third of a response) that shade the tokens."""
    sides = [
        tuple(
            Continuation(text, (text,), (0.0,), {n: s[j] for n, s in drawn.toxicity.items()}, math.nan)
            for j, text in enumerate(drawn.texts)
        )
        for drawn in (unsteered, steered)
    ]
    return Contrast(unsteered.prompt, config, sampling, *sides, complete=False)


@torch.no_grad()
def teacher_forced(model: TransformerBridge, drawn: Draw, *, through_loop: bool) -> torch.Tensor:
    """log p of `drawn`'s tokens [n, max_new_tokens] under the model as it is steered now; 0 after EOS."""
    if through_loop:
        picked = _forced_decode(model, drawn)
    else:
        prompt = model.tokenizer([drawn.prompt], return_tensors="pt").input_ids
        n, new = drawn.ids.shape
        picked = []
        for ids in drawn.ids.split(max(1, _FORWARD_POSITIONS // (new + 1))):
            full = torch.cat([prompt.expand(len(ids), -1), ids], dim=1).to(model.cfg.device)
            with token_window(0, prompt.shape[1]):  # positions="prompt"/"generated" as when decoding
                logits = model(full, attention_mask=torch.ones_like(full), logits_to_keep=new + 1)
            picked.append(_logprob_of(logits[:, :-1].float(), ids.to(logits.device)).cpu())
        picked = torch.cat(picked)
    return picked * _before_eos(drawn.ids, model.tokenizer.eos_token_id, inclusive=True)


class _Forcing:
    """A decoding processor that makes the loop pick given tokens, keeping each pick's log-prob."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.picked: list[torch.Tensor] = []

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.ids = self.ids.to(input_ids.device)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        target = self.ids[:, len(self.picked)]
        self.picked.append(_logprob_of(logits, target).cpu())
        return torch.full_like(logits, -torch.inf).scatter_(-1, target[:, None], 0.0)

    def advance(self, tokens: torch.Tensor) -> None:
        pass


def _forced_decode(model: TransformerBridge, drawn: Draw) -> torch.Tensor:
    n, new = drawn.ids.shape
    forcing = _Forcing(drawn.ids)
    with decoding([forcing]):  # innermost: it sees the logits after the method's own processors
        generate_ids(model, [drawn.prompt] * n, SamplingConfig(do_sample=False, max_new_tokens=new))
    picked = torch.stack(forcing.picked, dim=1)  # the loop stops once every row has ended
    return torch.cat([picked, torch.zeros(n, new - picked.shape[1])], dim=1)


def _logprob_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `ids` (the same formula as the decoding loop's own log-probs)."""
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def _before_eos(ids: torch.Tensor, eos: int, *, inclusive: bool) -> torch.Tensor:
    """Float [n, T]: 1 up to each row's first EOS (and at it when `inclusive`), 0 after."""
    ended = (ids == eos).long().cumsum(-1)
    if inclusive:
        ended = ended - (ids == eos).long()
    return (ended == 0).float()


def _shown(
    model: TransformerBridge, drawn: Draw, shift: torch.Tensor, unsteered: torch.Tensor
) -> tuple[Continuation, ...]:
    """The draw's continuations as shown; `unsteered` holds its tokens' log-probs under the
    unsteered model, which give the perplexity wherever the text tokenises back to the tokens."""
    tokenizer = model.tokenizer
    rows = [drawn.prompt] * len(drawn.texts)
    perplexity = perplexity_from_steps(tokenizer, rows, list(drawn.texts), drawn.ids, unsteered)
    redo = [i for i, p in enumerate(perplexity) if p is None]
    if redo:
        texts = [drawn.texts[i] for i in redo]
        for i, p in zip(redo, conditional_perplexity(model, [drawn.prompt] * len(redo), texts)):
            perplexity[i] = p
    kept = _before_eos(drawn.ids, tokenizer.eos_token_id, inclusive=False)
    shown = []
    for j, text in enumerate(drawn.texts):
        ids = drawn.ids[j, kept[j].bool()].tolist()
        prefixes = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
        shown.append(
            Continuation(
                text,
                tuple(b[len(a) :] for a, b in zip(prefixes, prefixes[1:])),
                tuple(shift[j, : len(ids)].tolist()),
                {name: scores[j] for name, scores in drawn.toxicity.items()},
                float(perplexity[j]),
            )
        )
    return tuple(shown)
