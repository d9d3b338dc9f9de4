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

from .errors import DesteinError

Command = Callable[[argparse.Namespace], None]
DEFAULT_SAMPLES = 10
DATA_PARALLEL = ("run", "evaluate", "compare", "attribute")


def _load(args: argparse.Namespace, dtype=None):  # -> TransformerBridge (imported lazily: a slow import)
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=dtype or args.torch_dtype)


def _last_checks(args: argparse.Namespace) -> None:
    """--model, --device and --dtype, without loading anything (each rank of a launch on its own
    GPU); then join the launch. Every check before this point needs no model and is the same on
    every rank, so a refusal there is reported by rank 0 alone (`main`)."""
    from . import distributed
    from .models import check_device, check_model_name, resolve_dtype

    args.device = check_device(distributed.rank_device(args.device))
    args.torch_dtype = resolve_dtype(args.dtype, args.device, generates=args.generates)
    check_model_name(args.model)
    distributed.setup()


def _check_heads_early(args: argparse.Namespace, heads) -> None:
    """Head ranges against the model's shape where it can be read without loading the model."""
    from .models import model_shape
    from .steering import check_heads

    shape = model_shape(args.model)
    if shape is not None:
        check_heads(heads, *shape)


def _max_prompts(value: int | None, flag: str) -> int | None:
    from .readers import check_count

    if value is not None:
        check_count(value, flag)
    return value


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
    _last_checks(args)
    model = _load(args)
    check_prompt_lengths(model, args.prompts, config.max_new_tokens)
    for prompt, continuations in zip(args.prompts, generate(model, args.prompts, config)):
        print(json.dumps({"prompt": prompt, "continuations": continuations}, ensure_ascii=False))


def _vector_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Pairs and vector settings, checked; `build_vectors` keywords plus the pairs."""
    from .pairs import load_pairs
    from .readers import check_count

    check_count(args.k, "--k")
    return {"pairs": load_pairs(args.pairs), "site": args.site, "k": args.k, "probe_texts": args.probe_texts}


def _cmd_vectors(args: argparse.Namespace) -> None:
    from .files import check_out_file
    from .vectors import build_vectors

    inputs = _vector_inputs(args)
    check_out_file(args.out)
    _last_checks(args)
    vectors = build_vectors(_load(args), **inputs)
    path = vectors.save(args.out)
    top = ", ".join(f"L{layer}H{head}" for layer, head in vectors.ranking()[:5])
    print(f"wrote {path} and {path.with_suffix('.json')}; top heads by probe accuracy: {top}")


def _vector_settings(args: argparse.Namespace, pairs) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's pair provenance, and the vector settings a folder's own vectors must match."""
    provenance = {"pairs": pairs.source, "pairs_sha256": pairs.sha256()}
    settings = {
        "site": args.site,
        "k": args.k,
        "pairs_sha256": pairs.sha256(),
        "probe_texts": args.probe_texts,
    }
    return provenance, settings


def _cmd_induce(args: argparse.Namespace) -> None:
    from .files import check_out_file
    from .induction import induce_pairs
    from .pairs import load_pairs
    from .readers import check_count
    from .scoring import get_scorer

    check_count(args.n, "--n")
    seeds = load_pairs(args.seeds)
    scorer = get_scorer(args.scorer)
    check_out_file(args.out)
    _last_checks(args)
    result = induce_pairs(_load(args), seeds, n_pairs=args.n, scorer=scorer, seed=args.seed)
    result.pairs.to_jsonl(args.out)
    print(f"wrote {len(result.pairs)} pairs to {args.out} ({result.tried} candidates tried)")


def _eval_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about the evaluation that can be wrong, checked before any model work starts."""
    from .evaluation import BASELINE, MethodSpec, eval_config
    from .files import check_out_dir
    from .prompts import load_prompts
    from .registry import get_form
    from .scoring import get_scorer
    from .steering import SteeringConfig, parse_heads

    config = eval_config(args.samples, seed=args.seed, batch_size=args.batch_size, scorer=args.scorer)
    alpha = get_form(args.form).default_strength if args.alpha is None else args.alpha
    steering = SteeringConfig(
        alpha=alpha, heads=parse_heads(args.heads), positions=args.positions, form=args.form
    )
    _check_heads_early(args, steering.heads)
    check_out_dir(args.out)
    # The steered method is named by its form ("destein" for the default, as run folders always had).
    return {
        "prompts": load_prompts(args.prompts, max_prompts=_max_prompts(args.max_prompts, "--max-prompts")),
        "methods": [BASELINE, MethodSpec(args.form, steering)],
        "config": config,
        "scorer": get_scorer(args.scorer),
    }


def _known_so_far(args: argparse.Namespace, inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The run config's fields known before the model is loaded (a folder of another run is refused)."""
    from .evaluation import prompts_sha
    from .models import DEFAULT_MODEL

    prompts = inputs["prompts"]
    return {
        "eval": inputs["config"].to_dict(),
        "methods": [m.to_dict() for m in inputs["methods"]],
        "prompts": {"n": len(prompts), "sha256": prompts_sha(prompts)},
        "model": {"name": args.model or DEFAULT_MODEL, "dtype": _dtype_name(args)},
        **fields,
    }


