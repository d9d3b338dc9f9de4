"""The method registry and its extension points, on the tiny model: re-registration, a decoding-time
method that needs no vectors, run through `steer`, the evaluation harness and a resume; and the
package's import map (no circle)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from destein_lens import SteeringConfig, steer
from destein_lens.evaluation import BASELINE, MethodSpec, eval_config, evaluate
from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.prompts import Prompt
from destein_lens.registry import FORMS, Form, Steering, register
from destein_lens.runfolder import gens_path

PROMPTS = ["you are a stupid idiot and", "thank you so much for the", "the weather"]


class BanFirstChoice:
    """A toy decoding processor: at every step, forbid the token the unsteered model likes best,
    and count the steps (state across steps)."""

    def __init__(self) -> None:
        self.steps = 0
        self.started = False

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.started = True

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        banned = logits.argmax(-1, keepdim=True)
        return logits.scatter(-1, banned, float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        self.steps += 1


SEEN: list[BanFirstChoice] = []


def _ban(model, vectors, config, mask, prompts) -> Steering:
    SEEN.append(BanFirstChoice())
    return Steering(processors=[SEEN[-1]])


BAN = Form(
    "ban-first", "forbid the unsteered favourite at every step", _ban, head_wise=False, needs_vectors=False
)


@pytest.fixture(autouse=True)
def registered():
    register(BAN, replace=True)
    yield
    FORMS.pop(BAN.name, None)


def test_registering_twice_needs_replace() -> None:
    with pytest.raises(ValueError, match="replace=True"):
        register(BAN)
    assert register(BAN, replace=True) is BAN  # a notebook cell run again


def test_a_decoding_time_method_changes_every_step_without_vectors(tiny_model) -> None:
    greedy = SamplingConfig(do_sample=False, max_new_tokens=4)
    plain = generate_ids(tiny_model, PROMPTS, greedy)
    with steer(tiny_model, None, SteeringConfig(alpha=1.0, form="ban-first")):
        moved = generate_ids(tiny_model, PROMPTS, greedy)
    assert SEEN[-1].started and SEEN[-1].steps == 4
    assert (plain[:, 0] != moved[:, 0]).all()  # greedy's first choice is the banned favourite
    assert torch.equal(generate_ids(tiny_model, PROMPTS, greedy), plain)  # removed on exit


def test_a_decoding_time_method_runs_in_the_harness_and_resumes(tiny_model, tmp_path: Path) -> None:
    prompts = [Prompt(text, None, str(i)) for i, text in enumerate(PROMPTS)]
    methods = [BASELINE, MethodSpec("ban-first", SteeringConfig(alpha=1.0, form="ban-first"))]
    config = eval_config(2, batch_size=2)
    whole = evaluate(tiny_model, prompts, methods, tmp_path / "whole", config, progress=False)
    cut = tmp_path / "cut"
    evaluate(tiny_model, prompts, methods, cut, config, progress=False)
    path = gens_path(cut, "ban-first")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:10])  # killed in the middle of a line
    again = evaluate(tiny_model, prompts, methods, cut, config, progress=False)
    assert path.read_bytes() == gens_path(tmp_path / "whole", "ban-first").read_bytes()
    assert again["ban-first"]["expected_max_toxicity"] == pytest.approx(
        whole["ban-first"]["expected_max_toxicity"]
    )
    assert json.loads((cut / "config.json").read_text())["vectors"] is None


def _imports(path: Path, package: str) -> set[str]:
    """The package modules `path` imports at run time (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    here = path.relative_to(path.parents[len(path.relative_to(ROOT).parts) - 1]).with_suffix("")
    parts = list(here.parts[:-1]) if here.name != "__init__" else list(here.parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = parts[: len(parts) - node.level + 1] + (node.module.split(".") if node.module else [])
        for alias in node.names:
            full = ".".join([*base, alias.name])
            found.add(full if full in MODULES else ".".join(base))
    return found & set(MODULES)


ROOT = Path(__file__).resolve().parents[1] / "destein_lens"
MODULES = {
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in ROOT.rglob("*.py")
}


def test_the_package_has_no_import_circle() -> None:
    graph = {name: _imports(path, "destein_lens") - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
