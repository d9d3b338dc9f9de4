"""Head attribution studies: each against an independent reference on the tiny model, the study
folder (resume, refusals), and the studies on the real models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from destein_lens import DesteinError, cli
from destein_lens.attribution import (
    HeadEffects,
    StudySettings,
    agreement,
    direct_logit_attribution,
    gradient_effects,
    held_out,
    leave_one_out,
    load_study,
    parse_studies,
    patching_effects,
    rankings,
    run_study,
    score,
    selection_curves,
    steering_effects,
)
from destein_lens.attribution.effects import Checkpoint
from destein_lens.attribution.heldout import word_ids
from destein_lens.attribution.selection import crossfit_orders, fold_pairs
from destein_lens.attribution.study import held_out_pairs
from destein_lens.pairs import SteeringPairs, builtin_seed_pairs
from destein_lens.prompts import builtin_demo_prompts
from destein_lens.scoring import get_scorer
from destein_lens.steering import steer
from destein_lens.vectors import DetoxVectors, build_vectors

PARADETOX = Path(__file__).resolve().parents[2] / "shared" / "data" / "paradetox" / "paradetox.tsv"

K = 4


@pytest.fixture(scope="module")
def split() -> tuple[SteeringPairs, SteeringPairs]:
    train, rest = builtin_seed_pairs().split(0.6)
    return train, rest.head(8)


@pytest.fixture(scope="module")
def vectors(tiny_model, split) -> DetoxVectors:
    return build_vectors(tiny_model, split[0], k=K, progress=False)


@pytest.fixture(scope="module")
def held(tiny_model, split):
    return held_out(tiny_model, split[1], batch_size=3)  # several batches of different lengths


def _logprob_reference(model, text: str, toxic_ids: torch.Tensor, hooks=()) -> tuple[float, float]:
    """One text, no padding, log_softmax: the textbook computation."""
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        logp = torch.log_softmax(model(ids, return_type="logits")[0].double(), -1)
    own = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].mean()
    return float(own), float(torch.logsumexp(logp[-1, toxic_ids], -1))


def test_scores_match_one_unpadded_text_at_a_time(tiny_model, held, split) -> None:
    scores = score(tiny_model, held)
    assert sorted(torch.cat([b.index for b in held.batches]).tolist()) == list(range(len(split[1])))
    for i in range(len(split[1])):
        for side, texts in enumerate((split[1].toxic, split[1].nontoxic)):
            lp, lm = _logprob_reference(tiny_model, texts[i], held.toxic_ids)
            assert scores.logprob[side, i].item() == pytest.approx(lp, abs=1e-4)
            assert scores.toxic_logmass[side, i].item() == pytest.approx(lm, abs=1e-4)
    assert torch.equal(scores.gap, scores.logprob[0] - scores.logprob[1])


def test_word_ids_are_single_tokens(tiny_model) -> None:
    for kind in ("toxic", "neutral"):
        ids = word_ids(tiny_model.tokenizer, kind)
        assert len(ids) > 0
        decoded = [tiny_model.tokenizer.decode([i]).strip().lower() for i in ids.tolist()]
        assert all(decoded)


def _head_outputs(model, texts: tuple[str, str], layer: int) -> list[torch.Tensor]:
    """`hook_z` of `layer` for each text alone, unpadded: [pos, n_heads, d_head] each."""
    out = []
    for text in texts:
        _, cache = model.run_with_cache(model.tokenizer(text, return_tensors="pt").input_ids)
        out.append(cache[f"blocks.{layer}.attn.hook_z"][0])
    return out


def test_steering_and_leave_one_out_are_the_changes_in_gap(tiny_model, vectors, held) -> None:
    base = score(tiny_model, held)
    effects = steering_effects(tiny_model, vectors, held, baseline=base, progress=False)
    with steer(tiny_model, vectors, alpha=0.1, heads=[(1, 2)]):
        steered = score(tiny_model, held)
    assert torch.allclose(effects["steering"].values[1, 2], base.gap - steered.gap, atol=1e-6)
    assert effects["steering"].values.abs().max() > 0

    loo = leave_one_out(tiny_model, vectors, held, progress=False)["leave_one_out"]
    with steer(tiny_model, vectors, alpha=0.1):
        full = score(tiny_model, held).gap
    rest = [(layer, head) for layer in range(2) for head in range(4) if (layer, head) != (0, 3)]
    with steer(tiny_model, vectors, alpha=0.1, heads=rest):
        without = score(tiny_model, held).gap
    assert torch.allclose(loo.values[0, 3], without - full, atol=1e-6)


def test_zero_strength_gives_exactly_zero(tiny_model, vectors, held) -> None:
    effects = steering_effects(tiny_model, vectors, held, alpha=0.0, progress=False)
    assert torch.equal(effects["steering"].values, torch.zeros(2, 4, len(held)))


def test_patching_matches_a_per_pair_reference(tiny_model, held, split) -> None:
    """Each pair alone, unpadded: the twin's head output copied position by position from the end."""
    result = patching_effects(tiny_model, held, k=K, progress=False)
    layer, head = 1, 3
    for i in range(len(split[1])):
        texts = (split[1].toxic[i], split[1].nontoxic[i])
        z = _head_outputs(tiny_model, texts, layer)
        gaps, masses = [], []
        for side in (0, 1):
            own, twin = z[side], z[1 - side]
            span = min(K, len(own), len(twin))

            def hook(act, hook, own=own, twin=twin, span=span):
                act = act.clone()
                for j in range(span):
                    act[0, len(own) - 1 - j, head] = twin[len(twin) - 1 - j, head]
                return act

            hooks = [(f"blocks.{layer}.attn.hook_z", hook)]
            patched = _logprob_reference(tiny_model, texts[side], held.toxic_ids, hooks)
            plain = _logprob_reference(tiny_model, texts[side], held.toxic_ids)
            gaps.append(plain[0] - patched[0])
            masses.append((plain[1], patched[1]))
        assert result["patching"].values[layer, head, i].item() == pytest.approx(gaps[0] - gaps[1], abs=1e-4)
        denoise = masses[0][0] - masses[0][1]
        noise = masses[1][1] - masses[1][0]
        assert result["patching_denoise_mass"].values[layer, head, i].item() == pytest.approx(
            denoise, abs=1e-4
        )
        assert result["patching_noise_mass"].values[layer, head, i].item() == pytest.approx(noise, abs=1e-4)