def _dtype_name(args: argparse.Namespace) -> str:
    return str(args.torch_dtype).removeprefix("torch.")


def _prepare(model, inputs: dict[str, Any]) -> None:
    """Checks that need the model but no generation: head ranges and prompt lengths."""
    from .evaluation import check_prompts
    from .steering import check_heads

    for method in inputs["methods"]:
        check_heads(method.steering.heads, model.cfg.n_layers, model.cfg.n_heads)
    check_prompts(model, inputs["prompts"], inputs["config"])


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

    from . import runfolder

    inputs = _eval_inputs(args)
    vector_inputs = _vector_inputs(args)
    provenance, settings = _vector_settings(args, vector_inputs["pairs"])
    _last_checks(args)
    with runfolder.hold(args.out) as out:
        runfolder.check_same_run(
            out, _known_so_far(args, inputs, vectors=settings, **provenance), partial=True
        )
        _check_vector_file(out)
        model, vectors = _model_and_vectors(
            args, out, vector_inputs, settings, _fits_for(args.form), lambda m: _prepare(m, inputs)
        )
        _evaluate(args, model, vectors, inputs, provenance)


def _fits_for(form: str) -> list[str]:
    """The statistics a form needs fitted from the pairs besides DeStein's ([] for DeStein's own)."""
    from .registry import get_form

    return [form] if get_form(form).fit is not None else []


def _check_vector_file(out) -> None:
    """A folder's own vector file, if it has one, is read and checked before the model loads."""
    from pathlib import Path

    from .vectors import DetoxVectors

    if (Path(out) / "vectors.safetensors").exists():
        DetoxVectors.load(Path(out) / "vectors.safetensors")


def _model_and_vectors(
    args: argparse.Namespace,
    out,
    vector_inputs: dict[str, Any],
    settings: dict[str, Any],
    fit_forms=(),
    prepare: Callable[[Any], None] = lambda model: None,
):
    """The model in --dtype and the folder's own vectors: built once (rank 0 of a launch) from a
    float32 forward whatever the generation dtype, saved, and checked against the model on a resume.

    `prepare(model)` runs the checks that need the model before the vectors are built.
    """
    from pathlib import Path

    import torch

    from .distributed import barrier, is_main
    from .evaluation import vectors_id
    from .vectors import DetoxVectors, build_vectors

    vectors_path = Path(out) / "vectors.safetensors"
    build = is_main() and not vectors_path.exists()
    model = _load(args, torch.float32 if build else None)
    prepare(model)
    vectors = None
    if build:
        vectors = build_vectors(model, **vector_inputs, fit_forms=fit_forms)
        vectors.save(vectors_path)
        if args.torch_dtype != torch.float32:
            del model
            model = _load(args)
    barrier()  # the other ranks load what rank 0 built
    if vectors is not None:
        return model, vectors
    vectors = DetoxVectors.load(vectors_path, model=model)
    found = {key: vectors_id(vectors)[key] for key in settings}
    if found != settings:
        raise DesteinError(
            f"{vectors_path} was built with other settings ({found}); use another --out folder"
        )
    for form in fit_forms:
        vectors.fit(form)
    return model, vectors


