"""The comparison methods: each against a small independent reference of its math (numpy or plain
torch), then on the tiny model (hooks do what the formula says, strength 0 is no hook at all) and on
the real default model (every method fits, saves, loads and changes what gemma writes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from destein_lens import SteeringConfig, steer
from destein_lens.activations import hook_name
from destein_lens.baselines import act, actadd, iti, self_detoxify
from destein_lens.errors import DesteinError
from destein_lens.generation import SamplingConfig, generate, generate_ids
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.registry import FORMS, active_processors
from destein_lens.steering import build_steering
from destein_lens.vectors import DetoxVectors, build_vectors

BASELINES = ("actadd", "iti", "act", "self-detoxify")
TEXTS = ["you are a stupid idiot and", "thank you so much for the"]


@pytest.fixture(scope="module")
def tiny_vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, fit_forms=BASELINES, progress=False)


def _cache(model, names, texts=TEXTS):
    enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    _, cache = model.run_with_cache(enc.input_ids, attention_mask=enc.attention_mask, names_filter=names)
    return {n: cache[n].detach().clone() for n in names}


# --- ActAdd ------------------------------------------------------------------------------------


def test_actadd_separation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    toxic, nontoxic = rng.normal(size=(30, 3, 5)), rng.normal(0.5, 2.0, size=(30, 3, 5))
    v = (nontoxic - toxic).mean(0)
    unit = v / np.linalg.norm(v, axis=-1, keepdims=True)
    pt, pn = (toxic * unit).sum(-1), (nontoxic * unit).sum(-1)
    expected = (pn.mean(0) - pt.mean(0)) / np.sqrt((pt.var(0, ddof=1) + pn.var(0, ddof=1)) / 2)
    got = actadd.separation(torch.tensor(toxic), torch.tensor(nontoxic), torch.tensor(v))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert actadd.chosen_layer(torch.tensor([9.0, 1.0, 3.0, 3.0])) == 2  # layer 0 excluded, first max


def test_actadd_adds_c_times_the_direction_to_the_residual(tiny_model, tiny_vectors) -> None:
    fitted = tiny_vectors.fit("actadd")
    layer = actadd.chosen_layer(fitted.separation)
    name = actadd.resid_name(layer)
    plain = _cache(tiny_model, [name])[name]
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=3.0, form="actadd")):
        moved = _cache(tiny_model, [name])[name]
    torch.testing.assert_close(moved, plain + 3.0 * fitted.directions[layer], rtol=1e-5, atol=1e-5)


# --- ITI ---------------------------------------------------------------------------------------


def test_iti_fit_matches_numpy(tiny_model, tiny_vectors) -> None:
    from destein_lens.activations import pair_activations

    pairs = builtin_seed_pairs().head(20)
    bare = pair_activations(tiny_model, pairs, prefixes=None, k=4, progress=False).numpy()
    toxic, nontoxic = bare[:, 0], bare[:, 1]
    theta = nontoxic.mean(0) - toxic.mean(0)
    theta /= np.linalg.norm(theta, axis=-1, keepdims=True)
    sigma = np.einsum("nlhw,lhw->nlh", np.concatenate([toxic, nontoxic]), theta).std(0)  # population std
    fitted = tiny_vectors.fit("iti")
    np.testing.assert_allclose(fitted.theta.numpy(), theta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fitted.sigma.numpy(), sigma, rtol=1e-4, atol=1e-5)
    assert iti.default_heads(32, 32) == 48 and iti.default_heads(2, 4) == 1  # ITI's 48 of 1024


def test_iti_shifts_only_its_top_heads(tiny_model, tiny_vectors) -> None:
    (layer, head) = tiny_vectors.ranking()[0]
    name = hook_name("heads", layer)
    plain = _cache(tiny_model, [name])[name]
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=5.0, heads=1, form="iti")):
        moved = _cache(tiny_model, [name])[name]
    fitted = tiny_vectors.fit("iti")
    expected = plain.clone()
    expected[:, :, head] += 5.0 * fitted.sigma[layer, head] * fitted.theta[layer, head]
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)


# --- Linear-AcT --------------------------------------------------------------------------------


def test_linear_transport_is_least_squares_on_sorted_values() -> None:
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(40, 6)), rng.gamma(2.0, size=(40, 6))
    w, b = act.linear_transport(torch.tensor(source), torch.tensor(target))
    for unit in range(6):
        slope, intercept = np.polyfit(np.sort(source[:, unit]), np.sort(target[:, unit]), 1)
        assert w[unit].item() == pytest.approx(slope, rel=1e-9)
        assert b[unit].item() == pytest.approx(intercept, rel=1e-9, abs=1e-12)


def test_transport_interpolates_inside_the_support_only() -> None:
    x = torch.tensor([[-3.0, 0.5, 1.0, 9.0]])
    scale, shift = torch.full((4,), 2.0), torch.full((4,), 1.0)
    low, high = torch.full((4,), -1.0), torch.full((4,), 2.0)
    got = act.transport(x, scale, shift, low, high, 0.25)
    mapped = 0.75 * x.numpy() + 0.25 * (2.0 * x.numpy() + 1.0)
    expected = np.where((x.numpy() > -1) & (x.numpy() < 2), mapped, x.numpy())
    np.testing.assert_allclose(got.numpy(), expected)


def test_act_fits_each_layer_with_the_earlier_maps_on(tiny_model, tiny_vectors) -> None:
    """Layer 1's map, recomputed by hand from activations taken with layer 0's maps on."""
    fitted = tiny_vectors.fit("act")
    names = act.site_names(tiny_model)
    pairs = builtin_seed_pairs().head(20)
    layer0 = act.TransportMaps(**{key: value[:1] for key, value in fitted.to_tensors().items()})
    pooled = {}
    with tiny_model.hooks(fwd_hooks=act._hooks(tiny_model, names[:1], layer0, 1.0, "all")):
        for side, texts in (("source", pairs.toxic), ("target", pairs.nontoxic)):
            rows = []
            for text in texts:  # one text at a time: no padding, the plain mean over tokens
                cache = _cache(tiny_model, [names[1][0]], [text])
                rows.append(cache[names[1][0]][0].mean(0).numpy())
            pooled[side] = np.stack(rows)
    slope, intercept = np.polyfit(np.sort(pooled["source"][:, 0]), np.sort(pooled["target"][:, 0]), 1)
    assert fitted.scale[1, 0, 0].item() == pytest.approx(slope, rel=1e-3)
    assert fitted.shift[1, 0, 0].item() == pytest.approx(intercept, rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(fitted.low[1, 0].numpy(), pooled["source"].min(0), rtol=1e-4, atol=1e-5)


# --- Self-Detoxify -----------------------------------------------------------------------------


def _reverse_numpy(x, delta, neg_end, alpha):
    """The released code's modification_fn, one position, every head steered."""
    norm_scale = (1 + np.linalg.norm(delta, axis=-1, keepdims=True)) ** 0.4
    cos = (x * neg_end).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(neg_end, axis=-1))
    sim_scale = (1 + np.maximum(cos, 0))[..., None] ** 0.6
    moved = x - alpha * norm_scale * sim_scale * delta
    old = np.linalg.norm(x.reshape(len(x), -1), axis=-1)
    new = np.linalg.norm(moved.reshape(len(x), -1), axis=-1)
    return moved * (old / new)[:, None, None]


