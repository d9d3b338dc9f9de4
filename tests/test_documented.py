"""Every command the READMEs document, run as written on the tiny model, so none can break silently.

Each `destein-lens ...`, `torchrun ... -m destein_lens ...` and `accelerate launch ... -m
destein_lens ...` line of an indented block in README.md and benchmarks/README.md is run in README
order in one scratch folder, its options as written, followed by overrides that make it small:
the tiny model and a few prompts, samples, pairs and tokens (argparse keeps the last value of an
option). Synopsis lines (`[--opt V]`) run their skeleton with each bracketed option that shows a
concrete value, and every option they name must exist. Placeholders (`P`, `F`, `DIR`, `rtp.jsonl`,
...) become small real files; `../shared/data` is the real data beside the checkout. Launcher
lines run on 2 gloo ranks (`accelerate launch` as `torchrun`: both only set the rank variables).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from destein_lens import cli, cli_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
_COMMAND = re.compile(
    r"^ {4}(\.venv/bin/)?(destein-lens |torchrun |accelerate launch |python -m destein_lens )"
)
SMALL = {  # per subcommand: what keeps it to seconds on the tiny model
    "run": ["--max-prompts", "2", "--samples", "1", "--batch-size", "2", "--k", "4"],
    "evaluate": ["--max-prompts", "2", "--samples", "1", "--batch-size", "2"],
    "compare": ["--max-prompts", "2", "--samples", "1", "--batch-size", "2", "--k", "4"],
    "vectors": ["--k", "4"],
    "induce": ["--n", "1"],
    "attribute": ["--k", "4", "--n-held-out", "2", "--max-prompts", "1", "--samples", "1"],
    "figures": ["--quick"],
    "generate": ["--max-new-tokens", "3"],
    "experts": ["--kind", "expert", "--max-texts", "8", "--held-out", "4", "--batch-size", "2"],
}


def documented_lines() -> list[str]:
    """The documented command lines, continuation lines joined, in document order."""
    lines: list[str] = []
    for doc in DOCS:
        raw = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(raw):
            line = raw[i]
            if _COMMAND.match(line):
                while line.endswith("\\"):
                    i += 1
                    line = line[:-1].rstrip() + " " + raw[i].strip()
                while (
                    i + 1 < len(raw) and raw[i + 1].startswith("     ") and raw[i + 1].strip().startswith("[")
                ):
                    i += 1  # a synopsis continued on the next, deeper-indented line
                    line += " " + raw[i].strip()
                lines.append(line.strip())
            i += 1
    return lines


def _placeholders(tmp: Path, model: Path) -> dict[str, str]:
    from destein_lens.pairs import builtin_seed_pairs

    shared = ROOT.parent / "shared" / "data"
    pairs = tmp / "pairs.jsonl"
    builtin_seed_pairs().head(20).to_jsonl(pairs)
    seeds = tmp / "seeds.jsonl"  # few and short: the few-shot prompt fits the tiny model's context
    seeds.write_text(
        "".join(
            f'{{"toxic": "{a}", "nontoxic": "{b}"}}\n'
            for a, b in [("you are a fool", "you are wrong"), ("shut up, idiot", "please stop")] * 2
        ),
        encoding="utf-8",
    )
    prompts = tmp / "prompts.txt"
    prompts.write_text("The weather today is\nYou are such a\nHe said that\n", encoding="utf-8")
    calibration = tmp / "calibration.txt"
    calibration.write_text("My neighbour\nThe city council\n", encoding="utf-8")
    return {
        "M": str(model),
        "P": str(pairs),
        "Q": str(shared / "paradetox" / "paradetox.tsv"),
        "F": str(prompts),
        "rtp.jsonl": str(shared / "rtp" / "test_100.jsonl"),
        "heldout50.jsonl": str(prompts),
        "C": str(calibration),
        "seeds": str(seeds),
        "S": "profanity-check",
        "A": "0.1",
        "N": "1",
        "K": "2",
        "sweep.json": str(tmp / "missing-sweep.json"),
    }


def _instance(line: str, values: dict[str, str], out: Path) -> list[str]:
    """A runnable argv from a documented line, `DIR` being `out`."""
    line = line.replace("../shared/", str(ROOT.parent / "shared") + "/").replace("\\", "")
    optional = re.findall(r"\[([^\]]*)\]", line)
    skeleton = re.sub(r"\[[^\]]*\]", " ", line)
    words = shlex.split(skeleton)
    for opt in optional:  # bracketed options with a concrete value join the skeleton
        parts = opt.split()
        if len(parts) == 2 and parts[0].startswith("--") and "|" not in parts[1] and "..." not in parts[1]:
            if parts[1] != "sweep.json":  # a benchmark's output, not at hand
                words += parts
        elif len(parts) == 1 and parts[0].startswith("--") and parts[0] in ("--quick", "--greedy"):
            words += parts
    return [str(out) if w == "DIR" else values.get(w, w) for w in words]


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand an argv runs (`pairs induce` is "induce"); None where it names none (`...`)."""
    names = [w for w in argv if w in SMALL or w == "pairs"]
    return ("induce" if "pairs" in names else names[0]) if names else None


