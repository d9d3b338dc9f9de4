"""The command line's grammar: every subcommand, its options and their help, one group per concern.

`cli` dispatches what this parses; the option groups are shared, so an option is defined once.
"""

from __future__ import annotations

import argparse

DEFAULT_SAMPLES = 10
DESCRIPTION = "`destein-lens` command line: one subcommand per pipeline stage, plus `run` for the whole job."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF id, local HF folder or .gguf file (default: gemma-3-270m)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if available, else cpu; under torchrun: the rank's LOCAL_RANK GPU)",
    )
    from .dtypes import DTYPES

    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="model dtype (auto: to generate, float32 or bfloat16, whichever a one-second probe of the "
        "model's matmuls measures faster here, cached; else float32; vectors and probes are always "
        "built in float32)",
    )


def _add_vector_options(p: argparse.ArgumentParser, causal: bool = True) -> None:
    from .activations import SITES
    from .vectors import PROBE_TEXTS

    p.add_argument("--pairs", default=None, help="pairs: JSONL, ParaDetox TSV, hf:<id> (default: built-in)")
    p.add_argument("--site", default=SITES[0], choices=SITES)
    p.add_argument("--k", type=int, default=8, help="mean over the last k tokens")
    p.add_argument("--probe-texts", default=PROBE_TEXTS[0], choices=PROBE_TEXTS)
    if causal:
        p.add_argument(
            "--causal-confirm",
            type=int,
            default=0,
            metavar="K",
            help="causal head rankings: re-score each fold's top K heads by their exact single-head "
            "effect (where the first-order estimate fails at the top, as on SmolLM2's layer 0)",
        )


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


def _add_sampling_options(p: argparse.ArgumentParser, out: str, what: str) -> None:
    """The prompts, the scorer, the draws and the folder: `run`, `evaluate` and `compare` alike."""
    p.add_argument(
        "--prompts", default=None, help="RTP JSONL, JSONL/txt list, hf:<id> (default: built-in demo)"
    )
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument(
        "--scorer",
        default="profanity-check",
        help="toxicity scorer(s), comma-separated: the first is the folder's own; each other one also "
        "scores every continuation (added to a finished folder, it scores the stored texts)",
    )
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="continuations per prompt")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"{what} (resumable)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    from .registry import FORMS
    from .steering import POSITIONS

    _add_sampling_options(p, "runs/latest", "run folder")
    _add_strength_option(p, per_form=True)
    p.add_argument(
        "--heads",
        default="all",
        help="all, top-k by probe as a number, causal:K (top K by causal effect), or L.H,...",
    )
    p.add_argument("--positions", default=POSITIONS[0], choices=POSITIONS)
    p.add_argument(
        "--form",
        default="destein",
        choices=list(FORMS),
        help="; ".join(f"{f.name}: {f.summary}" for f in FORMS.values()),
    )


