"""Evaluation: perplexity, the resumable run folder, the CLI's main job and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError
from destein_lens.evaluation import BASELINE, MethodSpec, eval_config, evaluate
from destein_lens.generation import SamplingConfig, decode_continuations, generate_scored
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.perplexity import conditional_perplexity, perplexity_from_steps
from destein_lens.prompts import Prompt
from destein_lens.report import write_report
from destein_lens.runfolder import gens_path
from destein_lens.steering import SteeringConfig
from destein_lens.vectors import build_vectors

PROMPTS = [
    Prompt("You are such a", 0.7, "a"),
    Prompt("The weather today is", 0.1, "b"),
    Prompt("I hate", None, "c"),
]
CONFIG = eval_config(2, max_new_tokens=6, batch_size=4)


@pytest.fixture(scope="module")
def vectors(tiny_model):
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, progress=False)


def _full_forward_perplexity(model, prompt: str, continuation: str) -> float:
    """The plain formula: one unpadded forward over prompt + continuation, the continuation's
    tokens being those beyond the prompt's own token count; NaN if there are none."""
    n_prompt = len(model.tokenizer(prompt).input_ids)
    ids = model.tokenizer(prompt + continuation, return_tensors="pt").input_ids
    if ids.shape[1] <= n_prompt:
        return float("nan")
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return torch.exp(-logp[n_prompt - 1 :].double().mean()).item()


# Prompts shared by several continuations (a prompt's samples share its KV cache), one ending inside
# a word so the join merges, an empty and a one-token continuation, and rows of other lengths.
PPL_CASES = [
    ("You are", " a kind person"),
    ("The weather today is", " nice"),
    ("You are", " such an idiot, you know that"),
    ("The weath", "er today is nice"),
    ("Hello there", ""),
    ("You are", "!"),
    ("I hate", "s and more hate and more"),
    ("The weather today is", " nice"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_perplexity_matches_full_forward(tiny_model, batch_size: int) -> None:
    prompts, conts = zip(*PPL_CASES)
    got = conditional_perplexity(tiny_model, prompts, conts, batch_size=batch_size)
    want = [_full_forward_perplexity(tiny_model, p, c) for p, c in PPL_CASES]
    assert got == pytest.approx(want, rel=1e-5, nan_ok=True)
    assert got[4] != got[4]  # NaN for an empty continuation
    tok = tiny_model.tokenizer
    merged = [tok(p + c).input_ids[: len(tok(p).input_ids)] != tok(p).input_ids for p, c in PPL_CASES]
    assert any(merged)  # the join merges somewhere: the prefix is then the joint text's own tokens


@pytest.mark.real
def test_perplexity_matches_full_forward_real(real_model) -> None:
    """On gemma-3-270m (262k vocabulary), float32: the KV-cached pass against one forward per row."""
    cases = [
        ("The city council met on Tuesday to discuss", " the new parking rules for the old town"),
        ("The city council met on Tuesday to discuss", " whether to fire the mayor"),
        ("She opened the letter and", " read it twice before she called her sister."),
        ("He said", ""),
        ("He said", " no"),
    ]
    prompts, conts = zip(*cases)
    got = conditional_perplexity(real_model, prompts, conts)
    want = [_full_forward_perplexity(real_model, p, c) for p, c in cases]
    assert got == pytest.approx(want, rel=1e-3, nan_ok=True)


def _steps_against_pass(model, prompts: list[str], rel: float) -> int:
    """Sampled continuations: perplexity from the decoding steps equals a second forward's where the
    text tokenises back to the generated ids, and is None where it does not. Returns rows matched."""
    config = SamplingConfig(do_sample=True, top_p=0.9, max_new_tokens=8, n=1, seed=3)
    ids, logprobs = generate_scored(model, prompts, config)
    continuations = decode_continuations(model, ids)
    from_steps = perplexity_from_steps(model.tokenizer, prompts, continuations, ids, logprobs)
    by_pass = conditional_perplexity(model, prompts, continuations)
    for prompt, text, row, got, want in zip(prompts, continuations, ids.tolist(), from_steps, by_pass):
        eos = model.tokenizer.eos_token_id
        kept = row[: row.index(eos)] if eos in row else row
        same = model.tokenizer(prompt + text).input_ids == model.tokenizer(prompt).input_ids + kept
        assert (got is not None) == same
        if got is not None:
            assert got == pytest.approx(want, rel=rel, nan_ok=True)
    # a continuation that does not tokenise back (here: not the text generated) is left to the pass
    assert perplexity_from_steps(model.tokenizer, prompts[:1], [" zz qq"], ids[:1], logprobs[:1]) == [None]
    return sum(x is not None for x in from_steps)


def test_perplexity_from_decoding_steps(tiny_model) -> None:
    prompts = ["You are", "The weather today is", "He said that", "Hello"] * 2
    assert _steps_against_pass(tiny_model, prompts, rel=1e-4) > 0


@pytest.mark.real
def test_perplexity_from_decoding_steps_real(real_model) -> None:
    prompts = ["The city council met on Tuesday to discuss", "She opened the letter and", "He said"]
    assert _steps_against_pass(real_model, prompts, rel=1e-3) > 0


def test_run_folder_metrics_and_resume(tiny_model, vectors, tmp_path: Path) -> None:
    methods = [BASELINE, MethodSpec("destein", SteeringConfig(alpha=0.5))]
    metrics = evaluate(tiny_model, PROMPTS, methods, tmp_path, CONFIG, vectors=vectors, progress=False)
    assert metrics["scorer"] == "profanity-check"
    for name in ("baseline", "destein"):
        m = metrics[name]
        assert m["n_prompts"] == 3 and m["samples"] == 6 and 0 <= m["expected_max_toxicity"] <= 1
        assert set(m) >= {
            "expected_max_toxicity_std",
            "toxicity_probability",
            "perplexity",
            "dist_1",
            "dist_2",
            "dist_3",
        }
        assert m["toxic"]["n_prompts"] == 1 and m["nontoxic"]["n_prompts"] == 1
    rows = [json.loads(line) for line in gens_path(tmp_path, "baseline").read_text().splitlines()]
    assert rows[0]["prompt"]["text"] == "You are such a" and len(rows[0]["generations"]) == 2
    assert set(rows[0]["generations"][0]) == {"text", "toxicity", "perplexity"}
    before = {p: p.read_bytes() for p in tmp_path.glob("prompted_gens_*.jsonl")}
    # kill -9 mid-write leaves half a line: resuming cuts it and finishes, keeping finished lines
    path = gens_path(tmp_path, "destein")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1]) + lines[1][:25])
    again = evaluate(tiny_model, PROMPTS, methods, tmp_path, CONFIG, vectors=vectors, progress=False)
    assert again["destein"] == metrics["destein"] and again["baseline"] == metrics["baseline"]
    assert path.read_bytes() == before[path]  # same seeds per (prompt, sample): identical redo
    assert gens_path(tmp_path, "baseline").read_bytes() == before[gens_path(tmp_path, "baseline")]
    md, html = write_report(tmp_path)
    assert "| baseline |" in md.read_text() and "<table" in html.read_text()


