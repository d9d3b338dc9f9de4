"""Steering: the three forms' math, heads and positions, hook hygiene, cache parity, the reference."""

from __future__ import annotations

import pytest
import reference_destein as ref
import torch
from transformers import GPT2LMHeadModel

from destein_lens import DesteinError, SamplingConfig
from destein_lens.activations import text_activations
from destein_lens.generation import generate_ids
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.probes import fit_probes
from destein_lens.steering import head_mask, steer
from destein_lens.vectors import DetoxVectors, build_vectors

PROMPT = "Thank you so much for the help you gave"
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=12)
LAYER1 = [(1, h) for h in range(4)]  # steer only the layer we read, so inputs stay the same


@pytest.fixture(scope="module")
def vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4)


@pytest.fixture(scope="module")
def slice_vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, site="attn_out_slices")


def _z(model, site="heads", **steering):
    """Layer-1 activations at the site's hook, with optional steering."""
    name = "blocks.1.attn.hook_z" if site == "heads" else "blocks.1.attn.hook_out"
    tokens = model.tokenizer([PROMPT], return_tensors="pt").input_ids
    if steering:
        with steer(model, **steering):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    else:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    return cache[name][0]


def test_alpha_zero_is_bit_identical(tiny_model, vectors) -> None:
    tokens = tiny_model.tokenizer([PROMPT], return_tensors="pt").input_ids
    plain = tiny_model(tokens)
    for form in ("destein", "released_code", "additive"):
        with steer(tiny_model, vectors, alpha=0.0, form=form):
            assert torch.equal(tiny_model(tokens), plain)


def test_destein_form_keeps_norms_and_moves_against_direction(tiny_model, vectors) -> None:
    before = _z(tiny_model)
    after = _z(tiny_model, vectors=vectors, alpha=0.5, heads=LAYER1)  # survives run_with_cache
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1), atol=1e-5)
    v = vectors.directions[1]
    cos = torch.nn.functional.cosine_similarity
    assert (cos(after, v.expand_as(after), dim=-1) < cos(before, v.expand_as(before), dim=-1)).all()


def test_additive_form_moves_by_alpha_w_v(tiny_model, vectors) -> None:
    before = _z(tiny_model)
    after = _z(tiny_model, vectors=vectors, alpha=0.3, form="additive", heads=[(1, 2)])
    expected = before.clone()
    expected[:, 2] -= 0.3 * vectors.head_weights[1, 2] * vectors.directions[1, 2]
    assert torch.allclose(after, expected, atol=1e-5)


def test_released_code_form_keeps_the_layer_norm(tiny_model, slice_vectors) -> None:
    before = _z(tiny_model, "attn_out_slices")
    after = _z(
        tiny_model, "attn_out_slices", vectors=slice_vectors, alpha=0.4, form="released_code", heads=LAYER1
    )
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(after, before)


def test_gated_form_with_a_gate_of_one_is_destein(tiny_model, vectors, monkeypatch) -> None:
    import destein_lens.forms as forms

    destein = _z(tiny_model, vectors=vectors, alpha=0.5, heads=LAYER1)
    monkeypatch.setattr(forms, "GATE_THRESHOLD", float("-inf"))  # sigmoid(+inf) = 1 exactly
    gated = _z(tiny_model, vectors=vectors, alpha=0.5, heads=LAYER1, form="destein-gated")
    assert torch.equal(gated, destein)


def test_gated_form_matches_a_plain_reference(tiny_model, vectors) -> None:
    """Per position and head: g = sigmoid(w . x + b), x' = |x| normalize(x/|x| - alpha (1 + acc) g v/|v|)."""
    x = _z(tiny_model)  # layer 1 is the only one steered, so its input is the unsteered one
    w, b = vectors.probe_weight[1], vectors.probe_bias[1]
    gate = torch.sigmoid((x * w).sum(-1) + b)[..., None]
    v = vectors.directions[1] / vectors.directions[1].norm(dim=-1, keepdim=True)
    scale = (0.5 * (1 + vectors.probe_accuracy[1]))[:, None]
    moved = x / x.norm(dim=-1, keepdim=True) - scale * gate * v
    expected = x.norm(dim=-1, keepdim=True) * moved / moved.norm(dim=-1, keepdim=True)
    got = _z(tiny_model, vectors=vectors, alpha=0.5, heads=LAYER1, form="destein-gated")
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, _z(tiny_model, vectors=vectors, alpha=0.5, heads=LAYER1), atol=1e-5)


