"""`destein-lens` command line: one subcommand per pipeline stage, plus `run` for the whole job.

Every user error is one line on stderr (`error: ...`) and exit status 2. Each command checks
everything it can before the first expensive step (a model load, a vector build, a baseline):
arguments, input files, output paths, the run folder. An interrupt exits 130 after the stage in
flight has kept what it already wrote.

`run`, `evaluate`, `compare` and `attribute` also run data-parallel, unchanged, under
`torchrun --nproc-per-node N -m destein_lens ...` or `accelerate launch -m destein_lens ...`
(`distributed`): each rank takes its share, rank 0 merges, prints and writes the reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .cli_parser import build_parser
from .errors import DesteinError

DATA_PARALLEL = ("run", "evaluate", "compare", "attribute")


def _model(args: argparse.Namespace):  # -> lifecycle.ModelSpec, checked (imports lazily: slow)
    from .lifecycle import ModelSpec

    spec = ModelSpec(args.model, args.device, args.dtype, generates=args.generates)
    spec.check()
    return spec


def _count(value: int | None, flag: str) -> int | None:
    from .readers import check_count

    if value is not None:
        check_count(value, flag)
    return value


def _prompts(source: str | None, limit: int | None, flag: str):
    from .prompts import load_prompts

    return load_prompts(source, max_prompts=_count(limit, flag))


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generation import SamplingConfig, check_prompt_lengths, check_prompt_texts, generate

    config = SamplingConfig(
        do_sample=not args.greedy,
        max_new_tokens=args.max_new_tokens,
        top_p=None if args.greedy else args.top_p,
        n=args.samples,
        seed=args.seed,
    )
    check_prompt_texts(args.prompts)
    model = _model(args).load()
    check_prompt_lengths(model, args.prompts, config.max_new_tokens)
    for prompt, continuations in zip(args.prompts, generate(model, args.prompts, config)):
        print(json.dumps({"prompt": prompt, "continuations": continuations}, ensure_ascii=False))


def _vector_spec(args: argparse.Namespace):  # -> lifecycle.VectorSpec, checked
    from .lifecycle import VectorSpec
    from .pairs import load_pairs

    _count(args.k, "--k")
    confirm = getattr(args, "causal_confirm", 0)
    if confirm < 0:
        raise DesteinError(f"--causal-confirm is a number of heads >= 0, got {confirm}")
    return VectorSpec(load_pairs(args.pairs), args.site, args.k, args.probe_texts, confirm)


def _cmd_vectors(args: argparse.Namespace) -> None:
    from . import lifecycle
    from .attribution.causal import check_forms
    from .files import check_out_file

    spec = _vector_spec(args)
    causal = check_forms([f.strip() for f in args.causal.split(",") if f.strip()])
    check_out_file(args.out)
    model = _model(args).load()
    vectors = lifecycle.build_all(model, spec, lifecycle.fits_for(causal), causal)
    path = vectors.save(args.out)
    lines = [
        f"wrote {path} and {path.with_suffix('.json')}",
        f"top heads by probe accuracy: {_top(vectors.ranking())}",
    ]
    for form, ranking in vectors.causal.items():
        lines.append(f"top heads by causal effect ({form}): {_top(ranking.ranking())}")
    print("\n".join(lines))


def _top(order: list[tuple[int, int]]) -> str:
    return ", ".join(f"L{layer}H{head}" for layer, head in order[:5])


def _cmd_induce(args: argparse.Namespace) -> None:
    from .files import check_out_file
    from .induction import induce_pairs
    from .pairs import load_pairs
    from .scoring import get_scorer

    _count(args.n, "--n")
    seeds = load_pairs(args.seeds)
    scorer = get_scorer(args.scorer)
    check_out_file(args.out)
    model = _model(args).load()
    result = induce_pairs(model, seeds, n_pairs=args.n, scorer=scorer, seed=args.seed)
    result.pairs.to_jsonl(args.out)
    print(f"wrote {len(result.pairs)} pairs to {args.out} ({result.tried} candidates tried)")


def _eval_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about the evaluation that can be wrong, checked before any model work starts."""
    from .evaluation import BASELINE, MethodSpec, eval_config
    from .files import check_out_dir
    from .lifecycle import check_heads_early, run_methods
    from .registry import get_form
    from .scoring import get_scorers
    from .steering import SteeringConfig, parse_heads

    scorers = get_scorers(args.scorer)
    config = eval_config(args.samples, seed=args.seed, batch_size=args.batch_size, scorer=scorers[0].name)
    alpha = get_form(args.form).default_strength if args.alpha is None else args.alpha
    steering = SteeringConfig(
        alpha=alpha, heads=parse_heads(args.heads), positions=args.positions, form=args.form
    )
    check_heads_early(args.model, steering.heads)
    check_out_dir(args.out)
    # The steered method is named by its form ("destein" for the default, as run folders always had).
    methods = (
        run_methods(args.model, steering)
        if args.command_name == "run"
        else [BASELINE, MethodSpec(args.form, steering)]
    )
    return {
        "prompts": _prompts(args.prompts, args.max_prompts, "--max-prompts"),
        "methods": methods,
        "config": config,
        "scorer": scorers[0],
        "extra_scorers": scorers[1:],
    }


