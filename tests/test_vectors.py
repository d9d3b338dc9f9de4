"""Vectors: building, saving/loading (safetensors + JSON), refusing the wrong model or a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError, load_model
from destein_lens.activations import pair_activations
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.probes import fit_probes
from destein_lens.store import load_result, save_result
from destein_lens.vectors import KIND, DetoxVectors, build_vectors


@pytest.fixture(scope="module")
def tiny_vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4)


def test_build_records_provenance(tiny_model, tiny_vectors) -> None:
    v = tiny_vectors
    assert v.directions.shape == (2, 4, 16) and v.probe_accuracy.shape == (2, 4)
    assert v.n_pairs == 20 and v.pairs_sha256 == builtin_seed_pairs().head(20).sha256()
    assert v.site == "heads" and v.k == 4 and v.probe_texts == "bare"
    assert v.prefixes[0].startswith("The following text is abusive")
    acts = pair_activations(tiny_model, builtin_seed_pairs().head(20), prefixes=v.prefixes, k=4)
    assert torch.allclose(v.directions, (acts[:, 0] - acts[:, 1]).mean(0), atol=1e-6)
    assert torch.equal(v.head_weights, 1 + v.accuracy_bare)


def test_save_load_round_trip(tiny_model, tiny_vectors, tmp_path: Path) -> None:
    path = tiny_vectors.save(tmp_path / "vec")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    again = DetoxVectors.load(path, model=tiny_model)
    for name in ("directions", "accuracy_bare", "accuracy_prefixed", "probe_weight", "probe_bias"):
        assert torch.equal(getattr(again, name), getattr(tiny_vectors, name))
    assert again.model == tiny_vectors.model and again.prefixes == tiny_vectors.prefixes


def test_wrong_model_or_mode_is_refused(tiny_model_dir, tiny_vectors, tmp_path: Path) -> None:
    compat = load_model(tiny_model_dir, device="cpu", compat=True)
    path = tiny_vectors.save(tmp_path / "vec")
    with pytest.raises(DesteinError, match="mode: raw vs compat"):
        DetoxVectors.load(path, model=compat)
    meta, tensors = load_result(path, KIND)
    meta["model"]["n_layers"] = 3  # a file claiming another model's shape, consistently signed
    save_result(path, KIND, tensors, meta)
    with pytest.raises(DesteinError, match="do not match"):
        DetoxVectors.load(path)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncate": (lambda p: p.write_bytes(p.read_bytes()[:40]), "digest"),
    "flip a tensor byte": (lambda p: _flip(p, len(p.read_bytes()) - 3), "digest"),
    "json": (lambda p: p.with_suffix(".json").write_text("{not json"), "not a readable"),
    "edit a sidecar value": (
        lambda p: p.with_suffix(".json").write_text(
            p.with_suffix(".json").read_text().replace('"k": 4', '"k": 5')
        ),
        "edited or damaged",
    ),
    "another kind": (
        lambda p: p.with_suffix(".json").write_text(
            p.with_suffix(".json").read_text().replace('"kind": "vector"', '"kind": "effects"')
        ),
        "not a vector file",
    ),
    "missing": (lambda p: p.unlink(), "not found"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_vector_files(tiny_vectors, tmp_path: Path, damage: str) -> None:
    path = tiny_vectors.save(tmp_path / "vec")
    spoil, message = DAMAGE[damage]
    spoil(path)
    with pytest.raises(DesteinError, match=message):
        DetoxVectors.load(path)


def test_files_written_before_the_store_still_load(tiny_vectors, tmp_path: Path) -> None:
    """A sidecar without the store's record (format 1, as vector files were written) loads unchecked."""
    path = tiny_vectors.save(tmp_path / "vec")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    old = {
        k: v
        for k, v in sidecar.items()
        if k not in ("kind", "package_version", "tensors_sha256", "meta_sha256")
    }
    path.with_suffix(".json").write_text(json.dumps(old))
    assert torch.equal(DetoxVectors.load(path).directions, tiny_vectors.directions)


def test_too_few_pairs_for_probes(tiny_model) -> None:
    with pytest.raises(DesteinError, match="probes need at least"):
        build_vectors(tiny_model, builtin_seed_pairs().head(3), k=4)


@pytest.mark.real
def test_real_probe_ranking_is_not_saturated(real_model) -> None:
    """Bare texts give a graded ranking; prefixed texts let almost every head read the prefix."""
    pairs = builtin_seed_pairs()
    v = build_vectors(real_model, pairs)
    saturated_bare = (v.accuracy_bare >= 1.0).float().mean().item()
    saturated_prefixed = (v.accuracy_prefixed >= 1.0).float().mean().item()
    print(f"heads at 1.0 held-out accuracy: bare {saturated_bare:.2f}, prefixed {saturated_prefixed:.2f}")
    assert saturated_bare < 0.5 and saturated_bare < saturated_prefixed
    assert v.accuracy_bare.std() > 0.05  # the ranking discriminates
    # torch batched probes agree with the scikit-learn reference on the real activations
    acts = pair_activations(real_model, pairs, prefixes=None)
    diff = (fit_probes(acts).accuracy - fit_probes(acts, method="sklearn").accuracy).abs().mean().item()
    assert diff <= 0.02


def test_files_without_probes_still_load(tiny_vectors, tmp_path: Path) -> None:
    """Vector files written before the probes were stored load; only the gated form needs them."""
    old = DetoxVectors(**{**tiny_vectors.__dict__, "probe_weight": None, "probe_bias": None})
    again = DetoxVectors.load(old.save(tmp_path / "old"))
    assert again.probe_weight is None and again.probe_bias is None
    assert torch.equal(again.directions, tiny_vectors.directions)