def test_gated_form_needs_the_probes(tiny_model, vectors) -> None:
    old = DetoxVectors(**{**vectors.__dict__, "probe_weight": None, "probe_bias": None})
    with pytest.raises(DesteinError, match="needs the probes"):
        with steer(tiny_model, old, alpha=0.1, form="destein-gated"):
            pass


def test_head_selection(tiny_model, vectors) -> None:
    assert head_mask(vectors, "all").all()
    top = head_mask(vectors, 3)
    assert top.sum() == 3 and all(top[lh] for lh in vectors.ranking()[:3])
    before = _z(tiny_model)
    after = _z(tiny_model, vectors=vectors, alpha=0.5, heads=[(1, 0)])
    assert not torch.allclose(after[:, 0], before[:, 0]) and torch.equal(after[:, 1:], before[:, 1:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": float("nan")}, "finite"),
        ({"alpha": float("inf")}, "finite"),
        ({"alpha": 0.5, "heads": [(2, 0)]}, "out of range"),
        ({"alpha": 0.5, "heads": 99}, "between 1 and 8"),
        ({"alpha": 0.5, "heads": 0}, "at least 1"),
        ({"alpha": 0.5, "heads": []}, "empty head list"),
        ({"alpha": 1e9}, "within"),
        ({"alpha": 0.5, "form": "magic"}, "unknown steering form"),
        ({"alpha": 0.5, "positions": "middle"}, "positions must be"),
    ],
)
def test_bad_steering_arguments(tiny_model, vectors, kwargs, match) -> None:
    with pytest.raises(DesteinError, match=match):
        with steer(tiny_model, vectors, **kwargs):
            pass


def test_hooks_removed_on_exit_and_exception(tiny_model, vectors) -> None:
    tokens = tiny_model.tokenizer([PROMPT], return_tensors="pt").input_ids
    plain = tiny_model(tokens)
    with pytest.raises(RuntimeError):
        with steer(tiny_model, vectors, alpha=0.8):
            assert not torch.equal(tiny_model(tokens), plain)
            raise RuntimeError("boom")
    assert torch.equal(tiny_model(tokens), plain)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_greedy_same_with_and_without_cache(tiny_model, vectors, positions) -> None:
    prompts = [PROMPT, "you are"]
    with steer(tiny_model, vectors, alpha=1.0, positions=positions):
        cached = generate_ids(tiny_model, prompts, GREEDY)
        uncached = generate_ids(
            tiny_model, prompts, SamplingConfig(do_sample=False, max_new_tokens=12, use_cache=False)
        )
    assert torch.equal(cached, uncached)


def test_positions_select_prompt_or_generated(tiny_model, vectors) -> None:
    tokens = tiny_model.tokenizer([PROMPT], return_tensors="pt").input_ids
    plain = tiny_model(tokens)
    with steer(tiny_model, vectors, alpha=1.0, positions="generated"):
        assert torch.equal(tiny_model(tokens), plain)  # a plain forward is all prompt
    with steer(tiny_model, vectors, alpha=1.0, positions="prompt"):
        assert not torch.allclose(tiny_model(tokens), plain)

    def record(positions):
        seen = []
        hook = ("blocks.1.attn.hook_z", lambda act, hook: seen.append(act[:, -1].clone()))
        with (
            steer(tiny_model, vectors, alpha=1.0, positions=positions, heads=LAYER1),
            tiny_model.hooks([hook]),
        ):
            generate_ids(tiny_model, [PROMPT], SamplingConfig(do_sample=False, max_new_tokens=4))
        return seen

    baseline, generated, prompt = [], record("generated"), record("prompt")
    with tiny_model.hooks([("blocks.1.attn.hook_z", lambda act, hook: baseline.append(act[:, -1].clone()))]):
        generate_ids(tiny_model, [PROMPT], SamplingConfig(do_sample=False, max_new_tokens=4))
    # step 0 is the prefill (prompt positions), steps 1.. are one generated position each
    assert torch.equal(generated[0], baseline[0]) and not torch.allclose(prompt[0], baseline[0])
    assert all(not torch.allclose(g, b) for g, b in zip(generated[1:], baseline[1:]))


