"""Model runtime: loading paths, the load record, the GGUF cache, and parity with Hugging Face."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError, load_model, load_record
from destein_lens.models import LoadRecord, _entry_valid, gguf_entry_dir


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


def test_cli_unknown_model_prints_one_line_and_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "destein_lens.cli", "generate", "--model", "no-such-org/nothing", "hi"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot load model"), proc.stderr


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


@pytest.mark.real
def test_bridge_logits_match_hf(real_model, hf_reference) -> None:
    with torch.no_grad():
        logits = real_model(hf_reference["input_ids"])
    assert (logits - hf_reference["logits"]).abs().max().item() <= 1e-3
