"""Goodtriever, the kNN-LM decoding-time method, on the tiny model: each step's logits against the
reference's formulas in numpy (keys read where the reference reads them, distances by brute force),
strength 0 as the unsteered model, the datastore cache, resume and a two-rank launch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from recorded import recorded_logits
from safetensors import safe_open
from test_distributed import DRIVER, _finish, _launch  # the launch helpers every launch test uses

from destein_lens import SteeringConfig, cli, figures, steer
from destein_lens.baselines import datastore, goodtriever
from destein_lens.errors import DesteinError
from destein_lens.evaluation import MethodSpec, eval_config, evaluate
from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.pairs import SteeringPairs, builtin_seed_pairs
from destein_lens.prompts import Prompt
from destein_lens.registry import active_processors
from destein_lens.runfolder import gens_path
from destein_lens.steering import build_steering
from destein_lens.vectors import DetoxVectors, build_vectors

TEXTS = ["you are a stupid idiot and", "thank you"]  # different lengths: the batch is left-padded
SAMPLED = SamplingConfig(do_sample=True, max_new_tokens=5, top_p=0.9, seed=3)
PAIRS = builtin_seed_pairs().head(12)


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Each test builds its datastores in a cache of its own."""
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "cache"))
    datastore._open.cache_clear()
    yield tmp_path / "cache" / "datastores"
    datastore._open.cache_clear()


@pytest.fixture(scope="module")
def tiny_vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, PAIRS, k=4, fit_forms=("goodtriever",), progress=False)


# --- the reference's computation, in numpy -----------------------------------------------------


def _last_ffn_inputs(model, ids: list[int]) -> np.ndarray:
    """The input of the last block's MLP at every position of `ids`, run alone: the reference's
    `KEY_TYPE.last_ffn_input` capture on GPT-2 (`model.base_model.h[-1].mlp`, its input)."""
    seen = []
    mlp = model.original_model.transformer.h[-1].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0][0].float().numpy()


def _datastore(model, texts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    keys, values = [], []
    for text in texts:
        ids = model.tokenizer(text).input_ids
        keys.append(_last_ffn_inputs(model, ids)[:-1])
        values.append(np.array(ids[1:]))
    return np.concatenate(keys), np.concatenate(values)


def _knn_log_probs(query, keys, values, k: int, temperature: float, vocab: int) -> np.ndarray:
    """`get_knns` (brute force) and `knns_to_log_prob`, then `patch_log_probs` (on one row)."""
    distances = ((keys - query) ** 2).sum(-1)
    order = np.argsort(distances, kind="stable")
    assert k >= len(order) or distances[order[k - 1]] < distances[order[k]], "a tie at the k-th key"
    nearest = order[:k]
    weights = np.exp(
        -distances[nearest] / temperature - np.logaddexp.reduce(-distances[nearest] / temperature)
    )
    probs = np.zeros(vocab)
    np.add.at(probs, values[nearest], weights)
    with np.errstate(divide="ignore"):
        log_probs = np.nan_to_num(np.log(probs), neginf=-10000.0)
    log_probs[log_probs <= -50] = log_probs[log_probs > -50].min()
    return log_probs


def _top_p_filter(log_probs: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' `TopPLogitsWarper` (`top_k_top_p_filtering(logits, top_p=...)`), on one row."""
    order = np.argsort(log_probs, kind="stable")  # ascending
    probs = np.exp(log_probs[order] - np.logaddexp.reduce(log_probs))
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False
    out = log_probs.copy()
    out[order[remove]] = -np.inf
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x[np.isfinite(x)])


def _by_hand(logits, query, stores, alpha: float, k: int, temperature: float) -> np.ndarray:
    """`KNNWrapper.ensemble`: log_softmax(lm + alpha (kNN non-toxic - kNN toxic))."""
    toxic, nontoxic = (_knn_log_probs(query, *stores[s], k, temperature, len(logits)) for s in (0, 1))
    lm = _top_p_filter(_log_softmax(logits.astype(np.float64)), goodtriever.FILTER_P)
    return _log_softmax(lm + alpha * (nontoxic - toxic))


def test_each_step_is_the_reference_formula(tiny_model, tiny_vectors, monkeypatch) -> None:
    """The first step (prefill) and a later one (three tokens through the KV cache) agree with the
    text run whole, its query and datastore keys read at the reference's site, in numpy; k and T
    set so the tiny datastores (~200 keys) are searched, not taken whole, and weighted unevenly."""
    k, temperature, alpha = 16, 20.0, 2.0
    monkeypatch.setattr(goodtriever, "K", k)
    monkeypatch.setattr(goodtriever, "TEMPERATURE", temperature)
    config = SteeringConfig(alpha=alpha, form="goodtriever")
    seen, new = recorded_logits(tiny_model, tiny_vectors, config, TEXTS)
    stores = [_datastore(tiny_model, side) for side in (PAIRS.toxic, PAIRS.nontoxic)]
    for step in (0, 3):
        for row, text in enumerate(TEXTS):
            ids = tiny_model.tokenizer(text).input_ids + new[row, :step].tolist()
            logits = tiny_model(torch.tensor([ids]))[0, -1].detach().float().numpy()
            query = _last_ffn_inputs(tiny_model, ids)[-1]
            expected = _by_hand(logits, query, stores, alpha, k, temperature)
            got = seen[step][row].double()
            assert torch.equal(got.isinf(), torch.from_numpy(np.isinf(expected)))
            assert np.isinf(expected).any() and np.isfinite(expected).sum() > 1  # the nucleus cuts
            torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)


