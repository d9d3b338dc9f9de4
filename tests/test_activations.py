"""Activations: shapes per site, batching invariance, the attn_out site, short texts."""

from __future__ import annotations

import pytest
import torch

from destein_lens import DesteinError
from destein_lens.activations import pair_activations, text_activations
from destein_lens.pairs import builtin_seed_pairs

TEXTS = [
    "You are a complete idiot and everyone knows it.",
    "Thank you so much for your help with the move yesterday.",
    "This damn printer never works when I need it.",
]


@pytest.mark.parametrize("site", ["heads", "attn_out_slices"])
def test_batched_equals_one_at_a_time(tiny_model, site) -> None:
    batched = text_activations(tiny_model, TEXTS, site=site, k=4, batch_size=8)
    singles = torch.cat([text_activations(tiny_model, [t], site=site, k=4) for t in TEXTS])
    assert batched.shape == (3, 2, 4, 16)
    assert torch.allclose(batched, singles, atol=1e-5)


def test_attn_out_slices_are_the_output_projection(tiny_model) -> None:
    """On GPT-2 the o_proj output equals hook_attn_out; slices tile it in head order."""
    tokens = tiny_model.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.hook_attn_out")
    expected = cache["blocks.1.hook_attn_out"][0, -4:].mean(0).reshape(4, 16)
    got = text_activations(tiny_model, TEXTS[:1], site="attn_out_slices", k=4)[0, 1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_pair_activations_layout(tiny_model) -> None:
    pairs = builtin_seed_pairs().head(5)
    acts = pair_activations(tiny_model, pairs, prefixes=None, k=4)
    assert acts.shape == (5, 2, 2, 4, 16)
    alone = text_activations(tiny_model, [pairs.nontoxic[2]], k=4)[0]
    assert torch.allclose(acts[2, 1], alone, atol=1e-5)


def test_short_text_and_bad_site(tiny_model) -> None:
    with pytest.raises(DesteinError, match="fewer than k=8"):
        text_activations(tiny_model, ["hi"], k=8)
    with pytest.raises(DesteinError, match="unknown site"):
        text_activations(tiny_model, TEXTS, site="mlp")  # type: ignore[arg-type]


@pytest.mark.real
@pytest.mark.parametrize("site,width", [("heads", 256), ("attn_out_slices", 160)])
def test_real_shapes_and_batching(real_model, site, width) -> None:
    batched = text_activations(real_model, TEXTS, site=site, batch_size=3)
    assert batched.shape == (3, 18, 4, width)
    single = text_activations(real_model, TEXTS[1:2], site=site)
    assert torch.allclose(batched[1], single[0], atol=1e-4)


def test_pooled_hooks_equal_a_full_forward(tiny_model) -> None:
    """Only the last position is unembedded while caching (`logits_to_keep=1`): the hooks are
    those of a plain forward's cache, whatever stops early."""
    from destein_lens.activations import hook_activations

    name = "blocks.1.attn.hook_z"
    tokens = tiny_model.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == name)
    want = cache[name][0, -4:].flatten(-2).mean(0)
    assert torch.allclose(hook_activations(tiny_model, TEXTS[:1], [name], k=4)[0, 0], want, atol=1e-6)
    early = hook_activations(tiny_model, TEXTS[:1], ["blocks.0.hook_resid_post"], k=4, stop_at_layer=1)
    assert early.shape == (1, 1, 64)