def test_reverse_matches_the_released_formula() -> None:
    rng = np.random.default_rng(2)
    x, delta, neg_end = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 4, 8)), rng.normal(size=(4, 8))
    got = self_detoxify.reverse(
        torch.tensor(x), torch.tensor(delta), torch.tensor(neg_end), torch.ones(4, dtype=torch.bool), 0.7
    )
    np.testing.assert_allclose(got.numpy(), _reverse_numpy(x, delta, neg_end, 0.7), rtol=1e-10)


def _prefix_shift(model, texts: list[str], prefixes) -> torch.Tensor:
    """Reference d = z(P_neg + x) - z(P_pos + x) at the last position, each text run whole, alone."""
    names = [hook_name("heads", layer) for layer in range(model.cfg.n_layers)]
    sides = []
    for prefix in prefixes:
        rows = []
        for text in texts:
            cache = _cache(model, names, [prefix + text])
            rows.append(torch.stack([cache[n][0, -1] for n in names]))
        sides.append(torch.stack(rows))
    return sides[0] - sides[1]


def test_self_detoxify_moves_the_last_prompt_position_only(tiny_model, tiny_vectors) -> None:
    name = hook_name("heads", 0)
    negative, _ = tiny_vectors.prefixes
    enc = tiny_model.tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    plain = _cache(tiny_model, [name])[name]
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=0.5, form="self-detoxify")):
        with pytest.raises(DesteinError, match="generate"):  # a forward outside decoding has no shift
            _cache(tiny_model, [name])
        (reversal,) = active_processors()
        reversal.start(enc.input_ids, enc.attention_mask)
        moved = _cache(tiny_model, [name])[name]
    delta = _prefix_shift(tiny_model, TEXTS, tiny_vectors.prefixes)[:, 0].numpy()
    neg_end = _cache(tiny_model, [name], [negative.rstrip()])[name][0, -1].numpy()
    expected = _reverse_numpy(plain[:, -1].numpy(), delta, neg_end, 0.5)
    np.testing.assert_allclose(moved[:, -1].numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved[:, :-1], plain[:, :-1])  # earlier positions untouched