@pytest.mark.parametrize("form", ["destein-gated", "released_code"])  # per head and gated; whole layer
def test_gradient_steering_is_the_exact_studys_first_order_term(tiny_model, vectors, held, form) -> None:
    """Central differences over the strength remove every even-order term of both sides: what is
    left of the exact study is its first-order term (plus O(a^3)), which the estimate must equal."""
    a = 0.05

    def odd(f):
        return (f(a) - f(-a)) / 2

    exact = odd(
        lambda s: (
            steering_effects(tiny_model, vectors, held, alpha=s, form=form, progress=False)["steering"].values
        )
    )
    estimate = odd(
        lambda s: (
            gradient_effects(tiny_model, vectors, held, k=K, alpha=s, form=form, progress=False)[
                "atp_steering"
            ].values
        )
    )
    assert exact.abs().max() > 1e-4
    torch.testing.assert_close(estimate, exact, rtol=0.02, atol=0.02 * float(exact.abs().max()))


def test_atp_patching_is_the_derivative_along_the_exchange(tiny_model, vectors, held, split) -> None:
    """Each pair alone, unpadded: d/dt of the gap as head (1, 3) moves a fraction t of the way to
    its twin's output over the aligned window, by central differences."""
    result = gradient_effects(tiny_model, vectors, held, k=K, progress=False)
    layer, head, t = 1, 3, 1e-2
    for i in range(len(split[1])):
        texts = (split[1].toxic[i], split[1].nontoxic[i])
        z = _head_outputs(tiny_model, texts, layer)
        slopes = []
        for side in (0, 1):
            own, twin = z[side], z[1 - side]
            span = min(K, len(own), len(twin))
            values = []
            for step in (t, -t):

                def hook(act, hook, own=own, twin=twin, span=span, step=step):
                    act = act.clone()
                    for j in range(span):
                        p, q = len(own) - 1 - j, len(twin) - 1 - j
                        act[0, p, head] += step * (twin[q, head] - own[p, head])
                    return act

                hooks = [(f"blocks.{layer}.attn.hook_z", hook)]
                values.append(_logprob_reference(tiny_model, texts[side], held.toxic_ids, hooks)[0])
            slopes.append((values[0] - values[1]) / (2 * t))
        expected = -slopes[0] + slopes[1]  # the toxic run moves to its twin (down), the other up
        assert result["atp_patching"].values[layer, head, i].item() == pytest.approx(
            expected, rel=1e-2, abs=1e-5
        )


