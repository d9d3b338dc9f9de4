"""Generation: KV-cached decoding equals uncached decoding and HF, left padding changes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from destein_lens import DesteinError, SamplingConfig, generate
from destein_lens.generation import generate_ids

GREEDY = SamplingConfig(do_sample=False, max_new_tokens=20)
PROMPTS = ["The capital of France is", "Hello, my name is and I really like to", "Once"]


def _greedy_checks(model) -> None:
    cached = generate_ids(model, PROMPTS, GREEDY)
    uncached = generate_ids(
        model, PROMPTS, SamplingConfig(do_sample=False, max_new_tokens=20, use_cache=False)
    )
    assert torch.equal(cached, uncached)
    for i, prompt in enumerate(PROMPTS):  # left padding in the batch changes no row
        assert torch.equal(generate_ids(model, [prompt], GREEDY)[0], cached[i])


def test_tiny_greedy_cache_and_padding(tiny_model) -> None:
    _greedy_checks(tiny_model)


def test_sampling_is_seeded_and_shaped(tiny_model) -> None:
    config = SamplingConfig(do_sample=True, top_p=0.9, top_k=50, temperature=0.8, n=3, seed=7)
    a = generate(tiny_model, ["you are", "the day"], config, progress=False)
    b = generate(tiny_model, ["you are", "the day"], config, progress=False)
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    c = generate(
        tiny_model, ["you are", "the day"], SamplingConfig(do_sample=True, n=3, seed=8), progress=False
    )
    assert c != a


@pytest.mark.parametrize("prompts", [[], [""], ["ok", "   "]])
def test_empty_prompts_are_rejected(tiny_model, prompts) -> None:
    with pytest.raises(DesteinError):
        generate(tiny_model, prompts, GREEDY)


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=0), dict(n=0), dict(top_p=0.0), dict(top_k=0), dict(temperature=0.0)]
)
def test_bad_sampling_config(kwargs) -> None:
    with pytest.raises(DesteinError):
        SamplingConfig(do_sample=True, **kwargs)


def _first_cached_step_matches_full_forward(model) -> None:
    tokens = model.to_tokens(["The quick brown fox jumps over the lazy"])
    with torch.no_grad():
        full = model(tokens)
        _, cache = model(tokens[:, :-1], past_key_values=DynamicCache(), return_type="logits_and_cache")
        step, _ = model(tokens[:, -1:], past_key_values=cache, return_type="logits_and_cache")
    assert (step[:, -1] - full[:, -1]).abs().max().item() <= 1e-4


def test_tiny_first_cached_step_equals_full_forward(tiny_model) -> None:
    _first_cached_step_matches_full_forward(tiny_model)


@pytest.mark.real
def test_real_first_cached_step_equals_full_forward(real_model) -> None:
    _first_cached_step_matches_full_forward(real_model)


@pytest.mark.real
def test_real_greedy_cache_and_padding(real_model) -> None:
    _greedy_checks(real_model)


@pytest.mark.real
def test_real_greedy_matches_hf_generate(real_model, hf_reference) -> None:
    prompt = real_model.tokenizer.decode(hf_reference["input_ids"][0], skip_special_tokens=True)
    ours = generate_ids(real_model, [prompt], GREEDY)
    uncached = generate_ids(
        real_model, [prompt], SamplingConfig(do_sample=False, max_new_tokens=20, use_cache=False)
    )
    assert torch.equal(ours, hf_reference["greedy"]) and torch.equal(uncached, ours)


@pytest.mark.parametrize(
    "kwargs", [{"top_p": 0.9}, {"top_k": 5, "top_p": 0.8}, {"top_k": 7}, {"temperature": 0.7}]
)
def test_sampler_matches_hf_warpers(kwargs) -> None:
    """Our topk-based nucleus sampler draws from the distribution HF's warpers define."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from destein_lens.generation import _sample

    config = SamplingConfig(do_sample=True, **kwargs)
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    ref = logits.clone()
    for warper, on in [
        (TemperatureLogitsWarper(config.temperature), config.temperature != 1.0),
        (TopKLogitsWarper(config.top_k or 1), config.top_k is not None),
        (TopPLogitsWarper(config.top_p or 1.0), config.top_p is not None),
    ]:
        ref = warper(None, ref) if on else ref
    ref = ref.softmax(-1)
    generator, n = torch.Generator().manual_seed(1), 20000
    counts = torch.zeros_like(ref)
    for _ in range(n // 100):
        draws = torch.stack([_sample(logits, config, generator) for _ in range(100)], 1)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=counts.dtype))
    assert not ((counts > 0) & (ref == 0)).any()  # never outside HF's support
    assert ((counts / n - ref).abs().sum(-1) / 2).max() < 0.02  # total variation, sampling noise
