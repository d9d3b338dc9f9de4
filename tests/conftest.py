"""Shared fixtures: a tiny random-weight model built locally, and the real default model (once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# pytest-xdist (addopts: -n auto, at most 4) runs a process per core: each, and everything it
# starts (notebook kernels, CLI runs, through OMP_NUM_THREADS), takes its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# No test may reach a hub: fail fast instead of retrying the network (set before HF imports).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_tiny_model_dir(path: Path) -> Path:
    """A 2-layer GPT-2 with random weights and a byte-level BPE tokenizer trained on the seed pairs."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from destein_lens.pairs import builtin_seed_pairs

    seeds = builtin_seed_pairs()
    # the attribution studies' word lists, so some of their words are single tokens here too
    words = [
        " " + w.strip()
        for kind in ("toxic", "neutral")
        for w in resources.files("destein_lens.data").joinpath(f"{kind}_words.txt").read_text().splitlines()
        if w.strip() and not w.startswith("#")
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(seeds.toxic + seeds.nontoxic) * 4 + words * 8, vocab_size=1000, special_tokens=["<|endoftext|>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from destein_lens import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def real_model():
    """The embedded default (gemma-3-270m), loaded once per test run; on DESTEIN_LENS_TEST_DEVICE
    (default cpu) so scripts/gpu_check.sh runs the real-model tests on CUDA."""
    from destein_lens import load_model

    return load_model(device=os.environ.get("DESTEIN_LENS_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def real_vectors_with_fits(real_model):
    """Vectors on 24 built-in pairs with every comparison method's fit (the steering test needs
    working fits, not the best ones; Linear-AcT's layer-by-layer fit dominates the cost)."""
    from destein_lens import build_vectors, load_pairs
    from destein_lens.registry import FORMS

    fitted = [name for name, form in FORMS.items() if form.fit is not None]
    return build_vectors(real_model, load_pairs(None).head(24), fit_forms=fitted, progress=False)


REFERENCE = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    entry, out = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(entry)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        greedy = model.generate(**enc, max_new_tokens=20, do_sample=False)
    save_file({"logits": logits.contiguous(), "greedy": greedy[:, enc.input_ids.shape[1]:].contiguous(),
               "input_ids": enc.input_ids.contiguous()}, out)
    """
)


@pytest.fixture(scope="session")
def hf_reference(real_model, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Plain Hugging Face logits and greedy generation, from a separate process.

    Booting a Gemma bridge patches transformers' Gemma attention for the whole process (TL#1795)
    and swaps modules inside the HF model in place, so the reference runs elsewhere.
    """
    out = tmp_path_factory.mktemp("hf-ref") / "ref.safetensors"
    from destein_lens.models import gguf_entry_dir, load_record

    entry = gguf_entry_dir(load_record(real_model).file_sha256)
    subprocess.run([sys.executable, "-c", REFERENCE, str(entry), str(out)], check=True, capture_output=True)
    return load_file(out)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the hub unreachable and the cache empty, so hub loaders fail fast and deterministically."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # Both read the environment at import time, so an earlier import needs the flags set directly.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


class WordLengthScorer:
    """A second toxicity scorer for tests: a word-count score (so it disagrees with the first),
    counting how many texts it was asked to score."""

    name = "word-length"

    def __init__(self) -> None:
        self.scored = 0

    def score(self, texts):
        self.scored += len(texts)
        return [min(1.0, len(t.split()) / 6) for t in texts]


@pytest.fixture
def word_length() -> WordLengthScorer:
    return WordLengthScorer()