def test_dla_matches_finite_differences(tiny_model, vectors, held, split) -> None:
    """The direct path by finite differences of the real final norm, in float64, for one pair."""
    dla = direct_logit_attribution(tiny_model, vectors, held, k=K)
    assert dla.effects.values.shape == (2, 4, len(held))
    assert dla.top_ids.shape == dla.top_logits.shape == (2, 4, 2, 10)
    assert (dla.top_logits[..., 0, :] >= dla.top_logits[..., 1, :].max(-1, keepdim=True).values).all()
    tok = tiny_model.tokenizer
    i, layer, head = 2, 1, 0
    caches = []
    for text in (split[1].toxic[i], split[1].nontoxic[i]):
        _, cache = tiny_model.run_with_cache(tok(text, return_tensors="pt").input_ids)
        caches.append(cache)
    n = [c[f"blocks.{layer}.attn.hook_z"].shape[1] for c in caches]
    span = min(K, *n)
    z_mean = [c[f"blocks.{layer}.attn.hook_z"][0, -span:, head].double().mean(0) for c in caches]
    written = (z_mean[0] - z_mean[1]) @ tiny_model.W_O[layer, head].double()
    norm = copy.deepcopy(tiny_model.ln_final.original_component).double()
    x = caches[0]["ln_final.hook_in"][0, -span:].double()
    eps = 1e-6
    with torch.no_grad():
        direct = ((norm(x + eps * written) - norm(x - eps * written)) / (2 * eps)).mean(0)
    unembed = tiny_model.W_U.double()
    toxic, neutral = word_ids(tok, "toxic"), word_ids(tok, "neutral")
    expected = float(direct @ (unembed[:, toxic].mean(-1) - unembed[:, neutral].mean(-1)))
    assert dla.effects.values[layer, head, i].item() == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_rankings() -> None:
    vectors = type("V", (), {"shape": (2, 4), "ranking": lambda self: [(0, 0)]})()
    orders = rankings(vectors, torch.arange(8.0).reshape(2, 4), seeds=(0, 1))
    assert list(orders) == ["probe", "causal", "random-0", "random-1"]
    assert orders["causal"][:2] == [(1, 3), (1, 2)] and orders["probe"] == [(0, 0)]
    assert orders["random-0"] != orders["random-1"] and sorted(orders["random-0"]) == sorted(orders["causal"])


def test_crossfitted_selection_curves(tiny_model, vectors, split) -> None:
    """Each fold steers the causal heads ranked on the other fold's pairs, never on its own."""
    folds = fold_pairs(split[1])
    assert [len(f) for f in folds] == [4, 4] and folds[0].toxic + folds[1].toxic == split[1].toxic
    steering = torch.zeros(2, 4, 8)
    steering[1, 3, :4] = 1.0  # fold 0's pairs favour head (1, 3), fold 1's favour (0, 2)
    steering[0, 2, 4:] = 1.0
    orders = crossfit_orders(vectors, HeadEffects("steering", steering, "u", ""), [4, 4], seeds=(0,))
    assert orders[0]["causal"][0] == (0, 2) and orders[1]["causal"][0] == (1, 3)
    helds = [held_out(tiny_model, f, batch_size=3) for f in folds]
    curves = selection_curves(tiny_model, vectors, helds, orders, ks=(1, 2, 32), progress=False)
    assert curves.ks == (1, 2, 8) and curves.effect.shape == (3, 3, 8)  # k past the heads dropped
    all_heads = curves.effect[:, -1]
    assert torch.equal(all_heads, all_heads[:1].expand_as(all_heads))  # every ranker's "all" is one set
    base = score(tiny_model, helds[1]).gap
    with steer(tiny_model, vectors, alpha=curves.alpha, heads=orders[1]["causal"][:2]):
        expected = base - score(tiny_model, helds[1]).gap
    assert torch.allclose(curves.effect[1, 1, 4:], expected, atol=1e-6)