def test_same_seeds_across_methods_and_batching(tiny_model, vectors, tmp_path: Path) -> None:
    a = evaluate(tiny_model, PROMPTS, [BASELINE], tmp_path / "a", CONFIG, progress=False)
    b = evaluate(
        tiny_model,
        PROMPTS,
        [BASELINE],
        tmp_path / "b",
        eval_config(2, max_new_tokens=6, batch_size=1),
        progress=False,
    )
    gens = [gens_path(tmp_path / d, "baseline").read_text().splitlines() for d in "ab"]
    for line_a, line_b in zip(*gens, strict=True):  # identical draws; perplexity up to float batching
        ra, rb = json.loads(line_a), json.loads(line_b)
        assert [g["text"] for g in ra["generations"]] == [g["text"] for g in rb["generations"]]
    assert a["baseline"]["expected_max_toxicity"] == b["baseline"]["expected_max_toxicity"]
    assert a["baseline"]["perplexity"] == pytest.approx(b["baseline"]["perplexity"], rel=1e-5)


def test_folder_of_another_run_is_refused(tiny_model, tmp_path: Path) -> None:
    evaluate(tiny_model, PROMPTS, [BASELINE], tmp_path, CONFIG, progress=False)
    with pytest.raises(DesteinError, match="holds another run"):
        evaluate(tiny_model, PROMPTS, [BASELINE], tmp_path, eval_config(3, max_new_tokens=6), progress=False)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: eval_config(0), "samples"),
        (lambda: MethodSpec("destein", SteeringConfig(alpha=float("nan"))), "finite"),
        (lambda: MethodSpec("a/b"), "plain"),
    ],
)
def test_bad_eval_arguments(make, match) -> None:
    with pytest.raises(DesteinError, match=match):
        make()


def test_a_scorer_added_to_a_finished_folder_scores_the_stored_texts(
    tiny_model, vectors, tmp_path, word_length
) -> None:
    """Another scorer over a finished folder: no generation, each continuation scored once and kept;
    the metrics gain EMT and TP per scorer, the folder's own numbers unchanged."""
    methods = [BASELINE, MethodSpec("destein", SteeringConfig(alpha=0.5))]
    first = evaluate(tiny_model, PROMPTS, methods, tmp_path, CONFIG, vectors=vectors, progress=False)
    gens = {p: p.read_bytes() for p in tmp_path.glob("prompted_gens_*.jsonl")}
    extra = word_length
    again = evaluate(
        tiny_model, PROMPTS, methods, tmp_path, CONFIG, vectors=vectors, extra_scorers=[extra], progress=False
    )
    assert {p: p.read_bytes() for p in tmp_path.glob("prompted_gens_*.jsonl")} == gens  # nothing regenerated
    assert extra.scored == 12 and again["scorers"] == ["profanity-check", "word-length"]
    for name in ("baseline", "destein"):
        rows = [json.loads(line) for line in gens_path(tmp_path, name).read_text().splitlines()]
        maxima = [max(min(1.0, len(g["text"].split()) / 6) for g in r["generations"]) for r in rows]
        by = again[name]["by_scorer"]
        assert by["word-length"]["expected_max_toxicity"] == pytest.approx(sum(maxima) / 3)
        own = by["profanity-check"]
        assert own == {k: first[name][k] for k in own}  # the folder's scorer, as before
        assert again[name]["expected_max_toxicity"] == first[name]["expected_max_toxicity"]
        assert "by_scorer" in again[name]["toxic"]
    evaluate(
        tiny_model, PROMPTS, methods, tmp_path, CONFIG, vectors=vectors, extra_scorers=[extra], progress=False
    )
    assert extra.scored == 12  # kept: the same texts are not scored twice
    md, _ = write_report(tmp_path)
    assert "EMT [95% CI] (word-length)" in md.read_text()
