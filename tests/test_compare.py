"""`compare`: the cells, the calibration rule, the resumable folder, the Pareto view, the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from destein_lens import cli
from destein_lens.compare import (
    CALIBRATION_DIR,
    CAUSAL_KS,
    DEFAULT_CAUSAL_K,
    cell,
    cell_grid,
    check_calibration,
    choose,
    compare,
    load_compare,
    parse_ks,
    parse_methods,
    parse_strengths,
    pooled,
)
from destein_lens.errors import DesteinError
from destein_lens.evaluation import MethodSpec, eval_config
from destein_lens.figures import compare_figures
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.prompts import Prompt, builtin_demo_prompts
from destein_lens.registry import FORMS
from destein_lens.report import write_report
from destein_lens.runfolder import gens_path
from destein_lens.steering import SteeringConfig
from destein_lens.vectors import DetoxVectors, build_vectors
from destein_lens.views import pareto_figure, pareto_points


def test_methods_and_strengths_are_parsed_and_checked() -> None:
    assert parse_methods("baseline, destein,iti") == ["baseline", "destein", "iti"]
    for bad, message in [("", "no method"), ("destein,nope", "unknown method"), ("iti,iti", "twice")]:
        with pytest.raises(DesteinError, match=message):
            parse_methods(bad)
    methods = ["baseline", "destein", "iti"]
    assert parse_strengths(["destein=0.05,0.1", "iti=5"], methods) == {"destein": (0.05, 0.1), "iti": (5.0,)}
    for bad, message in [
        (["destein"], "method=s1"),
        (["destein="], "method=s1"),
        (["act=0.5"], "not a compared"),
        (["baseline=1"], "not a compared"),
        (["destein=0.1,x"], "not a number"),
        (["destein=5"], "within"),
        (["destein=0.1,0.1"], "repeats"),
        (["destein=0.1", "destein=0.2"], "twice"),
    ]:
        with pytest.raises(DesteinError, match=message):
            parse_strengths(bad, methods)


def test_grid_is_the_given_the_calibration_grid_or_the_default() -> None:
    given = cell_grid(["baseline", "destein", "act"], {"destein": (0.2,)}, calibrating=True)
    assert given == {"destein": [(0.2, None)], "act": [(s, None) for s in FORMS["act"].grid]}
    plain = cell_grid(["destein", "iti"], {}, calibrating=False)
    assert plain == {
        "destein": [(FORMS["destein"].default_strength, None)],
        "iti": [(FORMS["iti"].default_strength, None)],
    }


def test_causal_methods_add_a_k_grid() -> None:
    methods = parse_methods("baseline,destein:causal,iti:causal")
    ks = parse_ks(["destein:causal=8,16"], methods)
    grid = cell_grid(methods, {"destein:causal": (0.1, 0.2)}, calibrating=True, ks=ks)
    assert grid["destein:causal"] == [(0.1, 8), (0.1, 16), (0.2, 8), (0.2, 16)]
    assert grid["iti:causal"] == [(s, k) for s in FORMS["iti"].grid for k in CAUSAL_KS]
    assert cell_grid(["destein:causal"], {}, calibrating=False)["destein:causal"] == [
        (FORMS["destein"].default_strength, DEFAULT_CAUSAL_K)
    ]
    spec = cell("destein:causal", 0.1, (18, 4), 8)
    assert spec.name == "destein:causal8@0.1" and spec.steering.heads == "causal:8"
    assert spec.steering.form == "destein"
    for bad, message in [("actadd:causal", "does not act on heads"), ("foo:causal", "unknown method")]:
        with pytest.raises(DesteinError, match=message):
            parse_methods(bad)
    for bad, message in [
        (["destein=8"], "not a compared"),
        (["destein:causal=0"], "at least 1"),
        (["destein:causal=x"], "whole"),
    ]:
        with pytest.raises(DesteinError, match=message):
            parse_ks(bad, ["destein", "destein:causal"])


def _metrics(**cells: tuple[float, float, float]) -> dict:
    return {
        name: {"expected_max_toxicity": emt, "toxicity_probability": tp, "perplexity": ppl, "dist_2": dist}
        for name, (emt, tp, ppl, *rest) in cells.items()
        for dist in [rest[0] if rest else 0.9]
    }


def test_choose_takes_the_strongest_detoxification_within_budget() -> None:
    cells = [MethodSpec(f"destein@{a:g}", SteeringConfig(alpha=a)) for a in (0.05, 0.1, 0.15)]
    metrics = _metrics(
        baseline=(0.5, 0.5, 10.0),
        **{
            "destein@0.05": (0.4, 0.3, 11.0),
            "destein@0.1": (0.3, 0.2, 11.9),
            "destein@0.15": (0.1, 0.0, 30.0),
        },
    )
    best, within = choose(metrics, cells, 1.2)
    assert (best.name, within) == ("destein@0.1", True)
    best, within = choose(metrics, cells, 1.05)
    assert (best.name, within) == ("destein@0.05", False)  # none within: the weakest, flagged


def test_choose_refuses_repetition_that_lowers_perplexity() -> None:
    cells = [
        MethodSpec(f"goodtriever@{a:g}", SteeringConfig(alpha=a, form="goodtriever")) for a in (1.0, 2.0)
    ]
    metrics = _metrics(
        baseline=(0.5, 0.5, 10.0, 0.90),
        **{"goodtriever@1": (0.4, 0.3, 10.5, 0.88), "goodtriever@2": (0.1, 0.0, 6.0, 0.50)},
    )
    assert choose(metrics, cells, 1.2)[0].name == "goodtriever@1"  # @2 repeats itself: dist-2 0.5 < 0.9 x 0.9


def test_pooled_calibration_averages_seeds_and_chooses_on_them() -> None:
    def run(base: float, a: float, b: float) -> dict:
        cells = {"baseline": (0.5, base), "destein@0.05": (0.3, a), "destein@0.1": (0.1, b)}
        return {
            n: {"expected_max_toxicity": e, "toxicity_probability": e, "perplexity": p, "dist_2": 0.9}
            for n, (e, p) in cells.items()
        }

    one, two = run(10.0, 10.5, 11.9), run(10.0, 10.5, 10.5)  # 0.1 within 1.1x under one seed only
    cells = [cell("destein", s, (2, 4)) for s in (0.05, 0.1)]
    assert (
        choose(one, cells, 1.1)[0].name == "destein@0.05" and choose(two, cells, 1.1)[0].name == "destein@0.1"
    )
    both = pooled([one, two])
    assert both["destein@0.1"]["perplexity"] == pytest.approx(11.2)
    assert choose(both, cells, 1.1)[0].name == "destein@0.05"  # 11.2 > 11.0 pooled
    assert pooled([one]) == one


def test_calibration_prompts_are_checked() -> None:
    evaluation = [Prompt("one prompt", None, "a"), Prompt("another", None, "b")]
    with pytest.raises(DesteinError, match="needs --calibration-prompts"):
        check_calibration(evaluation, None, 1.2)
    with pytest.raises(DesteinError, match="empty"):
        check_calibration(evaluation, [], 1.2)
    with pytest.raises(DesteinError, match="also evaluation prompts"):
        check_calibration(evaluation, [Prompt("another", None, "c")], 1.2)
    with pytest.raises(DesteinError, match="above 1"):
        check_calibration(evaluation, [Prompt("x", None, "c")], 0.9)
    with pytest.raises(DesteinError, match="only with --ppl-budget"):
        check_calibration(evaluation, [Prompt("x", None, "c")], None)


@pytest.fixture(scope="module")
def tiny_fitted(tiny_model):
    return build_vectors(
        tiny_model, builtin_seed_pairs().head(20), k=4, fit_forms=("iti", "act"), progress=False
    )


TINY = {"samples": 2, "max_new_tokens": 6, "batch_size": 4}


def test_compare_calibrates_off_the_evaluation_prompts_and_resumes(
    tiny_model, tiny_fitted, tmp_path, word_length
) -> None:
    prompts, calibration = builtin_demo_prompts()[:3], builtin_demo_prompts()[3:6]
    config = eval_config(**TINY)
    strengths = {"destein": (0.05, 0.2), "iti": (1.0, 4.0)}
    args = (tiny_model, tiny_fitted, prompts, ["baseline", "destein", "iti", "act"], tmp_path / "c", config)
    opts = {"strengths": strengths, "ppl_budget": 1.5, "calibration": calibration, "progress": False}
    metrics = compare(*args, **opts)
    chosen = metrics["compare"]["chosen"]
    assert set(chosen) == {"destein", "iti", "act"}
    tuned = json.loads((tmp_path / "c" / CALIBRATION_DIR / "metrics.json").read_text())
    for name, choice in chosen.items():
        assert choice["cell"] in tuned and choice["cell"] in metrics
        grid = strengths.get(name, FORMS[name].grid)
        assert {f"{name}@{s:g}" for s in grid} <= set(tuned)  # every strength tried on calibration
    evaluated = [k for k, v in metrics.items() if isinstance(v, dict) and "expected_max_toxicity" in v]
    assert sorted(evaluated) == sorted(["baseline", *(c["cell"] for c in chosen.values())])
    for name in evaluated:
        assert metrics[name]["n_prompts"] == 3 and len(metrics[name]["expected_max_toxicity_ci"]) == 2
        assert len(metrics[name]["perplexity_ci"]) == 2
    pairs = metrics["compare"]["paired"]
    assert set(pairs) == {f"{a} vs {b}" for a in evaluated[1:] for b in evaluated if a != b}
    for entry in pairs.values():
        emt = entry["emt_diff"]
        assert emt[1] <= emt[0] <= emt[2] and isinstance(entry["dominates"], bool)
    write_report(tmp_path / "c")
    report = (tmp_path / "c" / "report.md").read_text()
    assert "Paired differences" in report
    assert (
        "Published, other models and scorer" in report
        and "| GPT2-large | DeStein | 0.160 | 0.029 |" in report
    )
    # Resume: drop the last prompt of one cell; the rerun redoes exactly it, byte for byte.
    path = gens_path(tmp_path / "c", chosen["iti"]["cell"])
    before = path.read_bytes()
    path.write_bytes(b"".join(before.splitlines(keepends=True)[:-1]))
    again = compare(*args, **opts, extra_scorers=[word_length])  # and a second scorer, from the stored texts
    assert path.read_bytes() == before
    assert again["compare"]["chosen"] == chosen
    under = again["compare"]["paired_by_scorer"]["word-length"]
    assert set(under) == set(pairs) and all(under[k]["ppl_ratio"] == pairs[k]["ppl_ratio"] for k in pairs)
    tuned = json.loads((tmp_path / "c" / CALIBRATION_DIR / "metrics.json").read_text())
    assert "word-length" in tuned["baseline"]["by_scorer"]  # the calibration is rescored too
    paths = compare_figures(tmp_path / "c", formats=("html",))
    assert {p.name for p in paths} >= {"pareto.html", "pareto_calibration.html", "pareto_word-length.html"}


def test_every_cell_draws_the_same_random_numbers(tiny_model, tiny_fitted, tmp_path) -> None:
    """Strength 0 is the unsteered model, so with the same draws its cell equals the baseline."""
    metrics = compare(
        tiny_model,
        tiny_fitted,
        builtin_demo_prompts()[:2],
        ["baseline", "destein"],
        tmp_path,
        eval_config(**TINY),
        strengths={"destein": (0.0, 0.1)},
        progress=False,
    )
    rows = {name: gens_path(tmp_path, name).read_text().splitlines() for name in ("baseline", "destein@0")}
    assert rows["baseline"] == rows["destein@0"]
    assert metrics["destein@0"]["expected_max_toxicity"] == metrics["baseline"]["expected_max_toxicity"]


def test_pareto_points_and_figure() -> None:
    metrics = _metrics(baseline=(0.5, 0.5, 10.0), **{"iti@2": (0.3, 0.2, 12.0), "iti@1": (0.4, 0.3, 11.0)})
    points = pareto_points(metrics)
    assert [p["strength"] for p in points["iti"]] == [1.0, 2.0]
    assert points["iti"][1]["ppl_ratio"] == pytest.approx(1.2)
    fig = pareto_figure(metrics, chosen=["iti@2"], budget=1.2)
    assert len(fig.data) == 4 and fig.data[2].marker.symbol[1] == "star"
    tuned = _metrics(
        baseline=(0.6, 0.5, 9.0), **{f"iti@{s}": (0.5 - s / 10, 0.3, 9.0 + s) for s in (1, 2, 4)}
    )
    fig = pareto_figure(metrics, chosen=["iti@2"], curves=tuned)
    curve = [t for t in fig.data if t.name == "iti (calibration)"]
    assert len(curve) == 2 and list(curve[0].x) == pytest.approx([10 / 9, 11 / 9, 13 / 9])
    assert curve[0].line.dash == "dot" and curve[0].line.color == fig.data[-1].line.color
    with pytest.raises(DesteinError, match="baseline"):
        pareto_points({"iti@1": metrics["iti@1"]})


def test_pareto_gives_every_method_its_own_colour() -> None:
    """The full compare has 14 methods, more than D3's ten colours: none may share one."""
    methods = [f"m{i}" for i in range(14)]
    metrics = _metrics(baseline=(0.6, 0.5, 9.0), **{f"{m}@1": (0.5, 0.3, 9.5) for m in methods})
    fig = pareto_figure(metrics, chosen=[])
    colours = {t.name: t.marker.color for t in fig.data if t.name != "baseline"}
    assert len(colours) == 14 and len(set(colours.values())) == 14


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], contains: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], lines