def _add_expert_options(p: argparse.ArgumentParser) -> None:
    from .experts.settings import KINDS, TrainSettings

    d = TrainSettings()
    p.add_argument("--kind", default=",".join(KINDS), help=f"comma list of: {', '.join(KINDS)}")
    p.add_argument("--pairs", required=True, help="pairs to train on: ParaDetox TSV, JSONL, hf:<id>")
    p.add_argument("--max-texts", type=int, default=d.max_texts, help="training pairs (texts per side)")
    p.add_argument("--held-out", type=int, default=d.held_out, help="pairs kept out, for the held-out loss")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="blocks per step; GeDi: texts per step, half of each side",
    )
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block (GeDi: per text)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate, decayed linearly to 0")
    p.add_argument("--gen-weight", type=float, default=d.gen_weight, help="GeDi's generative loss share")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="adapters folder (default: the cache's experts/)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed by rank 0 alone under a launcher (as `main` does)."""

    def error(self, message: str):  # type: ignore[override]
        from . import distributed

        if not distributed.is_main():
            raise SystemExit(0)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="destein-lens", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample continuations of prompts through the hooked model")
    _add_model_options(p)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(command_name="generate", generates=True)

    p = sub.add_parser("vectors", help="build detox vectors from steering pairs")
    _add_model_options(p)
    _add_vector_options(p)
    p.add_argument(
        "--causal",
        default="",
        metavar="FORMS",
        help="also rank heads by causal effect for these head-wise methods (comma list, e.g. destein,iti), "
        "cross-fitted over two folds of the pairs: steer them with --heads causal:K",
    )
    p.add_argument("--out", required=True, help="output path (.safetensors + .json sidecar)")
    p.set_defaults(command_name="vectors", generates=False)

    pairs = sub.add_parser("pairs", help="steering pairs").add_subparsers(dest="pairs_command", required=True)
    p = pairs.add_parser("induce", help="let the model write new steering pairs from few-shot seeds")
    _add_model_options(p)
    p.add_argument("--seeds", default=None, help="seed pairs (default: built-in)")
    p.add_argument("--n", type=int, default=20, help="how many pairs to keep")
    p.add_argument("--scorer", default="profanity-check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output JSONL")
    p.set_defaults(command_name="induce", generates=True)

    p = sub.add_parser("run", help="the whole pipeline: vectors, baseline vs DeStein, report")
    _add_model_options(p)
    _add_vector_options(p)
    _add_eval_options(p)
    p.set_defaults(command_name="run", generates=True)

    p = sub.add_parser(
        "compare", help="DeStein vs the training-free baselines: (method, strength) cells on the same draws"
    )
    _add_model_options(p)
    _add_vector_options(p)
    from .registry import FORMS, compared_by_default

    _add_sampling_options(p, "runs/compare", "compare folder")
    p.add_argument(
        "--methods",
        default=",".join(compared_by_default()),
        help=f"comma-separated, of: baseline, {', '.join(FORMS)}; a head-wise method as <method>:causal "
        "steers its top k heads by causal effect",
    )
    p.add_argument(
        "--strengths",
        nargs="+",
        default=[],
        metavar="METHOD=S1,S2",
        help="strengths per method (default: each method's calibrated default; its grid with --ppl-budget)",
    )
    p.add_argument(
        "--ks",
        nargs="+",
        default=[],
        metavar="METHOD:causal=K1,K2",
        help="head counts per causal method (default: 16; 4,8,16,32 with --ppl-budget)",
    )
    p.add_argument("--ppl-budget", type=float, default=None, help="calibrate: the perplexity ratio allowed")
    p.add_argument("--calibration-prompts", default=None, help="prompts to calibrate on (never --prompts)")
    p.add_argument("--max-calibration-prompts", type=int, default=None)
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        help="samples per calibration prompt (default: --samples)",
    )
    p.add_argument(
        "--calibration-seeds",
        default=None,
        metavar="S1,S2",
        help="calibrate under each seed, choose on them pooled, report each seed's choice (default: --seed)",
    )
    p.set_defaults(command_name="compare", generates=True)

    p = sub.add_parser(
        "attribute", help="head attribution studies: which heads carry toxicity, with intervals"
    )
    _add_model_options(p)
    _add_vector_options(p, causal=False)
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
    p.add_argument("--scorer", default="profanity-check", help="the selection's scorer(s), as for `run`")
    p.add_argument("--batch-size", type=int, default=16, help="held-out pairs per forward")
    p.add_argument("--out", default="runs/attribution", help="study folder (resumable)")
    p.set_defaults(command_name="attribute", generates=False)

    experts = sub.add_parser("experts", help="small trained experts: LoRA adapters for DExperts, DAPT, GeDi")
    p = experts.add_subparsers(dest="experts_command", required=True).add_parser(
        "train", help="train LoRA adapters of the model on the sides of the pairs"
    )
    _add_model_options(p)
    _add_expert_options(p)
    from .experts.command import train

    p.set_defaults(command_name="experts-train", generates=False, handler=train)

    p = sub.add_parser("evaluate", help="evaluate saved vectors on a prompt file")
    _add_model_options(p)
    p.add_argument("--vectors", required=True, help="a .safetensors vector file (with its .json)")
    _add_eval_options(p)
    p.set_defaults(command_name="evaluate", generates=True)

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
    p.set_defaults(command_name="figures", generates=False)
    return parser