def test_agreement_against_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a = HeadEffects("a", torch.randn(3, 4, 12, generator=gen), "u", "")
    b = HeadEffects("b", a.values + 0.5 * torch.randn(3, 4, 12, generator=gen), "u", "")
    fixed = torch.randn(3, 4, generator=gen)
    result = agreement({"fixed": fixed, "a": a, "b": b}, k=4)
    means = [fixed.flatten(), a.mean().flatten(), b.mean().flatten()]
    for i in range(3):
        for j in range(3):
            rho = spearmanr(means[i].numpy(), means[j].numpy()).statistic
            assert result.spearman[i, j].item() == pytest.approx(rho, abs=1e-6)
            top = [set(np.argsort(-m.numpy())[:4].tolist()) for m in (means[i], means[j])]
            assert result.overlap[i, j].item() == pytest.approx(len(top[0] & top[1]) / 4)
    assert (result.spearman_low <= result.spearman + 1e-6).all()
    assert (result.spearman <= result.spearman_high + 1e-6).all()
    assert result.spearman_low[0, 0] == result.spearman_high[0, 0] == 1.0
    with pytest.raises(DesteinError, match="top-k"):
        agreement({"a": a}, k=13)
    with pytest.raises(DesteinError, match="per-pair"):
        agreement({"fixed": fixed})


def test_effects_interval_and_ranking() -> None:
    values = torch.zeros(1, 2, 50)
    values[0, 1] = 1.0 + 0.1 * torch.randn(50, generator=torch.Generator().manual_seed(0))
    e = HeadEffects("s", values, "u", "")
    low, high = e.interval()
    assert low[0, 1] > 0.9 and high[0, 1] < 1.1 and low[0, 0] == high[0, 0] == 0
    assert e.ranking() == [(0, 1), (0, 0)]