def _cmd_compare(args: argparse.Namespace) -> None:
    from . import runfolder
    from .compare import (
        CALIBRATION_DIR,
        check_calibration,
        check_cells,
        compare,
        parse_methods,
        parse_strengths,
    )
    from .distributed import is_main
    from .evaluation import BASELINE, eval_config, prompts_sha
    from .figures import compare_figures
    from .files import check_out_dir
    from .models import DEFAULT_MODEL
    from .prompts import load_prompts
    from .registry import get_form
    from .report import text_table, write_report
    from .scoring import get_scorer

    methods = parse_methods(args.methods)
    strengths = parse_strengths(args.strengths, methods)
    config = eval_config(args.samples, seed=args.seed, batch_size=args.batch_size, scorer=args.scorer)
    prompts = load_prompts(args.prompts, max_prompts=_max_prompts(args.max_prompts, "--max-prompts"))
    max_calibration = _max_prompts(args.max_calibration_prompts, "--max-calibration-prompts")
    calibration = (
        None
        if args.calibration_prompts is None
        else load_prompts(args.calibration_prompts, max_prompts=max_calibration)
    )
    check_calibration(prompts, calibration, args.ppl_budget)
    scorer = get_scorer(args.scorer)
    vector_inputs = _vector_inputs(args)
    provenance, settings = _vector_settings(args, vector_inputs["pairs"])
    fit_forms = [m for m in methods if m != "baseline" and get_form(m).fit is not None]
    check_out_dir(args.out)
    _last_checks(args)
    with runfolder.hold(args.out) as out:
        known = {
            "eval": config.to_dict(),
            "prompts": {"n": len(prompts), "sha256": prompts_sha(prompts)},
            "model": {"name": args.model or DEFAULT_MODEL, "dtype": _dtype_name(args)},
            **provenance,
        }
        runfolder.check_same_run(out, known, partial=True)
        check_cells(out, methods, strengths, calibrating=args.ppl_budget is not None)
        if calibration is not None:
            calibration_known = {
                **known,
                "prompts": {"n": len(calibration), "sha256": prompts_sha(calibration)},
            }
            runfolder.check_same_run(out / CALIBRATION_DIR, calibration_known, partial=True)
        _check_vector_file(out)

        def prepare(model) -> None:
            for checked in (prompts, calibration):
                if checked is not None:
                    _prepare(model, {"methods": [BASELINE], "prompts": checked, "config": config})

        model, vectors = _model_and_vectors(args, out, vector_inputs, settings, fit_forms, prepare)
        metrics = compare(
            model,
            vectors,
            prompts,
            methods,
            out,
            config,
            strengths=strengths,
            ppl_budget=args.ppl_budget,
            calibration=calibration,
            scorer=scorer,
            provenance=provenance,
        )
        if not is_main():
            return
        write_report(out)
        compare_figures(out)
    print(text_table(metrics))
    for name, choice in metrics["compare"]["chosen"].items():
        flag = "" if choice["within_budget"] else f" (no strength within {args.ppl_budget:g}x; the weakest)"
        print(f"calibrated {name}: strength {choice['strength']:g}{flag}")
    print(f"compare folder: {args.out} (metrics.json, report.md, pareto.html, prompted_gens_*.jsonl)")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from . import runfolder
    from .evaluation import vectors_id
    from .vectors import DetoxVectors

    inputs = _eval_inputs(args)
    vectors = DetoxVectors.load(args.vectors)  # the file itself, before any model work
    for form in _fits_for(args.form):
        vectors.fit(form)
    provenance = {"vectors_file": str(args.vectors)}
    _last_checks(args)
    with runfolder.hold(args.out) as out:
        runfolder.check_same_run(
            out, _known_so_far(args, inputs, vectors=vectors_id(vectors), **provenance), partial=True
        )
        model = _load(args)
        vectors.check_compatible(model)
        _prepare(model, inputs)
        _evaluate(args, model, vectors, inputs, provenance)


def _cmd_figures(args: argparse.Namespace) -> None:
    from .figures import check_figures_inputs, compare_figures, make_figures
    from .steering import SteeringConfig

    if args.attribution:
        from .figures import attribution_figures
        from .files import check_out_dir

        if args.out is not None:
            check_out_dir(args.out)
        paths = attribution_figures(args.attribution, args.out)
        print(f"wrote {len(paths)} files (the figures of {', '.join(args.attribution)})")
        return
    args.out = args.out or "figures"
    if args.compare is not None:
        from .files import check_out_dir

        check_out_dir(args.out)
        paths = compare_figures(args.compare, args.out)
        print(f"wrote {len(paths)} files to {args.out} (the Pareto figure of {args.compare})")
        return

    SteeringConfig(alpha=args.alpha)
    sweep_rows = check_figures_inputs(args.out, args.sweep)
    _last_checks(args)
    paths = make_figures(
        args.out,
        model=_load(args),
        quick=args.quick,
        sweep_json=args.sweep,
        sweep_rows=sweep_rows,
        alpha=args.alpha,
    )
    print(f"wrote {len(paths)} files to {args.out} (see {args.out}/README.md)")