def _evaluate(args: argparse.Namespace, model, vectors, inputs: dict, provenance: dict) -> None:
    from .distributed import is_main
    from .evaluation import evaluate
    from .report import text_table, write_report

    metrics = evaluate(model, **inputs, out_dir=args.out, vectors=vectors, provenance=provenance)
    if not is_main():
        return
    write_report(args.out)
    print(text_table(metrics))
    print(f"run folder: {args.out} (metrics.json, report.md, report.html, prompted_gens_*.jsonl)")


def _cmd_run(args: argparse.Namespace) -> None:
    from . import lifecycle, runfolder

    inputs = _eval_inputs(args)
    vectors = _vector_spec(args)
    spec = _model(args)
    with runfolder.hold(args.out) as out:
        known = lifecycle.known_identity(
            inputs["config"],
            inputs["prompts"],
            spec,
            inputs["methods"],
            vectors=vectors.settings(),
            **vectors.provenance(),
        )
        runfolder.check_same_run(out, known, partial=True)
        lifecycle.check_vector_file(out, vectors, lifecycle.causal_for(inputs["methods"]))
        model, built = lifecycle.model_and_vectors(
            spec,
            out,
            vectors,
            lifecycle.fits_for([args.form]),
            lambda m: lifecycle.prepare(m, inputs["methods"], inputs["prompts"], inputs["config"]),
            lifecycle.causal_for(inputs["methods"]),
        )
        _evaluate(args, model, built, inputs, vectors.provenance())


def _cmd_compare(args: argparse.Namespace) -> None:
    from . import compare as comparing
    from . import lifecycle, runfolder
    from .distributed import is_main
    from .evaluation import BASELINE, eval_config
    from .figures import compare_figures
    from .files import check_out_dir
    from .report import text_table, write_report
    from .scoring import get_scorers

    methods = comparing.parse_methods(args.methods)
    strengths = comparing.parse_strengths(args.strengths, methods)
    ks = comparing.parse_ks(args.ks, methods)
    fits, causal = comparing.vector_needs(methods)
    for heads in comparing.causal_heads(
        comparing.cell_grid(methods, strengths, args.ppl_budget is not None, ks)
    ):
        lifecycle.check_heads_early(args.model, heads)
    scorers = get_scorers(args.scorer)
    config = eval_config(args.samples, seed=args.seed, batch_size=args.batch_size, scorer=scorers[0].name)
    samples = _count(args.calibration_samples, "--calibration-samples")
    seeds = comparing.parse_seeds(args.calibration_seeds)
    prompts = _prompts(args.prompts, args.max_prompts, "--max-prompts")
    limit = _count(args.max_calibration_prompts, "--max-calibration-prompts")
    calibration = None if args.calibration_prompts is None else _prompts(args.calibration_prompts, limit, "")
    comparing.check_calibration(prompts, calibration, args.ppl_budget, samples, seeds)
    vectors = _vector_spec(args)
    check_out_dir(args.out)
    spec = _model(args)
    with runfolder.hold(args.out) as out:
        runfolder.check_same_run(
            out, lifecycle.known_identity(config, prompts, spec, **vectors.provenance()), partial=True
        )
        comparing.check_cells(out, methods, strengths, calibrating=args.ppl_budget is not None, ks=ks)
        for folder, tuned in comparing.calibration_runs(out, config, samples, seeds) if calibration else []:
            known = lifecycle.known_identity(tuned, calibration, spec, **vectors.provenance())
            runfolder.check_same_run(folder, known, partial=True)
        lifecycle.check_vector_file(out, vectors, causal)

        def checks(model) -> None:
            for checked in (prompts, calibration):
                if checked is not None:
                    lifecycle.prepare(model, [BASELINE], checked, config)

        model, built = lifecycle.model_and_vectors(spec, out, vectors, fits, checks, causal)
        metrics = comparing.compare(
            model,
            built,
            prompts,
            methods,
            out,
            config,
            strengths=strengths,
            ks=ks,
            ppl_budget=args.ppl_budget,
            calibration=calibration,
            calibration_samples=samples,
            calibration_seeds=seeds,
            scorer=scorers[0],
            extra_scorers=scorers[1:],
            provenance=vectors.provenance(),
        )
        if not is_main():
            return
        write_report(out)
        compare_figures(out)
    print(text_table(metrics))
    print(*comparing.chosen_lines(metrics), sep="\n")
    print(f"compare folder: {args.out} (metrics.json, report.md, pareto.html, prompted_gens_*.jsonl)")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from . import lifecycle, runfolder
    from .evaluation import vectors_id
    from .vectors import DetoxVectors

    inputs = _eval_inputs(args)
    vectors = DetoxVectors.load(args.vectors)  # the file itself, before any model work
    for form in lifecycle.fits_for([args.form]):
        vectors.fit(form)
    for form in lifecycle.causal_for(inputs["methods"]):
        vectors.causal_ranking(form)
    provenance = {"vectors_file": str(args.vectors)}
    spec = _model(args)
    with runfolder.hold(args.out) as out:
        known = lifecycle.known_identity(
            inputs["config"],
            inputs["prompts"],
            spec,
            inputs["methods"],
            vectors=vectors_id(vectors),
            **provenance,
        )
        runfolder.check_same_run(out, known, partial=True)
        model = spec.load(folder=out)
        vectors.check_compatible(model)
        lifecycle.prepare(model, inputs["methods"], inputs["prompts"], inputs["config"])
        _evaluate(args, model, vectors, inputs, provenance)


