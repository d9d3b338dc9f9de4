"""Self-induced pairs: parsing, the filter/dedupe loop with scripted writers, and the real model."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from destein_lens.errors import DesteinError
from destein_lens.induction import (
    REJECTION_REASONS,
    _induce,
    _Rules,
    format_rejections,
    induce_pairs,
    paraphrase_prompt,
    parse_line,
    toxic_prompt,
)
from destein_lens.pairs import SteeringPairs, builtin_seed_pairs
from destein_lens.scoring import get_scorer

SEEDS = SteeringPairs(
    ("Damn this stupid printer never works at all.", "Shut up and fix your damn car already."),
    ("This printer rarely works, which is frustrating.", "Please get your car repaired soon."),
    source="test-seeds",
)


class DamnScorer:
    """Deterministic stand-in: a text is toxic exactly when it says "damn"."""

    name = "damn-test"

    def score(self, texts: Sequence[str]) -> list[float]:
        return [1.0 if "damn" in t.lower() else 0.0 for t in texts]


class ScriptedWriter:
    """Answers each call to `write` with the next scripted batch, recording the prompts it got."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = list(batches)
        self.prompts: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.prompts.append(prompts)
        batch = self.batches.pop(0)
        assert len(batch) == len(prompts)
        return batch


def rules(min_words: int = 4) -> _Rules:
    keys = frozenset(" ".join(t.casefold().split()) for t in SEEDS.toxic + SEEDS.nontoxic)
    return _Rules(DamnScorer(), toxic_min=0.5, nontoxic_max=0.2, min_words=min_words, seed_keys=keys)


def run(writer: ScriptedWriter, n_pairs: int, max_attempts: int, batch_size: int = 8, shots: int = 2):
    return _induce(
        writer, random.Random(0), SEEDS, rules(), n_pairs, shots, max_attempts, batch_size, "test", False
    )


# Round 1: eight toxic drafts, then paraphrases for the three that pass (0, 6, 7).
ROUND1_DRAFTS = [
    " Damn this slow train, it is always late.\nToxic: more",
    " damn THIS slow train,  it is always late.\n",  # duplicate of 0 (case, spaces)
    " The weather is rather nice today.\n",  # not toxic
    " Damn it all.\n",  # three words
    " Damn printer jams all the time",  # cut off: no line end
    " Shut up and fix your DAMN car already.\n",  # a seed
    " Damn you and your loud music at night.\n",
    " Damn that noisy dog next door.\n\nToxic: junk",
]
ROUND1_POLITE = [
    " This slow train is always late.\nToxic: extra pair\nPolite: ignored\n",
    " damn you and your loud music at night.\n",  # copies its toxic side
    " That dog next door is quite noisy.\n",
]
# Round 2 (the last 4 attempts): one duplicate draft, three drafts whose paraphrase fails.
ROUND2_DRAFTS = [
    " Damn this slow train, it is always late.\n",  # kept in round 1
    " Damn the rain ruined our picnic again.\n",
    " Damn the bus driver skipped my stop.\n",
    " Damn this queue never moves at all.\n",
]
ROUND2_POLITE = [
    " Damn, the rain ruined our picnic.\n",  # still toxic
    " Please get your car repaired soon.\n",  # a seed
    " This slow train is always late.\n",  # kept in round 1
]


def test_parse_line() -> None:
    assert parse_line(" You are a damn fool.\nToxic: next one\n") == "You are a damn fool."
    assert parse_line("  spaced   out \t text \n\njunk after the blank line") == "spaced out text"
    assert parse_line(" Please be quiet.\nPolite: a second pair\n\nToxic: and a third") == "Please be quiet."
    assert parse_line(" cut off before the line ended") is None  # ran out of tokens
    assert parse_line("\nPolite: the polite side is missing") is None
    assert parse_line("   \n") is None
    assert parse_line("") is None


def test_prompts_are_few_shot_lists() -> None:
    prompt = toxic_prompt(["Shut up, you\nidiot.", "What a damn mess."])
    assert prompt == "Toxic: Shut up, you idiot.\nToxic: What a damn mess.\nToxic:"
    prompt = paraphrase_prompt([("Shut up, idiot.", "Please be quiet.")], "Move, moron.")
    assert prompt == "Toxic: Shut up, idiot.\nPolite: Please be quiet.\n\nToxic: Move, moron.\nPolite:"