def _cmd_attribute(args: argparse.Namespace) -> None:
    from .attribution import StudySettings, parse_studies, run_study
    from .attribution.study import check_held_out, held_out_pairs
    from .distributed import is_main
    from .figures import attribution_figures
    from .files import check_out_dir
    from .prompts import load_prompts
    from .readers import check_count
    from .steering import SteeringConfig

    studies = parse_studies(args.study)
    check_count(args.n_held_out, "--n-held-out")
    check_count(args.batch_size, "--batch-size")
    check_count(args.max_prompts, "--max-prompts")
    SteeringConfig(alpha=args.alpha)
    settings = StudySettings(alpha=args.alpha, batch_size=args.batch_size, eval_samples=args.samples)
    vector_inputs = _vector_inputs(args)
    held = held_out_pairs(args.held_out, args.n_held_out, vector_inputs["pairs"])
    check_held_out(studies, held, vector_inputs["pairs"].sha256())
    prompts = load_prompts(args.prompts, max_prompts=args.max_prompts)  # part of the folder's identity
    check_out_dir(args.out)
    _last_checks(args)
    _, vector_settings = _vector_settings(args, vector_inputs["pairs"])
    model, vectors = _model_and_vectors(args, args.out, vector_inputs, vector_settings)
    run_study(model, vectors, held, args.out, studies=studies, settings=settings, prompts=prompts)
    if not is_main():
        return
    paths = attribution_figures(args.out)
    print(f"wrote {args.out}/report.md and {len(paths)} figure files in {args.out}/figures")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF id, local HF folder or .gguf file (default: gemma-3-270m)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if available, else cpu; under torchrun: the rank's LOCAL_RANK GPU)",
    )
    from .models import DTYPES

    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="model dtype (auto: bfloat16 to generate where the hardware multiplies bf16, else float32; "
        "vectors and probes are always built in float32)",
    )


def _add_vector_options(p: argparse.ArgumentParser) -> None:
    from .activations import SITES
    from .vectors import PROBE_TEXTS

    p.add_argument("--pairs", default=None, help="pairs: JSONL, ParaDetox TSV, hf:<id> (default: built-in)")
    p.add_argument("--site", default=SITES[0], choices=SITES)
    p.add_argument("--k", type=int, default=8, help="mean over the last k tokens")
    p.add_argument("--probe-texts", default=PROBE_TEXTS[0], choices=PROBE_TEXTS)


