"""The generation dtype: names and refusals, `auto` by a cached measurement, the run folder's record,
and the model shapes the probe reads from a model's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError, cli, dtypes
from destein_lens.dtypes import MARGIN, RECORD_FILE, choose_dtype, probe
from destein_lens.models import KNOWN_DIMS, ModelDims, model_dims, model_shape
from destein_lens.runfolder import CONFIG_FILE

TINY = ModelDims(n_layers=2, n_heads=4, d_model=64, d_mlp=128, d_vocab=1000)


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache folder, and no measurement remembered by this process."""
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dtypes, "_MEMO", {})
    return tmp_path / "cache"


def _measured(monkeypatch: pytest.MonkeyPatch, bfloat16: dict[str, float] | None) -> list[str]:
    """`measure` returns float32 at 100 ms per batch size and `bfloat16` as given; the calls are logged."""
    calls: list[str] = []

    def fake(device: str, dims: ModelDims) -> dict[str, dict[str, float]]:
        calls.append(device)
        return {"float32": {"16": 100.0, "64": 100.0}, **({"bfloat16": bfloat16} if bfloat16 else {})}

    monkeypatch.setattr(dtypes, "measure", fake)
    return calls


def test_names_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtypes, "measure", lambda *a: pytest.fail("measured without auto"))
    with pytest.raises(DesteinError, match="float16 is not supported on cpu"):
        choose_dtype("float16", "cpu", generates=True, model=None)
    with pytest.raises(DesteinError, match="unknown dtype 'float64'"):
        choose_dtype("float64", "cpu", generates=True, model=None)
    assert choose_dtype("bfloat16", "cpu", generates=True, model=None).torch_dtype is torch.bfloat16
    # vectors, attribution, figures: float32 without a probe
    assert choose_dtype("auto", "cpu", generates=False, model=None).dtype == "float32"


@pytest.mark.parametrize(
    ("bfloat16", "chosen"),
    [
        ({"16": 50.0, "64": 40.0}, "bfloat16"),
        ({"16": 100 * MARGIN, "64": 60.0}, "bfloat16"),  # at the margin
        ({"16": 95.0, "64": 40.0}, "float32"),  # not faster enough at every batch size
        ({"16": 150.0, "64": 150.0}, "float32"),
        (None, "float32"),  # the device has no bfloat16 matmul
    ],
)
def test_auto_takes_bfloat16_only_where_measured_faster(monkeypatch, cache, bfloat16, chosen) -> None:
    _measured(monkeypatch, bfloat16)
    choice = choose_dtype("auto", "cpu", generates=True, model=None)
    assert choice.dtype == chosen and choice.asked == "auto" and choice.reason.startswith("measured")
    assert choice.probe["step_ms"]["float32"] == {"16": 100.0, "64": 100.0}


def test_a_model_too_small_to_gain_stays_float32_unmeasured(monkeypatch, cache, tiny_model_dir) -> None:
    _measured(monkeypatch, {"16": 1.0, "64": 1.0})
    choice = choose_dtype("auto", "cpu", generates=True, model=tiny_model_dir)
    assert choice.dtype == "float32" and choice.probe is None and "too small" in choice.reason
    assert dtypes.step_gflop(KNOWN_DIMS["gemma-3-270m"]) > 30  # the default model is measured


def test_the_measurement_is_cached_per_machine_and_shape(monkeypatch, cache) -> None:
    calls = _measured(monkeypatch, {"16": 50.0, "64": 50.0})
    first = probe("cpu", TINY)
    assert calls == ["cpu"] and not first["cached"]
    stored = json.loads(Path(first["file"]).read_text())
    assert stored["key"]["dims"]["d_vocab"] == 1000 and stored["key"]["threads"] == torch.get_num_threads()
    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["cpu"]
    monkeypatch.setattr(dtypes, "_MEMO", {})  # a new process on the same machine reads it back
    again = probe("cpu", TINY)
    assert calls == ["cpu"] and again["cached"] and again["step_ms"] == first["step_ms"]
    probe("cpu", ModelDims(2, 4, 64, 256, 1000))  # another shape is measured
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another machine
        probe("cpu", TINY)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3