def test_wrong_model_vectors_refused(vectors, tiny_model_dir) -> None:
    from destein_lens import load_model

    compat = load_model(tiny_model_dir, device="cpu", compat=True)
    with pytest.raises(DesteinError, match="built on"):
        with steer(compat, vectors, alpha=0.5):
            pass


def test_released_code_path_matches_frozen_reference(tiny_model, tiny_model_dir) -> None:
    """The reference runs a separately loaded plain HF GPT-2; tolerances: 1e-5 on activations,
    exact probe accuracies (same sklearn estimator), 1e-4 on steered logits."""
    pairs = builtin_seed_pairs().head(20)
    v = build_vectors(
        tiny_model, pairs, k=8, site="attn_out_slices", probe_texts="prefixed", probe_method="sklearn"
    )
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    tok = tiny_model.tokenizer  # tokenisation is not the math under test; TL prepends BOS
    toxic, nontoxic = pairs.prefixed(*v.prefixes)
    ref_tox, ref_non = ref.head_out_means(hf, tok, toxic), ref.head_out_means(hf, tok, nontoxic)
    ours = text_activations(tiny_model, toxic, site="attn_out_slices")
    assert torch.allclose(ours.flatten(2), ref_tox, atol=1e-5)
    ref_dir = ref.directions(ref_tox, ref_non)
    assert torch.allclose(v.directions.flatten(1) * len(pairs), ref_dir, atol=1e-4)
    ref_acc = ref.probe_accuracies(ref_tox, ref_non, n_heads=4)
    ours_acc = fit_probes(
        torch.stack([ours, text_activations(tiny_model, nontoxic, site="attn_out_slices")], 1),
        method="sklearn",
        standardize=False,
    ).accuracy
    assert torch.equal(ours_acc, ref_acc)
    reference_vectors = DetoxVectors(**{**v.__dict__, "accuracy_prefixed": ref_acc})
    tokens = tok([PROMPT], return_tensors="pt").input_ids
    expected = ref.steered_logits(hf, tokens, ref_dir, ref_acc, alpha=0.45)
    with steer(tiny_model, reference_vectors, alpha=0.45, form="released_code"):
        got = tiny_model(tokens)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.real
def test_real_alpha_zero_and_cache_parity_under_steering(real_model) -> None:
    v = build_vectors(real_model, builtin_seed_pairs().head(12), progress=False)
    tokens = real_model.tokenizer([PROMPT], return_tensors="pt").input_ids
    plain = real_model(tokens)
    with steer(real_model, v, alpha=0.0):
        assert torch.equal(real_model(tokens), plain)
    prompts = [PROMPT, "I can't believe you would"]
    with steer(real_model, v, alpha=0.4, heads=8):
        cached = generate_ids(real_model, prompts, GREEDY)
        uncached = generate_ids(
            real_model, prompts, SamplingConfig(do_sample=False, max_new_tokens=12, use_cache=False)
        )
        assert not torch.allclose(real_model(tokens), plain)
    assert torch.equal(cached, uncached)


@pytest.mark.real
def test_real_gate_moves_benign_text_less_than_destein(real_model) -> None:
    v = build_vectors(real_model, builtin_seed_pairs().head(20), progress=False)
    tokens = real_model.tokenizer(["Thank you so much for the lovely dinner last night"], return_tensors="pt")
    plain = real_model(tokens.input_ids).log_softmax(-1)
    moved = {}
    for form in ("destein", "destein-gated"):
        with steer(real_model, v, alpha=0.1, form=form):
            steered = real_model(tokens.input_ids).log_softmax(-1)
        moved[form] = (steered.exp() * (steered - plain)).sum(-1).mean().item()  # mean KL(steered || plain)
    assert 0 < moved["destein-gated"] < moved["destein"]