def _add_strength_option(p: argparse.ArgumentParser, per_form: bool = False) -> None:
    from .registry import DEFAULT_STRENGTH, MAX_STRENGTH

    default = "each form's calibrated default, destein 0.05" if per_form else f"{DEFAULT_STRENGTH:g}"
    p.add_argument(
        "--alpha",
        type=float,
        default=None if per_form else DEFAULT_STRENGTH,
        help=f"steering strength (default: {default}); DeStein forms take [-{MAX_STRENGTH:g}, "
        f"{MAX_STRENGTH:g}]: 0 steers nothing, negative toxifies, and larger values are refused (the "
        "direction would replace the head output); other forms have their own range",
    )


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    from .registry import FORMS
    from .steering import POSITIONS

    p.add_argument(
        "--prompts", default=None, help="RTP JSONL, JSONL/txt list, hf:<id> (default: built-in demo)"
    )
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--scorer", default="profanity-check")
    _add_strength_option(p, per_form=True)
    p.add_argument("--heads", default="all", help="all, top-k as a number, or L.H,L.H,...")
    p.add_argument("--positions", default=POSITIONS[0], choices=POSITIONS)
    p.add_argument(
        "--form",
        default="destein",
        choices=list(FORMS),
        help="; ".join(f"{f.name}: {f.summary}" for f in FORMS.values()),
    )
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="continuations per prompt")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="run folder (resumable)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed by rank 0 alone under a launcher (as `main` does)."""

    def error(self, message: str):  # type: ignore[override]
        from . import distributed

        if not distributed.is_main():
            raise SystemExit(0)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="destein-lens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample continuations of prompts through the hooked model")
    _add_model_options(p)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate, generates=True)

    p = sub.add_parser("vectors", help="build detox vectors from steering pairs")
    _add_model_options(p)
    _add_vector_options(p)
    p.add_argument("--out", required=True, help="output path (.safetensors + .json sidecar)")
    p.set_defaults(func=_cmd_vectors, generates=False)

    pairs = sub.add_parser("pairs", help="steering pairs").add_subparsers(dest="pairs_command", required=True)
    p = pairs.add_parser("induce", help="let the model write new steering pairs from few-shot seeds")
    _add_model_options(p)
    p.add_argument("--seeds", default=None, help="seed pairs (default: built-in)")
    p.add_argument("--n", type=int, default=20, help="how many pairs to keep")
    p.add_argument("--scorer", default="profanity-check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output JSONL")
    p.set_defaults(func=_cmd_induce, generates=True)

    p = sub.add_parser("run", help="the whole pipeline: vectors, baseline vs DeStein, report")
    _add_model_options(p)
    _add_vector_options(p)
    _add_eval_options(p)
    p.set_defaults(func=_cmd_run, generates=True)

    p = sub.add_parser(
        "compare", help="DeStein vs the training-free baselines: (method, strength) cells on the same draws"
    )
    _add_model_options(p)
    _add_vector_options(p)
    from .registry import FORMS, compared_by_default

    p.add_argument(
        "--prompts", default=None, help="RTP JSONL, JSONL/txt list, hf:<id> (default: built-in demo)"
    )
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument(
        "--methods",
        default=",".join(compared_by_default()),
        help=f"comma-separated, of: baseline, {', '.join(FORMS)}",
    )
    p.add_argument(
        "--strengths",
        nargs="+",
        default=[],
        metavar="METHOD=S1,S2",
        help="strengths per method (default: each method's calibrated default; its grid with --ppl-budget)",
    )
    p.add_argument("--ppl-budget", type=float, default=None, help="calibrate: the perplexity ratio allowed")
    p.add_argument("--calibration-prompts", default=None, help="prompts to calibrate on (never --prompts)")
    p.add_argument("--max-calibration-prompts", type=int, default=None)
    p.add_argument("--scorer", default="profanity-check")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="continuations per prompt")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare", help="compare folder (resumable)")
    p.set_defaults(func=_cmd_compare, generates=True)

    p = sub.add_parser(
        "attribute", help="head attribution studies: which heads carry toxicity, with intervals"
    )
    _add_model_options(p)
    _add_vector_options(p)
    from .attribution import STUDIES
    from .pairs import DEFAULT_HF_PARADETOX

    p.add_argument("--study", default="all", help=f"all, or a comma list of: {', '.join(STUDIES)}")
    p.add_argument(
        "--held-out",
        default=f"hf:{DEFAULT_HF_PARADETOX}",
        help="pairs the effects are measured on, none among --pairs (default: ParaDetox from the hub)",
    )
    p.add_argument(
        "--n-held-out",
        type=int,
        default=16,
        help="held-out pairs (16: the full study within 15 min on 2 cores)",
    )
    _add_strength_option(p)
    p.add_argument("--prompts", default=None, help="the selection's EMT/TP prompts (default: built-in demo)")
    p.add_argument("--max-prompts", type=int, default=10)
    p.add_argument("--samples", type=int, default=2, help="continuations per prompt in the selection's runs")
    p.add_argument("--batch-size", type=int, default=16, help="held-out pairs per forward")
    p.add_argument("--out", default="runs/attribution", help="study folder (resumable)")
    p.set_defaults(func=_cmd_attribute, generates=False)

    p = sub.add_parser("evaluate", help="evaluate saved vectors on a prompt file")
    _add_model_options(p)
    p.add_argument("--vectors", required=True, help="a .safetensors vector file (with its .json)")
    _add_eval_options(p)
    p.set_defaults(func=_cmd_evaluate, generates=True)

    p = sub.add_parser("figures", help="regenerate every figure (HTML + PNG) and its README")
    _add_model_options(p)
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: figures; for --attribution, each study's figures/)",
    )
    p.add_argument("--sweep", default=None, help="a benchmark sweep.json (default: run a small sweep)")
    _add_strength_option(p)
    p.add_argument("--quick", action="store_true", help="fewer pairs, prompts and samples")
    p.add_argument("--compare", default=None, help="a compare folder: draw its Pareto figure only (no model)")
    p.add_argument(
        "--attribution",
        nargs="+",
        default=None,
        metavar="DIR",
        help="attribution study folders (no model needed); several, one per model, add cross-model views",
    )
    p.set_defaults(func=_cmd_figures, generates=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from . import distributed

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if distributed.launched() and args.command not in DATA_PARALLEL:
            raise DesteinError(
                f"`{args.command}` does not run data-parallel; start it without torchrun/accelerate "
                f"(data-parallel commands: {', '.join(DATA_PARALLEL)})"
            )
        args.func(args)  # joins a launch once its model-free checks pass (`_last_checks`)
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