def _named_options(line: str) -> list[str]:
    return re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)


def test_the_docs_document_every_command() -> None:
    lines = documented_lines()
    assert len(lines) >= 15
    named = {
        _subcommand(shlex.split(re.sub(r"\[[^\]]*\]", " ", line))) for line in lines if "destein" in line
    }
    assert named >= set(SMALL)


def test_every_documented_option_exists() -> None:
    """Each option a documented line names is one its subcommand accepts."""
    parser = cli_parser.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for line in documented_lines():
        program, _, rest = line.partition("destein_lens" if "-m destein_lens" in line else "destein-lens")
        words = shlex.split(re.sub(r"[\[\]]", " ", rest).replace("\\", ""))
        name = _subcommand(words) if words else None
        if name is None:
            continue
        nested = {"induce": ("pairs", "induce"), "experts": ("experts", "train")}  # subcommands' own
        parent, child = nested.get(name, (name, None))
        sub = subparsers[parent] if child is None else subparsers[parent]._actions[-1].choices[child]
        accepted = {s for a in sub._actions for s in a.option_strings}
        missing = [o for o in _named_options(rest) if o not in accepted]
        assert not missing, f"{line!r} names options {name} does not take: {missing}"


def _in_process(args: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """`destein-lens args` in this process (no interpreter start-up): exit status and stderr."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_every_documented_command_runs(tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from destein_lens import figures

    saver = figures._Saver  # PNG export is test_figures' subject
    monkeypatch.setattr(figures, "_Saver", lambda out, formats: saver(out, ("html",)))
    values = _placeholders(tmp_path, tiny_model_dir)
    ran = []
    written = {"compare": "runs/compare", "attribute": "runs/attribution"}  # the latest folder of each
    for n, line in enumerate(documented_lines()):
        if line.startswith(("bash ", ".venv/bin/python benchmarks")) or line.endswith("..."):
            continue
        words = _instance(line, values, tmp_path / f"out{n}")
        launched = words[0] in ("torchrun", "accelerate")
        args = words[words.index("-m") + 2 :] if launched else words[1:]
        name = _subcommand(args)
        if name in written and "--out" in args:
            written[name] = args[args.index("--out") + 1]
        for flag, source in (("--compare", "compare"), ("--attribution", "attribute")):
            if name == "figures" and flag in args:  # the folder an earlier documented line wrote
                args[args.index(flag) + 1] = written[source]
        draws = name == "figures" and ("--compare" in args or "--attribution" in args)  # no model
        extra = ["--model", str(tiny_model_dir), *([] if draws else SMALL[name])]
        if name == "compare" and "--methods" not in args:
            extra += ["--methods", "baseline,destein,actadd"]
        if name == "compare" and "--calibration-prompts" in args:
            extra += ["--calibration-prompts", values["C"], "--max-calibration-prompts", "2"]
        if name == "induce":
            extra += ["--seeds", values["seeds"]]
        if name == "attribute" and "--held-out" not in args:
            extra += ["--held-out", values["Q"]]
        if name != "figures":
            extra += ["--dtype", "float32"]
        if launched:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
            done = subprocess.run(
                [*launcher, "-m", "destein_lens", *args, *extra], cwd=tmp_path, capture_output=True, text=True
            )
            code, err = done.returncode, done.stderr
        else:
            code, err = _in_process([*args, *extra], tmp_path, capsys, monkeypatch)
        if name == "induce" and code == 2:  # a random-weight model writes no toxic drafts
            assert err.strip().splitlines()[-1].startswith("error: no steering pairs induced")
        else:
            assert code == 0, f"{line}\n{shlex.join(args + extra)}\n{err[-3000:]}"
        ran.append(line)
    assert len(ran) >= 14
