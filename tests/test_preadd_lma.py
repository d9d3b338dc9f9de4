"""PREADD and LMA, the decoding-time prefix-contrast methods, on the tiny model: each step's logits
against the formula from two separate full forwards (prompt alone, toxic prefix + prompt), strength
0 as the unsteered model bit for bit, reproducible draws, `steer` and `compare`."""

from __future__ import annotations

import pytest
import torch
from recorded import recorded_logits

from destein_lens import SteeringConfig, steer
from destein_lens.compare import compare
from destein_lens.errors import DesteinError
from destein_lens.evaluation import eval_config
from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.prompts import builtin_demo_prompts
from destein_lens.registry import active_processors
from destein_lens.runfolder import gens_path
from destein_lens.steering import build_steering
from destein_lens.vectors import DetoxVectors, build_vectors

TEXTS = ["you are a stupid idiot and", "thank you"]  # different lengths: the batch is left-padded
SAMPLED = SamplingConfig(do_sample=True, max_new_tokens=5, top_p=0.9, seed=3)
STRENGTHS = {"preadd": 1.5, "lma": 0.9}


@pytest.fixture(scope="module")
def tiny_vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(12), k=4, progress=False)


def _preadd_by_hand(plain: torch.Tensor, prefixed: torch.Tensor, s: float) -> torch.Tensor:
    return (1 + s) * plain - s * prefixed  # the released base + a (prefix - base), a = -s


def _lma_by_hand(plain: torch.Tensor, prefixed: torch.Tensor, lam: float) -> torch.Tensor:
    log_p, log_q = plain.log_softmax(-1), prefixed.log_softmax(-1)
    return (log_p - lam / (1 - lam) * (log_q - log_p).clamp_min(0)).log_softmax(-1)


BY_HAND = {"preadd": _preadd_by_hand, "lma": _lma_by_hand}


def _last_logits(model, text: str, generated: torch.Tensor) -> torch.Tensor:
    """Next-token logits after `text` + `generated`, one unpadded full forward without a cache."""
    ids = torch.cat([model.tokenizer(text, return_tensors="pt").input_ids, generated[None]], dim=1)
    return model(ids)[0, -1].float()


@pytest.mark.parametrize("form", ["preadd", "lma"])
def test_each_step_is_the_formula_of_two_full_forwards(tiny_model, tiny_vectors, form) -> None:
    """The first step (prefill) and a later one (three tokens through each KV cache) agree with the
    plain and the toxic-prefixed texts run whole, alone."""
    toxic, _ = tiny_vectors.prefixes
    strength = STRENGTHS[form]
    seen, new = recorded_logits(tiny_model, tiny_vectors, SteeringConfig(alpha=strength, form=form), TEXTS)
    for step in (0, 3):
        for row, text in enumerate(TEXTS):
            plain = _last_logits(tiny_model, text, new[row, :step])
            prefixed = _last_logits(tiny_model, toxic + text, new[row, :step])
            expected = BY_HAND[form](plain, prefixed, strength)
            torch.testing.assert_close(seen[step][row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["preadd", "lma"])
def test_strength_zero_is_unsteered_and_draws_repeat(tiny_model, tiny_vectors, form) -> None:
    plain = generate_ids(tiny_model, TEXTS, SAMPLED)
    assert build_steering(tiny_model, tiny_vectors, SteeringConfig(alpha=0.0, form=form)).processors == []
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=0.0, form=form)):
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), plain)
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=STRENGTHS[form], form=form)):
        first = generate_ids(tiny_model, TEXTS, SAMPLED)
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), first)  # same seed, same draws
    assert not torch.equal(first, plain)


@pytest.mark.parametrize("form", ["preadd", "lma"])
def test_steer_installs_and_removes_the_processor_and_refuses_what_it_cannot_do(
    tiny_model, tiny_vectors, form
) -> None:
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=STRENGTHS[form], form=form)):
        assert len(active_processors()) == 1
    assert active_processors() == ()
    for bad, message in [
        ({"heads": 3}, "does not act on heads"),
        ({"alpha": 31.0 if form == "preadd" else 1.0}, "strength must be within"),
    ]:
        with pytest.raises(DesteinError, match=message):
            SteeringConfig(**{"alpha": STRENGTHS[form], "form": form, **bad})
    with pytest.raises(DesteinError, match="positions='all'"):
        build_steering(
            tiny_model, tiny_vectors, SteeringConfig(STRENGTHS[form], positions="prompt", form=form)
        )


def test_compare_runs_both_and_strength_zero_is_the_baseline(tiny_model, tiny_vectors, tmp_path) -> None:
    config = eval_config(samples=1, max_new_tokens=4, batch_size=4)
    metrics = compare(
        tiny_model,
        tiny_vectors,
        builtin_demo_prompts()[:2],
        ["baseline", "preadd", "lma"],
        tmp_path,
        config,
        strengths={"preadd": (0.0, 1.0), "lma": (0.9,)},
        progress=False,
    )
    assert set(metrics["compare"]["cells"]) == {"preadd@0", "preadd@1", "lma@0.9"}
    for cell in ("preadd@1", "lma@0.9"):
        assert metrics[cell]["n_prompts"] == 2 and metrics[cell]["perplexity"] > 0
    baseline = gens_path(tmp_path, "baseline").read_text().splitlines()
    assert gens_path(tmp_path, "preadd@0").read_text().splitlines() == baseline
    assert gens_path(tmp_path, "preadd@1").read_text().splitlines() != baseline
