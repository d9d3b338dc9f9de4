"""The explorer: one JupyterLab widget to pick heads, move the strength and watch the text change.

Built from the ecosystem's standard pieces, ipywidgets for the controls and Plotly's
`FigureWidget` (an anywidget) for the head map, rather than a bespoke anywidget front end: the
map is the project's own head-grid figure, made clickable as it is, the controls are the sliders
and menus researchers know (keyboard-accessible, themed by JupyterLab), and no JavaScript of ours
has to be built, shipped or kept working across JupyterLab releases.

Every change of a control starts a request in a background thread (`background.Worker`) and
returns at once; the request in flight, if any, is cancelled at its next decoding step. The
unsteered side depends only on the prompt and the sampling settings and is kept, so moving the
strength or clicking a head decodes the steered side only. While a request runs the model
carries its steering hooks: use the model elsewhere only once the explorer is idle (`wait()`).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from transformer_lens.model_bridge import TransformerBridge

from ..attribution import HeadEffects, StudyResults, load_study
from ..errors import DesteinError
from ..evaluation import BASELINE, MethodSpec
from ..generation import SamplingConfig, check_prompt_lengths, check_prompt_texts, protocol_sampling
from ..prompts import Prompt, builtin_demo_prompts, load_prompts
from ..registry import DEFAULT_STRENGTH, FORMS, Form, decoding, get_form
from ..scoring import Scorer, get_scorer
from ..steering import POSITIONS, Heads, SteeringConfig, is_causal, selected_heads, steer
from ..vectors import DetoxVectors
from .background import Cancelled, Job, Worker
from .contrast import Contrast, Draw, contrast, drafted, draw
from .headmap import PROBE, head_map, show_selection
from .render import code_html, contrast_html, reproducing_code, tally_html
from .tally import Tally, cell_metrics

MAX_SAMPLES = 16
MAX_TOKENS = 64
TALLY_PROMPTS = 5  # the tally's prompts when none are given: the first examples
_KEPT = 16  # unsteered draws kept (one per prompt and sampling setting)
_WIDE = {"description_width": "90px"}


@dataclass(frozen=True)
class Request:
    """Everything one response depends on, fixed when the request starts."""

    prompt: str
    config: SteeringConfig
    sampling: SamplingConfig
    tally: bool


class Explorer(widgets.VBox):
    """The explorer widget (see `explore`); its controls and results are attributes, so a script or
    a test drives it as the page does: `toggle`, `select`, the sliders' `.value`, `wait`, `result`."""

    def __init__(
        self,
        model: TransformerBridge,
        vectors: DetoxVectors,
        prompts: Sequence[Prompt],
        *,
        study: dict[str, HeadEffects],
        scorers: list[Scorer],
        tally_prompts: Sequence[Prompt],
        samples: int,
        max_new_tokens: int,
        seed: int,
        alpha: float,
        heads: Heads,
        form: str,
    ) -> None:
        super().__init__()
        vectors.check_compatible(model)
        SteeringConfig(alpha=alpha, heads=heads, form=form)  # refuse a bad start before any widget
        if not 1 <= samples <= MAX_SAMPLES or not 1 <= max_new_tokens <= MAX_TOKENS:
            raise DesteinError(f"samples must be 1-{MAX_SAMPLES} and max_new_tokens 1-{MAX_TOKENS}")
        self.model, self.vectors, self.scorers = model, vectors, scorers
        self.examples_list, self.tally_prompts, self.study = list(prompts), list(tally_prompts), study
        self.result: Contrast | None = None
        self.tally: Tally | None = None
        self.error: str | None = None  # the traceback of the last unexpected failure
        self._unsteered: dict[tuple[str, SamplingConfig], Draw] = {}
        self._tally_unsteered: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._worker = Worker()
        self._holding = False
        self._heads: Heads = ()
        self._build_controls(samples, max_new_tokens, seed, form)
        limit, step = _strength_range(get_form(form), alpha)
        self.strength = widgets.FloatSlider(
            value=alpha, min=-limit, max=limit, step=step, description="strength", readout_format=".4g",
            continuous_update=False, style=_WIDE, layout={"width": "420px"},
        )  # fmt: skip
        self.map = head_map(vectors, None, self.toggle)
        self._map_box = widgets.Box([self.map])
        self._layout()
        with self._held():
            self.select(heads)
        self._observe()
        self.run()

    # -- state -------------------------------------------------------------------------------

    @property
    def heads(self) -> Heads:
        """The head selection as `SteeringConfig` takes it ("all", k, "causal:k", pairs; () for none)."""
        return self._heads

    @property
    def selected(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs steered now."""
        return selected_heads(self.vectors, self._heads, self.method.value) if self._heads != () else []

    @property
    def config(self) -> SteeringConfig:
        """The steering the controls describe."""
        if self._heads == ():
            raise DesteinError("no heads selected: click heads on the map or pick a preset")
        return SteeringConfig(
            alpha=self.strength.value,
            heads=self._heads,
            positions=self.positions.value,
            form=self.method.value,
        )

    @property
    def sampling(self) -> SamplingConfig:
        return protocol_sampling(self.samples.value, self.seed.value, self.tokens.value)

    @property
    def code(self) -> str:
        """The calls that reproduce what is on screen."""
        tally = (len(self.tally_prompts), self.scorers[0].name) if self.tally_on.value else None
        return reproducing_code(self.prompt.value, self.config, self.sampling, tally)

    def select(self, heads: Heads) -> None:
        """Steer `heads` ("all", k, "causal:k" or (layer, head) pairs; () for none) and rerun."""
        if not isinstance(heads, (str, int)):
            heads = tuple(sorted((int(layer), int(head)) for layer, head in heads))
            n_layers, n_heads = self.vectors.shape
            heads = "all" if len(set(heads)) == n_layers * n_heads else heads
        if heads != ():
            selected_heads(self.vectors, heads, self.method.value)  # refuses heads out of range, no ranking
        self._heads = heads
        show_selection(self.map, self.selected)
        self.causal_button.disabled = self.method.value not in self.vectors.causal
        self.run()

    def toggle(self, layer: int, head: int) -> None:
        """Add the head to the steered set, or take it out (a click on the map)."""
        self._safely(lambda: self.select(sorted(set(self.selected) ^ {(layer, head)})))

    # -- requests ----------------------------------------------------------------------------

    def run(self) -> None:
        """Recompute what the controls describe, in the background; the request in flight is cancelled."""
        if self._holding:
            return
        try:
            request = Request(self.prompt.value, self.config, self.sampling, self.tally_on.value)
            check_prompt_texts([request.prompt])
            self.status.value = "working…"  # before the code pane: a page never sees new code beside "done"
            self.code_view.value = code_html(self.code)
        except DesteinError as e:
            self.cancel()
            self.status.value = f"⚠ {e}"
            return
        cached = (request.prompt, request.sampling) in self._unsteered
        decodes = (1 if cached else 2) + (2 if request.tally else 0)
        self.progress.value, self.progress.max = 0, decodes * request.sampling.max_new_tokens
        self.cancel_button.disabled = False
        self._worker.submit(lambda job: self._work(job, request), self._stepped)

    def cancel(self) -> None:
        """Stop the request in flight (the cancel button); what is on screen stays."""
        self._worker.cancel()
        self.status.value = "cancelled"
        self.cancel_button.disabled = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the newest request has finished (scripts, tests); False on timeout."""
        return self._worker.wait(timeout)

    def close(self) -> None:
        self._worker.cancel()
        super().close()

    def _work(self, job: Job, request: Request) -> None:
        started = time.perf_counter()
        try:
            job.check()  # cancelled before it started
            # here, not in `run`: the tokenizer is not safe to call from two threads at once
            check_prompt_lengths(self.model, [request.prompt], request.sampling.max_new_tokens)
            with decoding([job]):
                key = (request.prompt, request.sampling)
                if key not in self._unsteered:
                    self._say(job, "sampling unsteered…")
                    self._keep(key, draw(self.model, request.prompt, request.sampling, self.scorers))
                self._say(job, "sampling steered…")
                with steer(self.model, self.vectors, request.config):
                    steered = draw(self.model, request.prompt, request.sampling, self.scorers)
                self._say(job, "shading tokens, perplexity…")
                unsteered = self._unsteered[key]
                self.output.value = contrast_html(
                    drafted(request.config, request.sampling, unsteered, steered)
                )
                result = contrast(
                    self.model, self.vectors, request.config, request.sampling, unsteered, steered
                )
                job.check()
                self.result = result
                self.output.value = contrast_html(result)
                if request.tally:
                    self._say(job, f"tally over {len(self.tally_prompts)} prompts…")
                    self.tally = self._tally(request)
                    self.tally_view.value = tally_html(
                        self.tally, len(self.tally_prompts), self.scorers[0].name
                    )
            self._finish(job, f"done in {time.perf_counter() - started:.1f} s")
        except Cancelled:  # by a newer request or the cancel button, which say so themselves
            pass
        except DesteinError as e:
            self._finish(job, f"⚠ {e}")
        except Exception as e:  # shown, not lost in a thread: the traceback is kept in `error`
            self.error = traceback.format_exc()
            self._finish(job, f"⚠ {type(e).__name__}: {e} (traceback in .error)")

    def _keep(self, key: tuple[str, SamplingConfig], drawn: Draw) -> None:
        if len(self._unsteered) >= _KEPT:
            self._unsteered.pop(next(iter(self._unsteered)))
        self._unsteered[key] = drawn

    def _tally(self, request: Request) -> Tally:
        scorer = self.scorers[0]
        key = (tuple((p.id, p.text) for p in self.tally_prompts), request.sampling, scorer.name)
        args = (self.model, self.vectors, self.tally_prompts)
        if key not in self._tally_unsteered:
            self._tally_unsteered[key] = cell_metrics(*args, BASELINE, request.sampling, scorer)
        steered = cell_metrics(*args, MethodSpec("steered", request.config), request.sampling, scorer)
        return Tally(self._tally_unsteered[key], steered)

    def _stepped(self, steps: int) -> None:
        self.progress.value = min(steps, self.progress.max)

    def _say(self, job: Job, message: str) -> None:
        job.check()
        self.status.value = message

    def _finish(self, job: Job, message: str) -> None:
        if self._worker.is_current(job):
            self.status.value = message
            self.progress.value = self.progress.max
            self.cancel_button.disabled = True

    # -- widgets -----------------------------------------------------------------------------

    def _build_controls(self, samples: int, max_new_tokens: int, seed: int, form: str) -> None:
        head_wise = [name for name, f in FORMS.items() if f.head_wise]
        wide = {"style": _WIDE, "layout": {"width": "420px"}}
        self.method = widgets.Dropdown(options=head_wise, value=form, description="method", **wide)
        self.positions = widgets.Dropdown(
            options=list(POSITIONS), value="all", description="positions", **wide
        )
        self.samples = widgets.IntSlider(
            value=samples, min=1, max=MAX_SAMPLES, description="samples", continuous_update=False, **wide
        )
        self.tokens = widgets.IntSlider(
            value=max_new_tokens,
            min=1,
            max=MAX_TOKENS,
            description="new tokens",
            continuous_update=False,
            **wide,
        )
        self.seed = widgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed", **wide)
        labels = [(_label(p), i) for i, p in enumerate(self.examples_list)]
        self.examples = widgets.Dropdown(options=labels, value=0, description="examples", **wide)
        self.prompt = widgets.Textarea(
            value=self.examples_list[0].text, description="prompt", continuous_update=False,
            style=_WIDE, layout={"width": "420px", "height": "60px"},
        )  # fmt: skip
        self.tally_on = widgets.Checkbox(
            value=False, description=f"tally over {len(self.tally_prompts)} prompts (EMT, TP, PPL ratio)",
            indent=False,
        )  # fmt: skip
        self.run_button = widgets.Button(description="generate", icon="play")
        self.cancel_button = widgets.Button(description="cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout={"width": "240px"})
        self.status = widgets.Label()
        self.k = widgets.BoundedIntText(value=8, min=1, max=self.vectors.shape[0] * self.vectors.shape[1])
        self.k.layout.width = "70px"
        self.causal_button = widgets.Button(description="causal top-k", tooltip="heads by causal effect")
        self.map_top_button = widgets.Button(description="map top-k", disabled=True)
        self.map_choice = widgets.Dropdown(options=[PROBE, *self.study], value=PROBE, description="map")
        self.show_code = widgets.ToggleButton(value=True, description="code", icon="code")
        self.code_view = widgets.HTML()
        self.output = widgets.HTML()
        self.tally_view = widgets.HTML()

    def _layout(self) -> None:
        presets = [
            self._button("all", lambda: self.select("all")),
            self._button("none", lambda: self.select(())),
            widgets.Label("k"),
            self.k,
            self._button("probe top-k", lambda: self.select(self.k.value)),
            self.causal_button,
            self.map_top_button,
        ]
        left = [self.map_choice] if self.study else []
        left += [self._map_box, widgets.HBox(presets, layout={"flex_flow": "row wrap", "width": "470px"})]
        controls = [self.method, self.strength, self.positions, self.samples, self.tokens, self.seed]
        controls += [self.examples, self.prompt, widgets.HBox([self.run_button, self.tally_on])]
        self.children = [
            widgets.HTML(
                "<b>DeStein explorer</b>: click heads to steer them; every change reruns in the background"
            ),
            widgets.HBox([widgets.VBox(left), widgets.VBox(controls)]),
            widgets.HBox([self.progress, self.cancel_button, self.status]),
            self.output,
            self.tally_view,
            self.show_code,
            self.code_view,
        ]

    def _observe(self) -> None:
        rerun = lambda change: self.run()  # noqa: E731
        for control in (self.strength, self.positions, self.samples, self.tokens, self.seed, self.tally_on):
            control.observe(rerun, "value")
        self.prompt.observe(rerun, "value")
        self.method.observe(self._form_changed, "value")
        self.examples.observe(self._example_chosen, "value")
        self.map_choice.observe(self._map_chosen, "value")
        self.show_code.observe(self._code_shown, "value")
        self.run_button.on_click(lambda button: self.run())
        self.cancel_button.on_click(lambda button: self.cancel())
        self.causal_button.on_click(
            lambda button: self._safely(lambda: self.select(f"causal:{self.k.value}"))
        )
        self.map_top_button.on_click(lambda button: self._safely(self._map_top))

    def _form_changed(self, change: dict[str, Any]) -> None:
        """A new method: its own strength range and default; a causal selection it has no ranking
        for becomes the heads it stood for."""
        form = get_form(change["new"])
        limit, step = _strength_range(form, form.default_strength)
        with self._held():
            if is_causal(self._heads) and form.name not in self.vectors.causal:
                self._heads = tuple(selected_heads(self.vectors, self._heads, change["old"]))
            self.strength.min, self.strength.max = -limit, limit  # in this order: the old value stays valid
            self.strength.step, self.strength.value = step, form.default_strength
            self.select(self._heads)
        self.run()

    def _example_chosen(self, change: dict[str, Any]) -> None:
        text = self.examples_list[change["new"]].text
        if self.prompt.value == text:
            self.run()
        self.prompt.value = text  # reruns through the prompt's observer

    def _map_chosen(self, change: dict[str, Any]) -> None:
        self.map = head_map(self.vectors, self.study.get(change["new"]), self.toggle)
        show_selection(self.map, self.selected)
        self._map_box.children = [self.map]
        self.map_top_button.disabled = change["new"] == PROBE

    def _map_top(self) -> None:
        self.select(self.study[self.map_choice.value].ranking()[: self.k.value])

    def _code_shown(self, change: dict[str, Any]) -> None:
        self.code_view.layout.display = None if change["new"] else "none"

    def _button(self, description: str, action: Callable[[], None]) -> widgets.Button:
        button = widgets.Button(description=description, layout={"width": "auto"})
        button.on_click(lambda b: self._safely(action))
        return button

    def _safely(self, action: Callable[[], None]) -> None:
        """Run a click's action; bad input (a head set the vectors cannot steer) is shown, not raised."""
        try:
            action()
        except DesteinError as e:
            self.status.value = f"⚠ {e}"

    @contextmanager
    def _held(self):
        """Change several controls without a request per change."""
        self._holding, outer = True, self._holding
        try:
            yield
        finally:
            self._holding = outer


def explore(
    model: TransformerBridge,
    vectors: DetoxVectors,
    prompts: Sequence[str | Prompt] | str | Path | None = None,
    *,
    study: str | Path | StudyResults | None = None,
    scorers: Sequence[str | Scorer] = ("profanity-check",),
    tally_prompts: Sequence[str | Prompt] | None = None,
    samples: int = 4,
    max_new_tokens: int = 20,
    seed: int = 0,
    alpha: float = DEFAULT_STRENGTH,
    heads: Heads = "all",
    form: str = "destein",
) -> Explorer:
    """An interactive DeStein explorer for JupyterLab: click heads on the map to steer them, set the
    method, strength, positions, samples and seed, and see the unsteered and steered continuations
    of a prompt side by side from the same seed, each token shaded by how steering moved its
    log-probability, with toxicity and perplexity; optionally a tally (EMT, TP, perplexity ratio)
    over a few prompts. `explorer.code` is the code that reproduces the screen.

    `prompts`: the example prompts (texts or `Prompt`s, or what `load_prompts` reads: "demo", a
    RealToxicityPrompts .jsonl, ...; default the built-in demo prompts). `study`: an attribution
    study folder (or `load_study`'s result) whose effect grids the map can show. `scorers`: the
    toxicity scorers shown (the first one's scores make the tally). `tally_prompts`: default the
    first five example prompts.
    """
    examples = _as_prompts(builtin_demo_prompts() if prompts is None else prompts)
    effects = _study_effects(study, vectors)
    chosen = [get_scorer(s) if isinstance(s, str) else s for s in scorers]
    if not chosen:
        raise DesteinError("give at least one toxicity scorer")
    tally = _as_prompts(tally_prompts) if tally_prompts is not None else examples[:TALLY_PROMPTS]
    return Explorer(
        model, vectors, examples, study=effects, scorers=chosen, tally_prompts=tally, samples=samples,
        max_new_tokens=max_new_tokens, seed=seed, alpha=alpha, heads=heads, form=form,
    )  # fmt: skip


def _as_prompts(prompts: Sequence[str | Prompt] | str | Path) -> list[Prompt]:
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts)
    found = [p if isinstance(p, Prompt) else Prompt(p, None, str(i)) for i, p in enumerate(prompts)]
    check_prompt_texts([p.text for p in found])
    return found


def _study_effects(study: str | Path | StudyResults | None, vectors: DetoxVectors) -> dict[str, HeadEffects]:
    if study is None:
        return {}
    effects = (study if isinstance(study, StudyResults) else load_study(study)).effects
    for name, e in effects.items():
        if e.shape != vectors.shape:
            raise DesteinError(f"the study's {name} grid is {e.shape} heads; the vectors' is {vectors.shape}")
    return effects


def _strength_range(form: Form, alpha: float) -> tuple[float, float]:
    """The slider's bound, +-(ten times the form's largest calibration strength) within what the form
    accepts, and its step: degradation is in view without the useful range shrinking to a few pixels."""
    limit = max(min(form.max_strength, 10 * max(abs(g) for g in form.grid)), abs(alpha))
    return limit, limit / 200


def _label(prompt: Prompt) -> str:
    text = prompt.text if len(prompt.text) <= 70 else prompt.text[:69] + "…"
    return text if prompt.toxicity is None else f"{text} (RTP toxicity {prompt.toxicity:.2f})"