def _cmd_figures(args: argparse.Namespace) -> None:
    from .figures import attribution_figures, check_figures_inputs, compare_figures, make_figures
    from .files import check_out_dir
    from .registry import DEFAULT_STRENGTH
    from .steering import SteeringConfig

    if args.attribution or args.compare is not None:
        given = [flag for flag, on in (("--sweep", args.sweep), ("--quick", args.quick)) if on]
        given += ["--alpha"] if args.alpha != DEFAULT_STRENGTH else []
        if given:
            source = "--attribution" if args.attribution else "--compare"
            raise DesteinError(
                f"{', '.join(given)} do not apply to {source} (it draws saved results, no model)"
            )
    if args.attribution:
        if args.out is not None:
            check_out_dir(args.out)
        paths = attribution_figures(args.attribution, args.out)
        print(f"wrote {len(paths)} files (the figures of {', '.join(args.attribution)})")
        return
    args.out = args.out or "figures"
    if args.compare is not None:
        check_out_dir(args.out)
        paths = compare_figures(args.compare, args.out)
        print(f"wrote {len(paths)} files to {args.out} (the Pareto figure of {args.compare})")
        return
    SteeringConfig(alpha=args.alpha)
    sweep_rows = check_figures_inputs(args.out, args.sweep)
    model = _model(args).load()
    paths = make_figures(
        args.out,
        model=model,
        quick=args.quick,
        sweep_json=args.sweep,
        sweep_rows=sweep_rows,
        alpha=args.alpha,
    )
    print(f"wrote {len(paths)} files to {args.out} (see {args.out}/README.md)")


def _cmd_attribute(args: argparse.Namespace) -> None:
    from . import lifecycle
    from .attribution import StudySettings, parse_studies, run_study
    from .attribution.study import check_held_out, held_out_pairs
    from .distributed import is_main
    from .figures import attribution_figures
    from .files import check_out_dir
    from .scoring import get_scorers

    studies = parse_studies(args.study)
    for value, flag in ((args.n_held_out, "--n-held-out"), (args.batch_size, "--batch-size")):
        _count(value, flag)
    settings = StudySettings(alpha=args.alpha, batch_size=args.batch_size, eval_samples=args.samples)
    scorers = get_scorers(args.scorer)
    vectors = _vector_spec(args)
    held = held_out_pairs(args.held_out, args.n_held_out, vectors.pairs)
    check_held_out(studies, held, vectors.pairs.sha256())
    prompts = _prompts(args.prompts, args.max_prompts, "--max-prompts")  # part of the folder's identity
    check_out_dir(args.out)
    model, built = lifecycle.model_and_vectors(_model(args), args.out, vectors)
    run_study(
        model, built, held, args.out, studies=studies, settings=settings, prompts=prompts, scorers=scorers
    )
    if not is_main():
        return
    paths = attribution_figures(args.out)
    print(f"wrote {args.out}/report.md and {len(paths)} figure files in {args.out}/figures")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "generate": _cmd_generate,
    "vectors": _cmd_vectors,
    "induce": _cmd_induce,
    "run": _cmd_run,
    "compare": _cmd_compare,
    "attribute": _cmd_attribute,
    "evaluate": _cmd_evaluate,
    "figures": _cmd_figures,
}


def main(argv: Sequence[str] | None = None) -> None:
    from . import distributed

    args = build_parser().parse_args(argv)
    command = COMMANDS.get(args.command_name) or args.handler  # a command of its own module
    _quiet_libraries()
    try:
        if distributed.launched() and args.command not in DATA_PARALLEL:
            raise DesteinError(
                f"`{args.command}` does not run data-parallel; start it without torchrun/accelerate "
                f"(data-parallel commands: {', '.join(DATA_PARALLEL)})"
            )
        command(args)  # joins a launch once its model-free checks pass (`lifecycle.ModelSpec.check`)
        distributed.teardown()
    except DesteinError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        # Under a launcher, rank 0 speaks for all. A refusal before the launch was joined comes
        # from the arguments, the same on every rank: the others leave quietly (status 0), so
        # torchrun reports one failure, rank 0's exit 2 (and exits 1 itself).
        raise SystemExit(2 if distributed.is_main() or distributed.joined() else 0) from None
    except KeyboardInterrupt:
        print("error: interrupted; everything finished so far is saved", file=sys.stderr)
        raise SystemExit(130) from None


def _quiet_libraries() -> None:
    """Our own progress bars stay; transformers' per-load bars and advice would bury them."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    main()
