"""`destein-lens` command line: one subcommand per pipeline stage, plus `run` for the whole job.

Every user error is one line on stderr (`error: ...`) and exit status 2; an interrupt exits 130
after the stage in flight has kept what it already wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .errors import DesteinError

Command = Callable[[argparse.Namespace], None]


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generation import SamplingConfig, generate
    from .models import load_model

    model = load_model(args.model, device=args.device)
    config = SamplingConfig(
        do_sample=not args.greedy,
        max_new_tokens=args.max_new_tokens,
        top_p=None if args.greedy else args.top_p,
        n=args.samples,
        seed=args.seed,
    )
    for prompt, continuations in zip(args.prompts, generate(model, args.prompts, config)):
        print(json.dumps({"prompt": prompt, "continuations": continuations}, ensure_ascii=False))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id, local HF folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="destein-lens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample continuations of prompts through the hooked model")
    _add_model_options(p)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DesteinError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; everything finished so far is saved", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