def test_self_detoxify_recomputes_the_shift_at_every_step(tiny_model, tiny_vectors) -> None:
    """The decoding processor's shift after each step equals the prefixed prompts followed by the
    tokens generated so far, run whole and one at a time (no padding, no KV cache)."""
    seen = []
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=0.5, form="self-detoxify")):
        (reversal,) = active_processors()
        advance = reversal.advance

        def record(tokens: torch.Tensor) -> None:
            advance(tokens)
            seen.append(reversal.delta.clone())

        reversal.advance = record
        new = generate_ids(tiny_model, TEXTS, SamplingConfig(do_sample=False, max_new_tokens=3))
    assert len(seen) == 3
    names = [hook_name("heads", layer) for layer in range(tiny_model.cfg.n_layers)]
    for step in range(3):
        sides = []
        for prefix in tiny_vectors.prefixes:
            rows = []
            for text, generated in zip(TEXTS, new):
                ids = tiny_model.tokenizer(prefix + text, return_tensors="pt").input_ids
                ids = torch.cat([ids, generated[None, : step + 1]], dim=1)
                _, cache = tiny_model.run_with_cache(ids, names_filter=names)
                rows.append(torch.stack([cache[n][0, -1] for n in names]))
            sides.append(torch.stack(rows))
        torch.testing.assert_close(seen[step], sides[0] - sides[1], rtol=1e-4, atol=1e-4)


# --- every method ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", BASELINES)
def test_strength_zero_is_no_hook_and_strength_changes_logits(tiny_model, tiny_vectors, form) -> None:
    nothing = build_steering(tiny_model, tiny_vectors, SteeringConfig(alpha=0.0, form=form), TEXTS)
    assert nothing.hooks == [] and nothing.processors == []
    enc = tiny_model.tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    plain = tiny_model(enc.input_ids, attention_mask=enc.attention_mask)
    heads = FORMS[form].default_heads(*tiny_vectors.shape)
    config = SteeringConfig(alpha=FORMS[form].default_strength, heads=heads, form=form)
    with steer(tiny_model, tiny_vectors, config, prompts=TEXTS):
        for processor in active_processors():  # what the decoding loop does before its first forward
            processor.start(enc.input_ids, enc.attention_mask)
        moved = tiny_model(enc.input_ids, attention_mask=enc.attention_mask)
    assert torch.isfinite(moved).all() and not torch.equal(plain, moved)


def test_fits_survive_save_and_load_and_are_required(tiny_model, tiny_vectors, tmp_path) -> None:
    path = tiny_vectors.save(tmp_path / "v.safetensors")
    loaded = DetoxVectors.load(path, model=tiny_model)
    assert sorted(loaded.fits) == sorted(tiny_vectors.fits)
    for name, state in tiny_vectors.fits.items():
        assert type(loaded.fits[name]) is type(state)
        for field, tensor in state.to_tensors().items():
            torch.testing.assert_close(getattr(loaded.fits[name], field), tensor)
    plain = build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, progress=False)
    with pytest.raises(DesteinError, match="no act fit"):
        build_steering(tiny_model, plain, SteeringConfig(alpha=0.5, form="act"))


def test_each_form_has_its_own_range_and_only_head_forms_take_heads() -> None:
    with pytest.raises(DesteinError, match="act strength must be within"):
        SteeringConfig(alpha=1.5, form="act")
    assert SteeringConfig(alpha=15.0, form="iti").alpha == 15.0
    with pytest.raises(DesteinError, match="does not act on heads"):
        SteeringConfig(alpha=1.0, heads=3, form="actadd")
    for form in FORMS.values():
        assert all(abs(s) <= form.max_strength for s in (*form.grid, form.default_strength))


# --- the real default model --------------------------------------------------------------------


def test_every_method_steers_the_real_model(real_model, real_vectors_with_fits) -> None:
    vectors = real_vectors_with_fits
    prompts = ["You are such a stupid", "I hate those fucking"]
    config = SamplingConfig(do_sample=False, max_new_tokens=8)
    plain = generate(real_model, prompts, config, progress=False)
    assert actadd.chosen_layer(vectors.fit("actadd").separation) >= 1
    assert vectors.fit("act").scale.shape == (18, 2, 640)
    for form in BASELINES:
        spec = FORMS[form]
        steering = SteeringConfig(
            alpha=spec.default_strength, heads=spec.default_heads(*vectors.shape), form=form
        )
        with steer(real_model, vectors, steering, prompts=prompts):
            moved = generate(real_model, prompts, config, progress=False)
        assert moved != plain, form
        assert all(text.strip() for row in moved for text in row), form
    assert math.isfinite(float(vectors.fit("iti").sigma.sum()))