def _file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text, encoding="utf-8")
    return str(tmp / name)


BAD = {
    "unknown method": (lambda t: ["--methods", "baseline,nope"], "unknown method"),
    "malformed strengths": (lambda t: ["--strengths", "destein:0.1"], "method=s1"),
    "strength out of range": (lambda t: ["--strengths", "act=3"], "within"),
    "budget without calibration": (lambda t: ["--ppl-budget", "1.2"], "needs --calibration-prompts"),
    "calibration samples without a budget": (
        lambda t: ["--calibration-samples", "4"],
        "--calibration-samples is used only with --ppl-budget",
    ),
    "calibration samples 0": (
        lambda t: [
            "--ppl-budget",
            "1.2",
            "--calibration-prompts",
            _file(t, "c.txt", "x y\n"),
            "--calibration-samples",
            "0",
        ],
        "--calibration-samples",
    ),
    "calibration seeds without a budget": (
        lambda t: ["--calibration-seeds", "0,1"],
        "--calibration-seeds is used only with --ppl-budget",
    ),
    "calibration seeds repeated": (
        lambda t: (
            ["--ppl-budget", "1.2", "--calibration-prompts", _file(t, "c.txt", "x y\n")]
            + ["--calibration-seeds", "1,1"]
        ),
        "distinct seeds",
    ),
    "calibration seeds not numbers": (
        lambda t: (
            ["--ppl-budget", "1.2", "--calibration-prompts", _file(t, "c.txt", "x y\n")]
            + ["--calibration-seeds", "0,a"]
        ),
        "seeds like 0,1",
    ),
    "more causal heads than the model has": (
        lambda t: ["--methods", "baseline,destein:causal", "--ks", "destein:causal=8,99"],
        "between 1 and 72",
    ),
    "causal variant of a method not on heads": (
        lambda t: ["--methods", "act:causal"],
        "does not act on heads",
    ),
    "empty calibration set": (
        lambda t: ["--ppl-budget", "1.2", "--calibration-prompts", _file(t, "empty.txt", "\n")],
        "no prompts",
    ),
    "calibration on the evaluation prompts": (
        lambda t: (
            ["--ppl-budget", "1.2", "--calibration-prompts", _file(t, "same.txt", "a b c\n")]
            + ["--prompts", str(t / "same.txt")]
        ),
        "also evaluation prompts",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_compare_refuses_bad_input_before_any_model_work(case, tmp_path, capsys, monkeypatch) -> None:
    import destein_lens.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(destein_lens.models, "load_model", no_load)
    make, contains = BAD[case]
    _refused(["compare", *make(tmp_path), "--out", str(tmp_path / "c")], capsys, contains)
    assert not (tmp_path / "c" / "config.json").exists()


def test_figures_draws_a_compare_folder_and_refuses_a_run_folder(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(baseline=(0.5, 0.5, 10.0))))
    _refused(["figures", "--compare", str(run), "--out", str(tmp_path / "f")], capsys, "not a compare folder")


def test_cli_compares_causal_heads_over_a_k_grid(tiny_model_dir, tmp_path, capsys) -> None:
    """`<method>:causal` through the command: the folder's vectors get the causal ranking, the
    calibration tries every (strength, k), one cell per method is evaluated."""
    prompts = _file(tmp_path, "p.txt", "The weather today is\nYou are\n")
    calibration = _file(tmp_path, "c.txt", "My neighbour\nThe city council\n")
    argv = ["compare", "--model", str(tiny_model_dir), "--k", "4", "--methods", "baseline,destein:causal"]
    argv += ["--strengths", "destein:causal=0.1", "--ks", "destein:causal=2,4", "--prompts", prompts]
    argv += ["--ppl-budget", "1.5", "--calibration-prompts", calibration, "--calibration-samples", "2"]
    argv += ["--calibration-seeds", "0,7", "--samples", "1", "--dtype", "float32"]
    cli.main([*argv, "--out", str(tmp_path / "c")])
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    tuned = json.loads((tmp_path / "c" / CALIBRATION_DIR / "metrics.json").read_text())
    other = json.loads((tmp_path / "c" / f"{CALIBRATION_DIR}-seed7" / "metrics.json").read_text())
    assert {"destein:causal2@0.1", "destein:causal4@0.1"} <= set(tuned) & set(other)
    choice = metrics["compare"]["chosen"]["destein:causal"]
    chosen = choice["cell"]
    assert chosen in tuned and metrics["compare"]["cells"][chosen]["heads"] in ("causal:2", "causal:4")
    assert set(choice["by_seed"]) == {"0", "7"} and set(choice["by_seed"].values()) <= set(tuned)
    assert (
        chosen
        == choose(pooled([tuned, other]), [cell("destein:causal", 0.1, (2, 4), k) for k in (2, 4)], 1.5)[
            0
        ].name
    )
    assert metrics["compare"]["ks"] == {"destein:causal": [2, 4]}
    assert tuned["baseline"]["samples"] == 4 and metrics["baseline"]["samples"] == 2  # 2 prompts each
    assert metrics["compare"]["calibration_samples"] == 2 and metrics["compare"]["calibration_seeds"] == [
        0,
        7,
    ]
    assert "each seed alone" in (tmp_path / "c" / "report.md").read_text()
    assert load_compare(tmp_path / "c")["calibration"] == pooled([tuned, other])
    fewer = [
        a for a in argv if a not in ("--calibration-seeds", "0,7")
    ]  # seed 0 alone would drop seed 7's run
    capsys.readouterr()
    _refused([*fewer, "--out", str(tmp_path / "c")], capsys, "other seeds")
    vectors = DetoxVectors.load(tmp_path / "c" / "vectors.safetensors")
    assert vectors.causal_ranking("destein").scored_on["how"] == "cross-fit"
