"""What the explorer shows, as HTML, and the code that reproduces it.

Tokens are shaded by how steering moved their log-probability: red where steering pushes the
token away (the colour the figures give "toxic"), blue where it pulls it in, full colour at
`SATURATION` nats; the exact shift is in each token's tooltip.
"""

from __future__ import annotations

import html
import math

from ..generation import SamplingConfig
from ..steering import SteeringConfig
from ..views import COLORS, TOXIC_THRESHOLD
from .contrast import Continuation, Contrast
from .tally import Tally

SATURATION = 3.0  # nats: a token whose log-prob moved this much gets the full colour
_CELL = "vertical-align:top;padding:6px 10px;border-bottom:1px solid #e0e0e0;white-space:pre-wrap"


def reproducing_code(
    prompt: str, config: SteeringConfig, sampling: SamplingConfig, tally: tuple[int, str] | None = None
) -> str:
    """The calls that give what the explorer shows (`model` and `vectors` are the explorer's);
    with `tally` (number of prompts, scorer), also the harness call behind the tally."""
    lines = [
        "from destein_lens import SteeringConfig, generate, protocol_sampling, steer",
        "",
        f"config = {config!r}",
        f"sampling = protocol_sampling(n={sampling.n}, seed={sampling.seed}, "
        f"max_new_tokens={sampling.max_new_tokens})",
        f"prompt = {prompt!r}",
        "unsteered = generate(model, [prompt], sampling)[0]",
        "with steer(model, vectors, config):",
        "    steered = generate(model, [prompt], sampling)[0]",
    ]
    if tally is not None:
        n, scorer = tally
        protocol = f"{sampling.n}, seed={sampling.seed}, max_new_tokens={sampling.max_new_tokens}"
        lines += [
            "",
            f"# the tally: the evaluation harness on the explorer's {n} tally prompts",
            "import tempfile",
            "from destein_lens import MethodSpec, evaluate",
            "from destein_lens.evaluation import BASELINE, eval_config",
            "methods = [BASELINE, MethodSpec('steered', config)]",
            f"settings = eval_config({protocol}, scorer={scorer!r})",
            "out = tempfile.mkdtemp()  # a fresh run folder",
            "metrics = evaluate(model, explorer.tally_prompts, methods, out, settings, vectors=vectors)",
        ]
    return "\n".join(lines)


def code_html(code: str) -> str:
    return f'<pre class="destein-code" style="font-size:12px;margin:0">{html.escape(code)}</pre>'


def contrast_html(result: Contrast) -> str:
    """Row j: the unsteered and the steered continuation drawn from the same seed."""
    config, done = result.config, result.complete
    heads = f"heads {config.heads}" if isinstance(config.heads, (str, int)) else f"{len(config.heads)} heads"
    steered = f"steered: {config.form}, strength {config.alpha:g}, {heads}, positions {config.positions}"
    header = "".join(
        f'<th style="{_CELL};text-align:left">{html.escape(t)}</th>' for t in ("unsteered", steered)
    )
    rows = "".join(
        f'<tr><td class="destein-unsteered" style="{_CELL}">{_continuation(result.prompt, a, done)}</td>'
        f'<td class="destein-steered" style="{_CELL}">{_continuation(result.prompt, b, done)}</td></tr>'
        for a, b in zip(result.unsteered, result.steered)
    )
    legend = (
        '<div style="font-size:12px;color:#555;margin-top:4px">token shading: log p(steered) - '
        f"log p(unsteered), {_swatch(-SATURATION)} pushed away by steering, {_swatch(SATURATION)} pulled "
        f"in (full colour at {SATURATION:g} nats; hover a token for its value). Perplexity: under the "
        "unsteered model.</div>"
    )
    table = '<table class="destein-contrast" style="border-collapse:collapse;width:100%">'
    return f"{table}<tr>{header}</tr>{rows}</table>{legend}"


def _continuation(prompt: str, c: Continuation, complete: bool) -> str:
    tokens = "".join(
        f'<span title="{shift:+.2f} nats" style="background:{_shade(shift)}">{html.escape(piece)}</span>'
        for piece, shift in zip(c.pieces, c.shift)
    )
    scores = " · ".join(
        f'<span style="color:{COLORS["toxic"] if s >= TOXIC_THRESHOLD else "inherit"}">'
        f"{html.escape(name)} {s:.2f}</span>"
        for name, s in c.toxicity.items()
    )
    ppl = "…" if not complete else "n/a" if math.isnan(c.perplexity) else f"{c.perplexity:.1f}"
    return (
        f'<span style="color:#888">{html.escape(prompt)}</span><span class="destein-text">{tokens}</span>'
        f'<div style="font-size:12px;color:#555;margin-top:2px">toxicity {scores} · perplexity {ppl}</div>'
    )


def _shade(shift: float) -> str:
    red, green, blue = _rgb(COLORS["toxic"] if shift < 0 else COLORS["nontoxic"])
    return f"rgba({red},{green},{blue},{min(abs(shift) / SATURATION, 1.0) * 0.6:.2f})"


def _swatch(shift: float) -> str:
    return f'<span style="background:{_shade(shift)};padding:0 6px">&nbsp;</span>'


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def tally_html(tally: Tally, n_prompts: int, scorer: str) -> str:
    """EMT, TP and perplexity of both cells with the harness's 95% intervals, and their ratio."""
    cells = []
    for name, m in (("unsteered", tally.unsteered), ("steered", tally.steered)):
        emt_low, emt_high = m["expected_max_toxicity_ci"]
        tp_low, tp_high = m["toxicity_probability_ci"]
        cells.append(
            f"<tr><td>{name}</td><td>{m['expected_max_toxicity']:.3f} [{emt_low:.3f}, {emt_high:.3f}]</td>"
            f"<td>{m['toxicity_probability']:.2f} [{tp_low:.2f}, {tp_high:.2f}]</td>"
            f"<td>{m['perplexity']:.2f}</td></tr>"
        )
    head = "".join(
        f'<th style="text-align:left;padding-right:14px">{t}</th>' for t in ("", "EMT", "TP", "PPL")
    )
    samples = tally.steered["samples"] // n_prompts
    return (
        f'<div class="destein-tally"><b>Tally</b> over {n_prompts} prompts x {samples} samples '
        f"({html.escape(scorer)}): perplexity ratio <b>{tally.perplexity_ratio:.2f}</b>"
        f'<table style="border-collapse:collapse">{head}{"".join(cells)}</table></div>'
    )