def test_filters_and_dedupe() -> None:
    writer = ScriptedWriter([ROUND1_DRAFTS, ROUND1_POLITE, ROUND2_DRAFTS, ROUND2_POLITE])
    result = run(writer, n_pairs=10, max_attempts=12)
    assert result.pairs.toxic == (
        "Damn this slow train, it is always late.",
        "Damn that noisy dog next door.",
    )
    assert result.pairs.nontoxic == ("This slow train is always late.", "That dog next door is quite noisy.")
    assert result.pairs.source == "test"
    assert result.tried == 12
    assert list(result.rejected) == list(REJECTION_REASONS)
    assert {k: v for k, v in result.rejected.items() if v} == {
        "toxic_unparsed": 1,
        "toxic_too_short": 1,
        "toxic_seed_copy": 1,
        "toxic_duplicate": 2,
        "toxic_score": 1,
        "nontoxic_identical": 1,
        "nontoxic_seed_copy": 1,
        "nontoxic_duplicate": 1,
        "nontoxic_score": 1,
    }
    assert len(result.pairs) + sum(result.rejected.values()) == result.tried
    # Only drafts that passed are paraphrased, each behind its own demonstrations.
    assert len(writer.prompts[1]) == 3
    assert writer.prompts[1][0].endswith("Toxic: Damn this slow train, it is always late.\nPolite:")
    assert all(p.count("Toxic:") == 3 and p.endswith("Toxic:") for p in writer.prompts[0])
    assert len(writer.prompts[2]) == 4  # the last round only uses the attempts left


def test_stops_once_enough_are_kept() -> None:
    writer = ScriptedWriter([ROUND1_DRAFTS, ROUND1_POLITE])
    result = run(writer, n_pairs=2, max_attempts=100)
    assert len(result.pairs) == 2
    assert result.tried == 8  # the second pair was the batch's last draft
    assert not writer.batches  # no second round


def test_nothing_kept_raises_with_the_counts() -> None:
    writer = ScriptedWriter([[" The weather is rather nice today.\n", " cut off"]])
    with pytest.raises(DesteinError, match=r"from 2 candidates .*toxic_unparsed 1, toxic_score 1"):
        run(writer, n_pairs=1, max_attempts=2)


def test_format_rejections() -> None:
    assert format_rejections(dict.fromkeys(REJECTION_REASONS, 0)) == "none rejected"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_pairs": 0}, "n_pairs"),
        ({"n_pairs": 1, "shots": 51}, "51 shots"),
        ({"n_pairs": 1, "toxic_min": 0.2, "nontoxic_max": 0.2}, "nontoxic_max < toxic_min"),
        ({"n_pairs": 1, "max_attempts": 0}, "max_attempts"),
    ],
)
def test_rejects_bad_options(tiny_model, options: dict, message: str) -> None:
    with pytest.raises(DesteinError, match=message):
        induce_pairs(tiny_model, builtin_seed_pairs(), progress=False, **options)


def test_random_model_induces_nothing(tiny_model) -> None:
    with pytest.raises(DesteinError, match=r"no steering pairs induced from 4 candidates \(rejected: toxic_"):
        induce_pairs(
            tiny_model,
            builtin_seed_pairs(),
            n_pairs=1,
            shots=1,  # the tiny model has 256 positions
            max_attempts=4,
            batch_size=4,
            max_new_tokens=8,
            progress=False,
        )


@pytest.mark.real
def test_real_model_induces_pairs(real_model) -> None:
    seeds = builtin_seed_pairs()
    result = induce_pairs(
        real_model, seeds, n_pairs=2, max_attempts=64, batch_size=16, seed=0, progress=False
    )
    pairs = result.pairs
    assert len(pairs) == 2
    assert pairs.source == "self-induced:gemma-3-270m"
    scorer = get_scorer("profanity-check")
    assert all(s >= 0.5 for s in scorer.score(pairs.toxic))
    assert all(s <= 0.2 for s in scorer.score(pairs.nontoxic))
    seed_texts = {t.casefold() for t in seeds.toxic + seeds.nontoxic}
    for tox, non in zip(pairs.toxic, pairs.nontoxic):
        assert len(tox.split()) >= 4 and len(non.split()) >= 4
        assert tox.casefold() != non.casefold()
        assert tox.casefold() not in seed_texts and non.casefold() not in seed_texts
    assert len(pairs) + sum(result.rejected.values()) == result.tried <= 64
