"""The command line's bad inputs, table-driven: each ends in one `error:` line and exit status 2.

Cases in `BEFORE_LOAD` must be refused before any model is loaded (`load_model` is replaced by a
function that fails the test); `AFTER_LOAD` cases need the model's shape or tokenizer and must be
refused before the first generation (no generations file, no config.json). The run-folder cases
(another run, other vector settings, a second writer, kill -9 and resume) follow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from destein_lens import cli
from destein_lens.errors import DesteinError
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.registry import FORMS
from destein_lens.runfolder import CONFIG_FILE, gens_path
from destein_lens.store import load_result, save_result
from destein_lens.vectors import KIND, DetoxVectors, build_vectors

Case = Callable[[Path, Path], list[str]]  # (tmp folder, vector file) -> argv


def _vector_variant(tmp: Path, vectors: Path, name: str, tensors=None, meta=None) -> str:
    """A copy of the good vector file with some tensors or sidecar fields replaced."""
    sidecar, good = load_result(vectors, KIND)
    return str(save_result(tmp / name, KIND, good | (tensors or {}), sidecar | (meta or {})))


def _write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text, encoding="utf-8")
    return str(tmp / name)


def _evaluate_variant(name: str, **changes) -> Case:
    """`evaluate` given a copy of the good vector file with `changes` (see `_vector_variant`)."""
    return lambda t, v: [
        "evaluate",
        "--vectors",
        _vector_variant(t, v, name, **changes),
        "--out",
        str(t / "r"),
    ]


def _run_file(flag: str, name: str, content: str) -> Case:
    """`run` given one input file, written from `content`."""
    return lambda t, v: ["run", flag, _write(t, name, content), "--out", str(t / "r")]


def _file(tmp: Path) -> str:
    return _write(tmp, "plain.txt", "not a folder\n")


BEFORE_LOAD: dict[str, tuple[Case, str]] = {
    "device foo": (lambda t, v: ["run", "--device", "foo", "--out", str(t / "r")], "unknown device"),
    "device cuda without a GPU": (
        lambda t, v: ["run", "--device", "cuda:7", "--out", str(t / "r")],
        "device",
    ),
    "seed overflow": (lambda t, v: ["generate", "hi", "--seed", "99999999999999999999999"], "seed"),
    "negative seed": (lambda t, v: ["run", "--seed", "-1", "--out", str(t / "r")], "seed"),
    "empty prompt": (lambda t, v: ["generate", "  "], "prompt 0 is empty"),
    "text file renamed .gguf": (
        lambda t, v: ["run", "--model", _write(t, "fake.gguf", "hello"), "--out", str(t / "r")],
        "GGUF",
    ),
    "missing vector file": (
        lambda t, v: ["evaluate", "--vectors", str(t / "none.safetensors"), "--out", str(t / "r")],
        "none.safetensors",
    ),
    "sidecar versions of the wrong type": (
        lambda t, v: [
            "evaluate",
            "--vectors",
            _vector_variant(
                t,
                v,
                "ver",
                meta={
                    "model": {**json.loads(v.with_suffix(".json").read_text())["model"], "versions": ["x"]}
                },
            ),
            "--out",
            str(t / "r"),
        ],
        "not a valid",
    ),
    "integer tensors": (
        _evaluate_variant("int", tensors={"directions": torch.ones(2, 4, 16, dtype=torch.int64)}),
        "float tensor",
    ),
    "all-zero directions": (
        _evaluate_variant("zero", tensors={"directions": torch.zeros(2, 4, 16)}),
        "all-zero",
    ),
    "probes of another shape": (
        _evaluate_variant("probe", tensors={"probe_weight": torch.ones(2, 4, 3)}),
        "probe_weight",
    ),
    "probe accuracy of 100": (
        _evaluate_variant("acc", tensors={"accuracy_bare": torch.full((2, 4), 100.0)}),
        "[0, 1]",
    ),
    "--out is a file": (lambda t, v: ["run", "--out", _file(t)], "is a file"),
    "--out under a file": (lambda t, v: ["run", "--out", _file(t) + "/sub"], "file"),
    "evaluate --out under a file": (
        lambda t, v: ["evaluate", "--vectors", str(v), "--out", _file(t) + "/x"],
        "file",
    ),
    "induce --out under a file": (lambda t, v: ["pairs", "induce", "--out", _file(t) + "/p.jsonl"], "file"),
    "vectors --out is a folder": (lambda t, v: ["vectors", "--out", str(t)], "is a folder"),
    "figures --out under a file": (lambda t, v: ["figures", "--out", _file(t) + "/f"], "file"),
    "figures --sweep of the wrong shape": (
        lambda t, v: ["figures", "--sweep", _write(t, "s.json", '{"a": 1}'), "--out", str(t / "f")],
        "s.json",
    ),
    "figures --alpha 1e9": (lambda t, v: ["figures", "--alpha", "1e9", "--out", str(t / "f")], "within"),
    "alpha 1e9": (lambda t, v: ["run", "--alpha", "1e9", "--out", str(t / "r")], "within"),
    "heads 0": (lambda t, v: ["run", "--heads", "0", "--out", str(t / "r")], "at least 1"),
    "heads garbage": (lambda t, v: ["run", "--heads", "3-1", "--out", str(t / "r")], "--heads"),
    "k 0": (lambda t, v: ["run", "--k", "0", "--out", str(t / "r")], "--k"),
    "vectors k 0": (lambda t, v: ["vectors", "--k", "0", "--out", str(t / "v.safetensors")], "--k"),
    "induce n 0": (lambda t, v: ["pairs", "induce", "--n", "0", "--out", str(t / "p.jsonl")], "--n"),
    "induce missing seeds": (
        lambda t, v: ["pairs", "induce", "--seeds", str(t / "no.jsonl"), "--out", str(t / "p.jsonl")],
        "no.jsonl",
    ),
    "duplicate prompt ids": (
        _run_file("--prompts", "d.jsonl", '{"text": "a b", "id": "1"}\n{"text": "c d", "id": "1"}\n'),
        "d.jsonl",
    ),
    "explicit id colliding with an automatic one": (
        _run_file("--prompts", "c.jsonl", '{"text": "a b"}\n{"text": "c d", "id": 0}\n'),
        "c.jsonl",
    ),
    "pairs with identical sides": (
        _run_file("--pairs", "same.jsonl", '{"toxic": "you fool", "nontoxic": "you fool"}\n'),
        "identical",
    ),
    "unknown scorer": (lambda t, v: ["run", "--scorer", "nope", "--out", str(t / "r")], "nope"),
    "alpha nan": (lambda t, v: ["run", "--alpha", "nan", "--out", str(t / "r")], "finite"),
    "prompts file with a broken line": (
        _run_file("--prompts", "bad.jsonl", '{"prompt": {"text": "fine"}}\n{"prompt": \n'),
        "bad.jsonl:2",
    ),
    "prompts file with an empty prompt": (
        _run_file("--prompts", "empty.jsonl", '{"prompt": {"text": "  "}}\n'),
        "empty.jsonl:1",
    ),
    "one-sided pair": (
        _run_file("--pairs", "pairs.jsonl", '{"toxic": "you idiot, get lost now", "nontoxic": ""}\n'),
        "empty",
    ),
    "vector file without the form's fit": (
        lambda t, v: ["evaluate", "--vectors", str(v), "--form", "act", "--out", str(t / "r")],
        "no act fit",
    ),
    "vector file without the form's causal ranking": (
        lambda t, v: ["evaluate", "--vectors", str(v), "--heads", "causal:2", "--out", str(t / "r")],
        "no causal ranking for destein",
    ),
    "causal heads k 0": (lambda t, v: ["run", "--heads", "causal:0", "--out", str(t / "r")], "causal:k"),
    "causal ranking of a method not on heads": (
        lambda t, v: ["vectors", "--causal", "actadd", "--out", str(t / "v")],
        "needs a head-wise method",
    ),
    "strength beyond the form's range": (
        lambda t, v: ["run", "--form", "act", "--alpha", "2", "--out", str(t / "r")],
        "act strength must be within",
    ),
    "samples 0": (lambda t, v: ["run", "--samples", "0", "--out", str(t / "r")], "samples"),
    "max-prompts 0": (lambda t, v: ["run", "--max-prompts", "0", "--out", str(t / "r")], "--max-prompts"),
    "batch-size 0": (lambda t, v: ["run", "--batch-size", "0", "--out", str(t / "r")], "batch_size"),
    "attribute unknown study": (
        lambda t, v: ["attribute", "--study", "probing", "--out", str(t / "r")],
        "unknown study",
    ),
    "attribute n-held-out 0": (
        lambda t, v: ["attribute", "--n-held-out", "0", "--out", str(t / "r")],
        "--n-held-out",
    ),
    "attribute missing held-out file": (
        lambda t, v: ["attribute", "--held-out", str(t / "none.jsonl"), "--out", str(t / "r")],
        "none.jsonl",
    ),
    "attribute held-out from an unreachable hub": (
        lambda t, v: ["attribute", "--out", str(t / "r")],
        "ParaDetox",
    ),
    "attribute held-out = the vectors' pairs": (
        lambda t, v: ["attribute", "--held-out", "builtin", "--n-held-out", "3", "--out", str(t / "r")],
        "no pair that the vectors were not built on",
    ),
    "attribute alpha 1e9": (
        lambda t, v: ["attribute", "--held-out", "builtin", "--alpha", "1e9", "--out", str(t / "r")],
        "within",
    ),
    "figures --attribution of a non-study folder": (
        lambda t, v: ["figures", "--attribution", str(t)],
        "not an attribution study folder",
    ),
}


@pytest.fixture(scope="module")
def vector_file(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vectors = build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, progress=False)
    return vectors.save(tmp_path_factory.mktemp("vectors") / "tiny.safetensors")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], contains: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], lines


@pytest.mark.parametrize("case", list(BEFORE_LOAD))
def test_refused_before_the_model_loads(case, tmp_path, vector_file, capsys, monkeypatch) -> None:
    import destein_lens.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(destein_lens.models, "load_model", no_load)
    make, contains = BEFORE_LOAD[case]
    _refused(make(tmp_path, vector_file), capsys, contains)
    assert not (tmp_path / "r" / CONFIG_FILE).exists()


def _long_prompt(tmp: Path) -> str:
    return _write(tmp, "long.txt", "word " * 400 + "\n")  # the tiny model's context is 256 tokens


def _narrow(tmp: Path, v: Path) -> str:
    narrow = {
        "directions": torch.ones(2, 4, 3),
        "probe_weight": torch.ones(2, 4, 3),
    }  # consistent, but 3 wide
    return _vector_variant(tmp, v, "narrow", tensors=narrow)


AFTER_LOAD: dict[str, tuple[Case, str]] = {
    "head out of range": (lambda t, v: ["--heads", "5.0"], "out of range"),
    "top-k beyond the model's heads": (lambda t, v: ["--heads", "99"], "between 1 and 8"),
    "prompt longer than the context": (lambda t, v: ["--prompts", _long_prompt(t)], "context"),
    "vector width not the model's": (lambda t, v: ["--vectors", _narrow(t, v)], "wide"),
}


@pytest.mark.parametrize("case", list(AFTER_LOAD))
def test_refused_before_the_first_generation(case, tmp_path, tiny_model_dir, vector_file, capsys) -> None:
    make, contains = AFTER_LOAD[case]
    extra = make(tmp_path, vector_file)
    command = ["evaluate"] if "--vectors" in extra else ["run", "--k", "4"]
    _refused(
        [*command, "--model", str(tiny_model_dir), *extra, "--out", str(tmp_path / "r")], capsys, contains
    )
    assert not (tmp_path / "r" / CONFIG_FILE).exists()
    assert not list((tmp_path / "r").glob("prompted_gens_*"))


TINY_RUN = ["run", "--k", "4", "--samples", "2", "--batch-size", "2", "--max-prompts", "12"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "destein_lens.cli", *args], capture_output=True, text=True)


def test_rerun_with_other_vector_settings_is_refused(tiny_model_dir, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    base = [*TINY_RUN[:-2], "--max-prompts", "2", "--model", str(tiny_model_dir), "--out", out]
    cli.main(base)
    capsys.readouterr()
    _refused([*base, "--k", "2"], capsys, "vectors")
    _refused([*base, "--probe-texts", "prefixed"], capsys, "vectors")


HOLDER = textwrap.dedent(
    """
    import sys, time
    from destein_lens import runfolder
    with runfolder.hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_second_writer_is_refused_at_once(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        _refused(["run", "--out", str(out)], capsys, "in use by another destein-lens process")
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()
    import destein_lens.runfolder as runfolder

    with runfolder.hold(out):  # a killed holder leaves nothing stuck
        pass


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = [*TINY_RUN, "--model", str(tiny_model_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "destein_lens.cli", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = gens_path(killed, "baseline")
    deadline = time.time() + 300
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 3):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    kept = path.read_bytes()[: path.read_bytes().rfind(b"\n") + 1]
    assert kept.count(b"\n") >= 3
    assert _cli(*args, "--out", str(killed)).returncode == 0
    assert _cli(*args, "--out", str(clean)).returncode == 0
    for method in ("baseline", "destein"):  # texts, token ids and seeds: byte-identical
        assert gens_path(killed, method).read_bytes() == gens_path(clean, method).read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (killed, clean))
    for method in ("baseline", "destein"):  # floats: equal within float tolerance
        for key, value in a[method].items():
            if isinstance(value, float):
                assert value == pytest.approx(b[method][key], rel=1e-6, nan_ok=True), key
    other = _cli(*args[:4], "3", *args[5:], "--out", str(killed))  # --samples 3: another run
    assert other.returncode == 2 and "holds another run" in other.stderr


def test_run_with_a_comparison_form_fits_it_and_names_the_method_by_it(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "run"
    cli.main(
        [
            *TINY_RUN[:-2],
            "--max-prompts",
            "1",
            "--model",
            str(tiny_model_dir),
            "--form",
            "iti",
            "--out",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "iti" in metrics and gens_path(out, "iti").exists()
    assert (
        metrics["config"]["methods"][1]["alpha"] == FORMS["iti"].default_strength
    )  # the form's own default strength


def test_run_with_causal_heads_builds_the_ranking_into_its_vectors(tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = [*TINY_RUN[:-2], "--max-prompts", "1", "--model", str(tiny_model_dir), "--heads", "causal:3"]
    cli.main([*argv, "--out", str(out)])
    vectors = DetoxVectors.load(out / "vectors.safetensors")
    ranking = vectors.causal_ranking("destein")
    assert ranking.scored_on["how"] == "cross-fit" and sum(ranking.scored_on["fold_sizes"]) == vectors.n_pairs
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["methods"][1]["heads"] == "causal:3"
    assert config["causal_heads"] == {"destein": [f"L{a}.H{b}" for a, b in ranking.ranking()[:3]]}
    cli.main([*argv, "--out", str(out)])  # a finished run resumes with the ranking it holds
    capsys.readouterr()
    _refused([*argv, "--causal-confirm", "2", "--out", str(out)], capsys, "--causal-confirm 0, not 2")
    cli.main([*argv, "--causal-confirm", "2", "--out", str(tmp_path / "confirmed")])
    confirmed = DetoxVectors.load(tmp_path / "confirmed" / "vectors.safetensors").causal_ranking("destein")
    assert confirmed.scored_on["confirmed_top"] == 2


def test_dtype_is_part_of_the_run_and_vectors_stay_float32(tiny_model_dir, tmp_path, capsys) -> None:
    """A bfloat16 run builds its vectors from a float32 forward; a float32 rerun is another run."""
    out = str(tmp_path / "run")
    base = [*TINY_RUN[:-2], "--max-prompts", "2", "--model", str(tiny_model_dir), "--out", out]
    cli.main([*base, "--dtype", "bfloat16"])
    capsys.readouterr()
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert config["model"]["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "run" / "vectors.json").read_text())["model"]["dtype"] == "float32"
    _refused([*base, "--dtype", "float32"], capsys, "holds another run")


# --- issue 22: refusals that need no model, on finished folders too ---------------------------


def _one_pair(tmp: Path) -> str:
    return _write(tmp, "one.jsonl", '{"toxic": "you are a stupid idiot", "nontoxic": "you are not kind"}\n')


BEFORE_LOAD_MORE: dict[str, tuple[Case, str]] = {
    "float16 on cpu": (
        lambda t, v: ["generate", "hi", "--dtype", "float16", "--device", "cpu"],
        "float16 is not supported on cpu",
    ),
    "compare --max-calibration-prompts -3": (
        lambda t, v: ["compare", "--max-calibration-prompts", "-3", "--out", str(t / "r")],
        "--max-calibration-prompts",
    ),
    "run --form iti --heads 99.1 (the default model's shape is known)": (
        lambda t, v: ["run", "--form", "iti", "--heads", "99.1", "--out", str(t / "r")],
        "out of range for 18 layers x 4 heads",
    ),
    "attribute with one held-out pair": (
        lambda t, v: ["attribute", "--held-out", _one_pair(t), "--out", str(t / "r")],
        "at least 2 held-out pairs",
    ),
    "truncated vector file": (
        lambda t, v: ["evaluate", "--vectors", _truncated(t, v), "--out", str(t / "r")],
        "digest",
    ),
    "compare --methods foo": (lambda t, v: ["compare", "--methods", "foo", "--out", str(t / "r")], "foo"),
}


def _truncated(tmp: Path, vectors: Path) -> str:
    """The good vector file cut short, beside its own sidecar."""
    (tmp / "cut.safetensors").write_bytes(vectors.read_bytes()[:60])
    (tmp / "cut.json").write_text(vectors.with_suffix(".json").read_text())
    return str(tmp / "cut.safetensors")


@pytest.mark.parametrize("case", list(BEFORE_LOAD_MORE))
def test_more_refusals_before_the_model_loads(case, tmp_path, vector_file, capsys, monkeypatch) -> None:
    monkeypatch.setitem(BEFORE_LOAD, case, BEFORE_LOAD_MORE[case])
    test_refused_before_the_model_loads(case, tmp_path, vector_file, capsys, monkeypatch)


COMPARE = ["compare", "--k", "4", "--samples", "1", "--batch-size", "2", "--methods", "baseline,destein"]


@pytest.fixture(scope="module")
def finished_compare(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished compare folder, run without calibration prompts (the README's common case)."""
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("The weather today is\nYou are such a\n")
    out = tmp_path_factory.mktemp("compare") / "cmp"
    argv = [*COMPARE, "--model", str(tiny_model_dir), "--prompts", str(prompts), "--dtype", "float32"]
    cli.main([*argv, "--out", str(out)])
    assert (out / "metrics.json").exists() and (out / "pareto.html").exists()
    return out, argv


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock (a pid) and the figures (Plotly HTML carries random ids; their
    README names the folder's path)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (".lock", "README.md") and p.suffix not in (".html", ".png")
    }


def _flip_first_line(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b'"text": "') + 10] ^= 0x01  # a valid JSON line with another text
    path.write_bytes(bytes(data))


FOLDER_CASES: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    # (damage to the copy, options changed, phrase of the refusal)
    "other --methods": (lambda d: None, ["--methods", "baseline,iti"], "holds another run"),
    "other --strengths": (lambda d: None, ["--strengths", "destein=0.1"], "holds another run"),
    "a damaged line": (
        lambda d: gens_path(d, "baseline").write_text("{not json\n" + gens_path(d, "baseline").read_text()),
        [],
        "not a generations line",
    ),
    "a flipped text": (lambda d: _flip_first_line(gens_path(d, "destein@0.05")), [], "changed after"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_finished_compare_folder_refusals_need_no_model(
    case, finished_compare, tmp_path, capsys, monkeypatch
) -> None:
    import shutil

    import destein_lens.models

    folder, argv = finished_compare
    copy = tmp_path / "cmp"
    shutil.copytree(folder, copy)
    damage, options, phrase = FOLDER_CASES[case]
    damage(copy)
    before = _snapshot(copy)
    monkeypatch.setattr(destein_lens.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    _refused([*argv, *options, "--out", str(copy)], capsys, phrase)
    assert _snapshot(copy) == before  # nothing written


@pytest.mark.parametrize("case", ["not a dict", "a damaged compare entry"])
def test_figures_of_a_damaged_compare_folder(case, finished_compare, tmp_path, capsys) -> None:
    import shutil

    copy = tmp_path / "cmp"
    shutil.copytree(finished_compare[0], copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    damaged = [1, 2] if case == "not a dict" else {**metrics, "compare": {"cells": 3}}
    (copy / "metrics.json").write_text(json.dumps(damaged))
    _refused(["figures", "--compare", str(copy), "--out", str(tmp_path / "f")], capsys, "damaged")


def test_alpha_help_says_larger_values_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "larger values are refused" in text and "past 1 the direction replaces" not in text


# --- property-style: random valid options run; random damage resumes or is refused -------------


def _random_options(rng, command: str) -> list[str]:
    """A random valid combination of the options `run` or `compare` take (small sizes)."""
    opts = ["--samples", str(rng.randint(1, 2)), "--batch-size", str(rng.choice([1, 2, 3]))]
    opts += ["--max-prompts", str(rng.randint(1, 3)), "--seed", str(rng.randint(0, 5))]
    opts += ["--k", str(rng.choice([2, 4])), "--probe-texts", rng.choice(["bare", "prefixed"])]
    if command == "run":
        form = rng.choice(["destein", "destein-gated", "released_code", "additive", "actadd", "iti", "act"])
        opts += ["--form", form, "--positions", rng.choice(["all", "prompt", "generated"])]
        if form in ("destein", "destein-gated", "additive", "iti"):
            opts += ["--heads", rng.choice(["all", "3", "0.1,1.2"])]
    else:
        methods = ["baseline", *rng.sample(["destein", "actadd", "iti", "released_code"], rng.randint(1, 2))]
        opts += ["--methods", ",".join(methods)]
    return opts


@pytest.mark.parametrize("seed", range(4))
def test_random_valid_options_write_a_complete_folder(seed, tiny_model_dir, tmp_path) -> None:
    import random

    rng = random.Random(seed)
    command = rng.choice(["run", "compare"])
    out = tmp_path / "out"
    opts = _random_options(rng, command)
    cli.main([command, "--model", str(tiny_model_dir), "--dtype", "float32", *opts, "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / CONFIG_FILE).read_text())
    n_prompts = config["prompts"]["n"]
    for method in config["methods"]:
        rows = gens_path(out, method["name"]).read_text().splitlines()
        assert len(rows) == n_prompts, (opts, method["name"])
        assert method["name"] in metrics
    assert (out / "report.md").exists() and (out / "vectors.safetensors").exists()


def _damage(rng, folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
    path = rng.choice(files)
    kind = rng.choice(["truncate", "flip", "delete"])
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[: rng.randint(0, max(0, len(data) - 1))])
    elif data:
        at = rng.randrange(len(data))
        path.write_bytes(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :])
    return f"{kind} {path.relative_to(folder)}"


@pytest.mark.parametrize("seed", range(10))
def test_random_damage_resumes_to_identical_bytes_or_is_refused(seed, finished_compare, tmp_path, capsys):
    import random
    import shutil

    folder, argv = finished_compare
    copy = tmp_path / "cmp"
    shutil.copytree(folder, copy)
    rng = random.Random(seed)
    what = _damage(rng, copy)
    capsys.readouterr()
    try:
        cli.main([*argv, "--out", str(copy)])
    except SystemExit as e:
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, lines)
        return
    assert _snapshot(copy) == _snapshot(folder), what


def test_a_second_scorer_rescores_a_finished_run(tiny_model_dir, tmp_path, capsys) -> None:
    """`--scorer profanity-check,ensemble` on a finished folder: the stored texts are scored by the
    ensemble too (no generation); a folder scored by another scorer is refused with the way to add one."""
    from destein_lens.scoring import get_scorer

    try:
        get_scorer("ensemble").score(["a text"])
    except DesteinError as e:
        pytest.skip(f"the bilstm-jigsaw weights are not at hand: {e}")
    out = str(tmp_path / "run")
    base = [*TINY_RUN[:-2], "--max-prompts", "2", "--model", str(tiny_model_dir), "--out", out]
    cli.main(base)
    gens = gens_path(tmp_path / "run", "destein").read_bytes()
    capsys.readouterr()
    _refused([*base, "--scorer", "ensemble"], capsys, "--scorer profanity-check,ensemble")
    cli.main([*base, "--scorer", "profanity-check,ensemble"])
    assert gens_path(tmp_path / "run", "destein").read_bytes() == gens
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["scorers"] == ["profanity-check", "ensemble"]
    assert set(metrics["destein"]["by_scorer"]) == {"profanity-check", "ensemble"}
    assert "(ensemble)" in capsys.readouterr().out
