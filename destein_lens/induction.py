"""Self-induced steering pairs: the model writes its own toxic / non-toxic paraphrases.

DeStein's "self-induced universal steering pairs" let a model without a paraphrase corpus steer
itself: from few-shot demonstrations drawn from seed pairs it writes new pairs, and a toxicity
scorer keeps those whose toxic side is toxic and whose non-toxic side is not. The paper does not
publish its prompt; ours is built for small *base* models, which continue a list far more
reliably than they follow an instruction, and runs in two stages:

1. toxic draft: `k` random seed toxic texts as a list, one per line, then the open label;
       Toxic: <seed toxic>\\n ... Toxic:
   the first line the model finishes is the draft;
2. paraphrase, only for drafts that passed the toxic-side tests (scorer included): `k` other
   random seed pairs, then the draft and the open polite label;
       Toxic: <seed toxic>\\nPolite: <seed non-toxic>\\n\\n ... Toxic: <draft>\\nPolite:

Writing the toxic side first lets the scorer drop the (many) tame drafts before a paraphrase is
paid for, and conditions the paraphrase on a finished toxic sentence. On gemma-3-270m this kept
about twice as many pairs per sample as one prompt that writes both sides at once.

A side is rejected when the model did not finish its line within `max_new_tokens` (a cut-off
sentence is not a paraphrase), has fewer than `min_words` words, copies a seed text, repeats a
text already kept (case and whitespace ignored), or, for the non-toxic side, repeats its toxic
side. Nothing checks that the two sides mean the same; look at the pairs before relying on them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .errors import DesteinError
from .generation import SamplingConfig, generate
from .models import load_record
from .pairs import SteeringPairs
from .readers import check_count, fold_whitespace
from .scoring import Scorer, get_scorer

TOXIC_LABEL = "Toxic:"
POLITE_LABEL = "Polite:"

# Why candidates were rejected, in the order the tests run; `InductionResult.rejected` has all keys.
REJECTION_REASONS = (
    "toxic_unparsed",
    "toxic_too_short",
    "toxic_seed_copy",
    "toxic_duplicate",
    "toxic_score",
    "nontoxic_unparsed",
    "nontoxic_identical",
    "nontoxic_too_short",
    "nontoxic_seed_copy",
    "nontoxic_duplicate",
    "nontoxic_score",
)

Writer = Callable[[list[str]], list[str]]  # prompts -> one continuation per prompt


@dataclass(frozen=True)
class InductionResult:
    """The kept pairs and why the other candidates were dropped, to judge the model as a writer."""

    pairs: SteeringPairs
    tried: int  # candidates examined (toxic drafts); kept + sum(rejected.values())
    rejected: dict[str, int]  # every key of REJECTION_REASONS, in that order


@dataclass(frozen=True)
class _Rules:
    """The tests a candidate side must pass."""

    scorer: Scorer
    toxic_min: float
    nontoxic_max: float
    min_words: int
    seed_keys: frozenset[str]


def induce_pairs(
    model: TransformerBridge,
    seeds: SteeringPairs,
    *,
    n_pairs: int,
    scorer: Scorer | str = "profanity-check",
    shots: int = 4,
    toxic_min: float = 0.5,
    nontoxic_max: float = 0.2,
    max_attempts: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    min_words: int = 4,
    progress: bool = True,
) -> InductionResult:
    """Up to `n_pairs` new pairs written by `model` from `shots` random seed demonstrations.

    Stops at `n_pairs` kept or `max_attempts` toxic drafts (default 20 per pair wanted); returns
    fewer pairs than asked when the budget runs out, and raises DesteinError if none were kept.
    `max_new_tokens` bounds each side separately; seed pairs are 12-19 tokens a side on Gemma.
    """
    for value, what in ((n_pairs, "n_pairs"), (shots, "shots"), (batch_size, "batch_size")):
        check_count(value, what)
    check_count(max_new_tokens, "max_new_tokens")
    check_count(min_words, "min_words")
    if max_attempts is None:
        max_attempts = 20 * n_pairs
    check_count(max_attempts, "max_attempts")
    if shots > len(seeds):
        raise DesteinError(f"{shots} shots need at least {shots} seed pairs, {seeds.source} has {len(seeds)}")
    if not 0.0 <= nontoxic_max < toxic_min <= 1.0:
        raise DesteinError(
            f"need 0 <= nontoxic_max < toxic_min <= 1, got nontoxic_max={nontoxic_max}, toxic_min={toxic_min}"
        )
    source = f"self-induced:{load_record(model).name}"
    rules = _Rules(
        scorer=get_scorer(scorer) if isinstance(scorer, str) else scorer,
        toxic_min=toxic_min,
        nontoxic_max=nontoxic_max,
        min_words=min_words,
        seed_keys=frozenset(map(_key, seeds.toxic + seeds.nontoxic)),
    )
    rng = random.Random(seed)

    def write(prompts: list[str]) -> list[str]:
        config = SamplingConfig(
            do_sample=True,
            max_new_tokens=max_new_tokens,
            top_p=0.9,
            seed=rng.getrandbits(32),
            batch_size=batch_size,
        )
        return [samples[0] for samples in generate(model, prompts, config, progress=False)]

    return _induce(write, rng, seeds, rules, n_pairs, shots, max_attempts, batch_size, source, progress)


def toxic_prompt(demos: Sequence[str]) -> str:
    """Stage 1: seed toxic texts as a list (one line each), ending on the open label the model completes."""
    return "".join(f"{TOXIC_LABEL} {fold_whitespace(t)}\n" for t in demos) + TOXIC_LABEL


def paraphrase_prompt(demos: Sequence[tuple[str, str]], toxic: str) -> str:
    """Stage 2: seed pairs, then `toxic` with the open polite label the model completes."""
    shots = "".join(
        f"{TOXIC_LABEL} {fold_whitespace(t)}\n{POLITE_LABEL} {fold_whitespace(n)}\n\n" for t, n in demos
    )
    return f"{shots}{TOXIC_LABEL} {fold_whitespace(toxic)}\n{POLITE_LABEL}"


def parse_line(continuation: str) -> str | None:
    """The first line of `continuation`, whitespace-folded; None if blank or never ended (cut off)."""
    line, newline, _ = continuation.partition("\n")
    text = fold_whitespace(line)
    return text if newline and text else None


def format_rejections(rejected: dict[str, int]) -> str:
    """`reason n, ...` for the reasons that rejected anything, for messages and logs."""
    return ", ".join(f"{reason} {n}" for reason, n in rejected.items() if n) or "none rejected"


def _induce(
    write: Writer,
    rng: random.Random,
    seeds: SteeringPairs,
    rules: _Rules,
    n_pairs: int,
    shots: int,
    max_attempts: int,
    batch_size: int,
    source: str,
    progress: bool,
) -> InductionResult:
    """The generate-and-filter loop, with generation behind `write` so the filtering is testable alone."""
    seed_pairs = list(zip(seeds.toxic, seeds.nontoxic))
    kept: list[tuple[str, str]] = []
    taken: set[str] = set()  # keys of both sides of every kept pair
    rejected = dict.fromkeys(REJECTION_REASONS, 0)
    tried = 0
    with tqdm(total=max_attempts, desc="inducing pairs", unit="draft", disable=not progress) as bar:
        while len(kept) < n_pairs and tried < max_attempts:
            size = min(batch_size, max_attempts - tried)
            drafts = write([toxic_prompt(rng.sample(seeds.toxic, shots)) for _ in range(size)])
            toxic = [parse_line(d) for d in drafts]
            problems = _problems("toxic", toxic, None, rules, taken)
            ready = [i for i, p in enumerate(problems) if p is None]
            polite: list[str | None] = [None] * size
            if ready:
                drafted = [toxic[i] or "" for i in ready]  # `ready` drafts all parsed
                prompts = [paraphrase_prompt(rng.sample(seed_pairs, shots), tox) for tox in drafted]
                for i, continuation in zip(ready, write(prompts)):
                    polite[i] = parse_line(continuation)
                polite_problems = _problems("nontoxic", [polite[i] for i in ready], drafted, rules, taken)
                for i, problem in zip(ready, polite_problems):
                    problems[i] = problem
            before = tried
            for tox, non, problem in zip(toxic, polite, problems):
                tried += 1
                if problem is not None:
                    rejected[problem] += 1
                    continue
                assert tox is not None and non is not None  # no problem means both sides parsed
                kept.append((tox, non))
                taken.update((_key(tox), _key(non)))
                if len(kept) == n_pairs:
                    break
            bar.update(tried - before)
            bar.set_postfix(kept=f"{len(kept)}/{n_pairs}")
    if not kept:
        raise DesteinError(
            f"no steering pairs induced from {tried} candidates (rejected: {format_rejections(rejected)}); "
            "raise max_attempts, loosen toxic_min/nontoxic_max, or use a larger model"
        )
    pairs = SteeringPairs(tuple(t for t, _ in kept), tuple(n for _, n in kept), source=source)
    return InductionResult(pairs=pairs, tried=tried, rejected=rejected)


def _problems(
    side: str,
    texts: list[str | None],
    partners: list[str] | None,
    rules: _Rules,
    taken: set[str],
) -> list[str | None]:
    """Why each text fails `side`'s tests (None: it passes); later texts are checked against earlier ones.

    `partners`, for the non-toxic side, holds each text's toxic side: a copy of it is no paraphrase.
    """
    seen = set(taken)
    out: list[str | None] = []
    passing: dict[int, str] = {}  # index -> text, for the texts left to score
    for j, text in enumerate(texts):
        if text is not None and partners is not None and _key(text) == _key(partners[j]):
            problem: str | None = "identical"
        else:
            problem = _text_problem(text, rules, seen)
        if problem is None and text is not None:
            seen.add(_key(text))
            passing[j] = text
        out.append(None if problem is None else f"{side}_{problem}")
    scores = rules.scorer.score(list(passing.values())) if passing else []
    for j, score in zip(passing, scores):
        ok = score >= rules.toxic_min if side == "toxic" else score <= rules.nontoxic_max
        if not ok:
            out[j] = f"{side}_score"
    return out


def _text_problem(text: str | None, rules: _Rules, seen: set[str]) -> str | None:
    if text is None:
        return "unparsed"
    if len(text.split()) < rules.min_words:
        return "too_short"
    if _key(text) in rules.seed_keys:
        return "seed_copy"
    if _key(text) in seen:
        return "duplicate"
    return None


def _key(text: str) -> str:
    """Identity for deduplication: case and whitespace do not make a text new."""
    return fold_whitespace(text.casefold())