def test_the_first_stored_measurement_wins_and_a_damaged_one_is_replaced(monkeypatch, cache) -> None:
    calls = _measured(monkeypatch, {"16": 50.0, "64": 50.0})
    path = Path(probe("cpu", TINY)["file"])
    first = json.loads(path.read_text())
    other = {**first, "step_ms": {"float32": {"16": 1.0, "64": 1.0}}}
    # another process stored its measurement while this one measured: both use the stored one
    assert dtypes._keep_first(path, other)["step_ms"] == first["step_ms"]
    path.write_text("{not json")
    monkeypatch.setattr(dtypes, "_MEMO", {})
    assert not probe("cpu", TINY)["cached"] and len(calls) == 2
    assert json.loads(path.read_text())["step_ms"] == first["step_ms"]


def test_a_real_probe_is_quick_and_times_both_dtypes(cache) -> None:
    entry = probe("cpu", TINY)
    assert set(entry["step_ms"]) == {"float32", "bfloat16"}  # torch's CPU build multiplies bf16
    assert all(ms > 0 for by_batch in entry["step_ms"].values() for ms in by_batch.values())


def test_a_run_records_its_dtype_decision(monkeypatch, cache, tiny_model_dir, tmp_path, capsys) -> None:
    _measured(monkeypatch, {"16": 10.0, "64": 10.0})
    monkeypatch.setattr(dtypes, "MIN_STEP_GFLOP", 0.0)  # the tiny model measured as if it were large
    out = tmp_path / "run"
    argv = ["run", "--k", "4", "--samples", "1", "--batch-size", "2", "--max-prompts", "2"]
    cli.main([*argv, "--model", str(tiny_model_dir), "--out", str(out)])
    capsys.readouterr()
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["asked"] == "auto" and record["dtype"] == "bfloat16"
    assert record["probe"]["step_ms"]["bfloat16"] == {"16": 10.0, "64": 10.0}
    assert json.loads((out / CONFIG_FILE).read_text())["model"]["dtype"] == "bfloat16"
    assert json.loads((out / "vectors.json").read_text())["model"]["dtype"] == "float32"


def test_model_dims_from_files_without_loading(tiny_model_dir, tmp_path) -> None:
    assert model_dims(tiny_model_dir) == ModelDims(2, 4, 64, 128, model_dims(tiny_model_dir).d_vocab)
    assert model_shape(tiny_model_dir) == (2, 4)
    assert model_dims(None) == KNOWN_DIMS["gemma-3-270m"] == model_dims("google/gemma-3-270m")
    assert model_dims("some-org/some-model") is None  # a hub id: only with hub=True
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = {"n_layer": 36, "n_head": 20, "n_embd": 1280, "n_inner": None, "vocab_size": 50257}
    (gpt2 / "config.json").write_text(json.dumps(config))
    assert model_dims(gpt2) == ModelDims(36, 20, 1280, 4 * 1280, 50257)  # GPT-2: 4 x d_model


@pytest.mark.real
def test_gguf_header_dims_match_the_named_model() -> None:
    from destein_lens.catalog import cached_gguf

    if not cached_gguf("smollm2-135m").is_file():
        pytest.skip("smollm2-135m is not in the cache: scripts/setup.sh fetches it")
    assert model_dims(cached_gguf("smollm2-135m")) == KNOWN_DIMS["smollm2-135m"]


@pytest.mark.real
def test_bfloat16_scores_the_same_continuations_as_float32(real_model) -> None:
    """Paired: what `auto` may pick instead of float32 gives the same perplexity of the same texts
    (continuations the bfloat16 model sampled), within 3% in geometric mean and 10% per text. Its
    own draws differ from float32's, so the metrics over draws are compared in the benchmark, with
    intervals (benchmarks/bench_roofline.py --main-job), not here."""
    from destein_lens import generate, load_model, protocol_sampling
    from destein_lens.perplexity import conditional_perplexity
    from destein_lens.prompts import builtin_demo_prompts

    prompts = [p.text for p in builtin_demo_prompts()[::5]]  # 8 prompts, toxic and neutral openings
    half = load_model(dtype=torch.bfloat16)
    texts = generate(half, prompts, protocol_sampling(n=2, max_new_tokens=16), progress=False)
    pairs = [(p, t) for p, row in zip(prompts, texts) for t in row if t.strip()]
    assert len(pairs) >= 12
    logs = {
        name: torch.tensor(conditional_perplexity(model, *map(list, zip(*pairs)))).log()
        for name, model in (("float32", real_model), ("bfloat16", half))
    }
    shift = logs["bfloat16"] - logs["float32"]
    assert shift.mean().abs() < math.log(1.03), shift
    assert shift.abs().max() < math.log(1.10), shift