def test_checkpoint_resumes_finished_cells(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    ckpt = Checkpoint(path, every=0.0)
    ckpt.get_or_compute("a", lambda: torch.ones(2))
    again = Checkpoint(path)
    assert torch.equal(again.get_or_compute("a", lambda: pytest.fail("recomputed")), torch.ones(2))
    again.clear()
    assert not path.exists()


def test_study_folder_runs_resumes_and_refuses_another(
    tiny_model, vectors, split, tmp_path: Path, word_length
) -> None:
    out = tmp_path / "study"
    settings = StudySettings(
        selection_ks=(1, 2), random_seeds=(0,), eval_ks=(2,), eval_samples=1, eval_tokens=3
    )
    prompts = builtin_demo_prompts()[:2]
    results = run_study(
        tiny_model, vectors, split[1], out, settings=settings, prompts=prompts, progress=False
    )
    assert set(results.effects) >= {
        "patching",
        "dla",
        "atp_patching",
        "atp_steering",
        "steering",
        "leave_one_out",
    }
    assert {"atp_patching", "atp_steering"} <= set(results.agreement.rankings)
    assert results.selection is not None and results.agreement is not None
    assert set(results.evaluation) >= {"baseline", "probe-top2", "causal-top2", "random-0-top2"}
    report = (out / "report.md").read_text()
    for heading in ("## Effects", "## Agreement", "## Selection curves", "causal - probe", "relative depth"):
        assert heading in report
    assert not list((out / ".partial").iterdir())  # finished studies leave no checkpoints
    stamp = (out / "patching.safetensors").stat().st_mtime_ns
    again = run_study(tiny_model, vectors, split[1], out, settings=settings, prompts=prompts, progress=False)
    assert (out / "patching.safetensors").stat().st_mtime_ns == stamp  # resumed: nothing redone
    assert torch.equal(again.effects["steering"].values, results.effects["steering"].values)
    gens = out / "selection_eval" / "prompted_gens_baseline.jsonl"
    written = gens.read_bytes()
    rescored = run_study(
        tiny_model,
        vectors,
        split[1],
        out,
        settings=settings,
        prompts=prompts,
        scorers=[get_scorer("profanity-check"), word_length],
        progress=False,
    )  # a second scorer on a finished folder scores the stored texts, generating nothing
    assert gens.read_bytes() == written
    assert set(rescored.evaluation["baseline"]["by_scorer"]) == {"profanity-check", word_length.name}
    assert f"EMT ({word_length.name})" in (out / "report.md").read_text()
    loaded = load_study(out)
    assert torch.equal(loaded.effects["dla"].values, results.effects["dla"].values)
    assert loaded.dla.top_tokens == results.dla.top_tokens
    with pytest.raises(DesteinError, match="another run"):
        run_study(tiny_model, vectors, split[1].head(6), out, settings=settings, progress=False)
    with pytest.raises(DesteinError, match="held-out pairs are the pairs"):
        run_study(tiny_model, vectors, split[0], tmp_path / "other", progress=False)
    with pytest.raises(DesteinError, match="not an attribution study"):
        load_study(tmp_path)


def test_parse_studies() -> None:
    assert parse_studies("all") == ("patching", "dla", "gradient", "steering", "leave_one_out", "selection")
    assert parse_studies("selection") == ("steering", "selection")  # selection ranks by steering
    assert parse_studies("dla,patching") == ("patching", "dla")
    with pytest.raises(DesteinError, match="unknown study"):
        parse_studies("probing")


def test_held_out_pairs_skip_the_vectors_pairs(split) -> None:
    seeds = builtin_seed_pairs()
    held = held_out_pairs("builtin", 5, split[0])
    assert len(held) == 5 and not set(held.toxic) & set(split[0].toxic)
    assert held.toxic[0] == seeds.toxic[len(split[0])]
    with pytest.raises(DesteinError, match="no pair"):
        held_out_pairs("builtin", 5, seeds)


def test_cli_attribute_then_cross_model_figures(tiny_model_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    """The command on the tiny model, twice (two "models"), then one figures call over both.

    HTML only: PNG export is `test_figures`' subject, and here it would cost a browser start a figure."""
    from destein_lens import figures

    saver = figures._Saver
    monkeypatch.setattr(figures, "_Saver", lambda out, formats: saver(out, ("html",)))
    pairs = tmp_path / "pairs.jsonl"
    builtin_seed_pairs().head(30).to_jsonl(pairs)
    folders = [tmp_path / "a", tmp_path / "b"]
    for k, out in zip((4, 3), folders):
        argv = ["attribute", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--k", str(k)]
        argv += ["--held-out", "builtin", "--n-held-out", "4", "--study", "patching,dla", "--out", str(out)]
        cli.main(argv)
        assert (out / "report.md").exists() and (out / "figures" / "grid_patching.html").exists()
        assert (out / "figures" / "README.md").exists()
    assert "figure files" in capsys.readouterr().out
    cli.main(["figures", "--attribution", *map(str, folders), "--out", str(tmp_path / "cross")])
    names = {p.name for p in (tmp_path / "cross").iterdir()}
    assert {
        "depth_patching.html",
        "depth_dla.html",
        "README.md",
        "tinym",
    } <= names or "depth_patching.html" in names


@pytest.mark.real
def test_real_model_studies(real_model, tmp_path: Path) -> None:
    train = builtin_seed_pairs().head(40)
    held = held_out_pairs(str(PARADETOX) if PARADETOX.is_file() else "builtin", 3, train)
    vectors = build_vectors(real_model, train, progress=False)
    # The per-head exact studies cost a forward per head (notebook 03 runs exact steering on the
    # real model); here the studies that cost a few forwards.
    results = run_study(
        real_model, vectors, held, tmp_path / "s", studies=("dla", "gradient"), progress=False
    )
    for name in ("atp_patching", "atp_steering", "dla"):
        values = results.effects[name].values
        assert values.shape == (18, 4, 3) and torch.isfinite(values).all() and (values != 0).any()
    assert torch.isfinite(results.agreement.spearman[0, 1:]).all()
    assert all(isinstance(t, str) for t in results.dla.top_tokens[0][0][0])
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model"]["name"] == "gemma-3-270m" and config["held_out"]["n"] == 3