def test_the_nucleus_past_its_candidates_is_the_full_sorts() -> None:
    """Rows whose 0.9 nucleus holds more tokens than `nucleus` first sorts (a flat row) and fewer (a
    peaked one), in one batch, against transformers' top-p filter on the whole row."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5000) * torch.tensor([[0.5], [8.0], [3.0]])
    log_probs = logits.log_softmax(-1)
    got = goodtriever.nucleus(log_probs, 0.9)
    sizes = got.isfinite().sum(-1)
    assert sizes[0] > goodtriever._CANDIDATES > sizes[1]
    for row in range(3):
        expected = _top_p_filter(log_probs[row].double().numpy(), 0.9)
        assert torch.equal(got[row].isfinite(), torch.from_numpy(np.isfinite(expected)))


def test_strength_zero_is_unsteered_and_draws_repeat(tiny_model, tiny_vectors) -> None:
    plain = generate_ids(tiny_model, TEXTS, SAMPLED)
    zero = SteeringConfig(alpha=0.0, form="goodtriever")
    assert build_steering(tiny_model, tiny_vectors, zero).processors == []
    with steer(tiny_model, tiny_vectors, zero):
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), plain)
    with steer(tiny_model, tiny_vectors, SteeringConfig(alpha=2.0, form="goodtriever")):
        first = generate_ids(tiny_model, TEXTS, SAMPLED)
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), first)  # same seed, same draws
    assert not torch.equal(first, plain)
    assert active_processors() == ()


def test_what_it_refuses(tiny_model, tiny_vectors) -> None:
    for bad, message in [
        ({"heads": 3}, "does not act on heads"),
        ({"alpha": 10.5}, "strength must be within"),
    ]:
        with pytest.raises(DesteinError, match=message):
            SteeringConfig(**{"alpha": 2.0, "form": "goodtriever", **bad})
    with pytest.raises(DesteinError, match="positions='all'"):
        build_steering(tiny_model, tiny_vectors, SteeringConfig(2.0, positions="prompt", form="goodtriever"))
    plain = build_vectors(tiny_model, PAIRS, k=4, progress=False)
    with pytest.raises(DesteinError, match="no goodtriever fit"):
        build_steering(tiny_model, plain, SteeringConfig(2.0, form="goodtriever"))


def test_the_cache_is_reused_and_other_pairs_build_another(
    tiny_model, tiny_vectors, cache, monkeypatch
) -> None:
    first = goodtriever.datastores(tiny_model, tiny_vectors)
    (path,) = cache.glob("*.safetensors")
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["fingerprint"])["pairs_sha256"] == PAIRS.sha256()
    n_tokens = tiny_vectors.fit("goodtriever").lengths.sum() - 2 * len(PAIRS)  # every token but the first
    assert len(first["toxic"]) + len(first["nontoxic"]) == n_tokens

    def no_build(*args, **kwargs):
        raise AssertionError("the cached datastore was built again")

    datastore._open.cache_clear()
    monkeypatch.setattr(goodtriever, "hidden_states", no_build)
    again = goodtriever.datastores(tiny_model, tiny_vectors)
    for side in goodtriever.SIDES:
        keys = [store.index.reconstruct_n(0, len(store)) for store in (again[side], first[side])]
        assert np.array_equal(*keys)
        assert torch.equal(again[side].values, first[side].values)
    monkeypatch.setattr(goodtriever, "hidden_states", datastore.hidden_states)
    other = SteeringPairs(PAIRS.toxic[:-1] + ("you absolute moron",), PAIRS.nontoxic, "edited")
    changed = build_vectors(tiny_model, other, k=4, fit_forms=("goodtriever",), progress=False)
    goodtriever.datastores(tiny_model, changed)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_resume_equals_an_uninterrupted_run(tiny_model, tiny_vectors, tmp_path) -> None:
    prompts = [Prompt(text, None, str(i)) for i, text in enumerate([*TEXTS, "the weather"])]
    methods = [MethodSpec("goodtriever", SteeringConfig(alpha=2.0, form="goodtriever"))]
    config = eval_config(2, batch_size=2, max_new_tokens=4)
    opts = {"vectors": tiny_vectors, "progress": False}
    whole = evaluate(tiny_model, prompts, methods, tmp_path / "whole", config, **opts)
    cut = tmp_path / "cut"
    evaluate(tiny_model, prompts, methods, cut, config, **opts)
    path = gens_path(cut, "goodtriever")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:10])  # killed in the middle of a line
    again = evaluate(tiny_model, prompts, methods, cut, config, **opts)
    assert path.read_bytes() == gens_path(tmp_path / "whole", "goodtriever").read_bytes()
    for key in ("expected_max_toxicity", "perplexity"):
        assert again["goodtriever"][key] == pytest.approx(whole["goodtriever"][key])


def test_two_ranks_write_what_one_process_writes(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """`compare` with Goodtriever under a 2-rank launch: each rank builds the datastores it finds
    missing (here into one fresh cache, concurrently) and the texts and metrics are one process's."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The weather today is\nHe said that\nYou are\n")
    args = ["compare", "--model", str(tiny_model_dir), "--k", "4", "--methods", "baseline,goodtriever"]
    args += ["--prompts", str(prompts), "--samples", "2", "--batch-size", "2", "--dtype", "float32"]
    two = _launch(2, *args, "--out", str(tmp_path / "two"), driver=driver)  # its own cache: the fixture's
    saver = figures._Saver
    monkeypatch.setattr(figures, "_Saver", lambda out, formats: saver(out, ("html",)))
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "one-cache"))
    cli.main([*args, "--out", str(tmp_path / "one")])
    done = _finish(two)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    cells = [k for k in a if k not in ("scorer", "config", "compare")]
    assert "goodtriever@2" in cells
    for cell in cells:
        texts = [
            [
                [g["text"] for g in json.loads(line)["generations"]]
                for line in gens_path(d, cell).read_text().splitlines()
            ]
            for d in (tmp_path / "one", tmp_path / "two")
        ]
        assert texts[0] == texts[1], cell
        assert a[cell]["expected_max_toxicity"] == pytest.approx(b[cell]["expected_max_toxicity"], rel=1e-6)
        assert a[cell]["perplexity"] == pytest.approx(b[cell]["perplexity"], rel=1e-4)
