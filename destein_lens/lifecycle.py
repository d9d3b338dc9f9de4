"""The run lifecycle: what a run is, and setting it up, for `run`, `evaluate`, `compare` and `attribute`.

A run is checked in two stages. Without the model (`ModelSpec.check`, `known_identity`,
`check_heads_early`, `check_vector_file`): arguments, the model's name, device and dtype, head
ranges where the model's shape can be read from its files, the folder's identity and its own
vector file; then the ranks of a launch join. With the model (`model_and_vectors`): the model in
the run's dtype and the folder's own vectors, built once (rank 0) from a float32 forward whatever
the generation dtype, and checked against the settings on a resume. The command line is a thin
layer over these; a notebook can call them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from . import distributed, models
from .attribution.causal import causal_rankings
from .dtypes import DtypeChoice, choose_dtype, write_record
from .errors import DesteinError
from .evaluation import BASELINE, EvalConfig, MethodSpec, check_prompts, prompts_sha, vectors_id
from .models import DEFAULT_MODEL, check_device, check_model_name, model_shape
from .pairs import SteeringPairs
from .prompts import Prompt
from .registry import get_form
from .steering import Heads, SteeringConfig, check_heads, is_causal
from .vectors import DetoxVectors, build_vectors

VECTORS_FILE = "vectors.safetensors"


@dataclass
class ModelSpec:
    """Which model, where, in which dtype; `check` resolves the device and dtype without loading."""

    name: str | None = None
    device: str | None = None
    dtype: str = "auto"
    generates: bool = True
    torch_dtype: torch.dtype | None = None
    choice: DtypeChoice | None = None  # why `torch_dtype` (`dtypes.choose_dtype`)

    def check(self) -> None:
        """The model's name, device and dtype, checked without loading (`auto` measured, or read
        from the cache); then join a launch (every check before this point needs no model and is the
        same on every rank)."""
        self.device = check_device(distributed.rank_device(self.device))
        check_model_name(self.name)
        self.choice = choose_dtype(self.dtype, self.device, generates=self.generates, model=self.name)
        self.torch_dtype = self.choice.torch_dtype
        distributed.setup()

    def load(self, dtype: torch.dtype | None = None, folder: str | Path | None = None) -> TransformerBridge:
        """The model in `dtype` (default: the run's); with `folder`, rank 0 records there which dtype
        the run generates in and why (`dtypes.write_record`)."""
        if folder is not None and self.choice is not None and distributed.is_main():
            write_record(folder, self.choice)
        # through the module: what a test (or a user) puts in `models.load_model` is what loads
        return models.load_model(self.name, device=self.device, dtype=dtype or self.torch_dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")


@dataclass(frozen=True)
class VectorSpec:
    """The pairs and settings a folder's own vectors are built from."""

    pairs: SteeringPairs
    site: str = "heads"
    k: int = 8
    probe_texts: str = "bare"
    causal_confirm: int = 0  # causal rankings: each scoring's top K re-scored exactly

    def provenance(self) -> dict[str, Any]:
        """Where the pairs came from: part of a run's identity."""
        return {"pairs": self.pairs.source, "pairs_sha256": self.pairs.sha256()}

    def settings(self) -> dict[str, Any]:
        """What the folder's vectors must have been built with (`vectors_id`'s fields)."""
        return {
            "site": self.site,
            "k": self.k,
            "pairs_sha256": self.pairs.sha256(),
            "probe_texts": self.probe_texts,
        }


def check_heads_early(model: str | None, heads: Heads) -> None:
    """Head ranges against the model's shape where its files give it (a hub id's needs the load)."""
    shape = model_shape(model)
    if shape is not None:
        check_heads(heads, *shape)


# The main job (`run` at the paper's setting) also steers DeStein's form on its causal heads: the best
# DeStein-family setting of the two-seed calibration on gemma-3-270m at a 1.1x perplexity budget
# (README, "A steadier calibration"), so a first table shows the paper's setting and the causal one
# side by side. A model with fewer heads steers all of them.
MAIN_CAUSAL_K, MAIN_CAUSAL_STRENGTH = 32, 0.05


def run_methods(model: str | None, steering: SteeringConfig) -> list[MethodSpec]:
    """`run`'s rows: the baseline and `steering` (named by its form), plus the causal setting when
    `steering` is the paper's (the form's defaults, all heads)."""
    methods = [BASELINE, MethodSpec(steering.form, steering)]
    if steering == SteeringConfig(alpha=get_form("destein").default_strength):
        shape = model_shape(model)
        k = MAIN_CAUSAL_K if shape is None else min(MAIN_CAUSAL_K, shape[0] * shape[1])
        causal = SteeringConfig(alpha=MAIN_CAUSAL_STRENGTH, heads=f"causal:{k}")
        methods.append(MethodSpec("destein:causal", causal))
    return methods


def known_identity(
    config: EvalConfig,
    prompts: Sequence[Prompt],
    model: ModelSpec,
    methods: Sequence[MethodSpec] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The run config's fields known before the model loads (`runfolder.check_same_run(partial=True)`)."""
    known = {
        "eval": config.to_dict(),
        "prompts": {"n": len(prompts), "sha256": prompts_sha(prompts)},
        "model": {"name": model.name or DEFAULT_MODEL, "dtype": model.dtype_name},
        **fields,
    }
    if methods is not None:
        known["methods"] = [m.to_dict() for m in methods]
    return known


def check_vector_file(out: str | Path, spec: VectorSpec | None = None, causal: Sequence[str] = ()) -> None:
    """A folder's own vector file, if it has one, is read and checked before the model loads (with
    `spec`, its causal rankings of `causal` forms against the settings asked for)."""
    path = Path(out) / VECTORS_FILE
    if path.exists():
        loaded = DetoxVectors.load(path)
        if spec is not None:
            _check_confirm(loaded, path, spec, [f for f in causal if f in loaded.causal])


def _check_confirm(loaded: DetoxVectors, path: Path, spec: VectorSpec, causal: Sequence[str]) -> None:
    for form in causal:
        confirmed = loaded.causal_ranking(form).scored_on.get("confirmed_top", 0)
        if confirmed != spec.causal_confirm:
            raise DesteinError(
                f"{path} holds a {form} causal ranking built with --causal-confirm {confirmed}, not "
                f"{spec.causal_confirm}; use another --out folder"
            )


def fits_for(methods: Sequence[str]) -> list[str]:
    """The methods among `methods` that fit statistics from the pairs."""
    return [m for m in methods if m != "baseline" and get_form(m).fit is not None]


def causal_for(methods: Sequence[MethodSpec]) -> list[str]:
    """The forms whose heads `methods` select by causal effect ("causal:k"): their vectors need the
    form's causal ranking."""
    return list(dict.fromkeys(m.steering.form for m in methods if is_causal(m.steering.heads)))


def build_all(
    model: TransformerBridge, spec: VectorSpec, fit_forms: Sequence[str] = (), causal: Sequence[str] = ()
) -> DetoxVectors:
    """Vectors from `spec` on a float32 model, with the methods' fits and the forms' causal rankings."""
    built = build_vectors(
        model,
        spec.pairs,
        site=spec.site,
        k=spec.k,
        probe_texts=spec.probe_texts,
        fit_forms=list(dict.fromkeys([*fit_forms, *fits_for(causal)])),
    )
    if not causal:
        return built
    return causal_rankings(model, built, spec.pairs, forms=causal, confirm=spec.causal_confirm)


def prepare(
    model: TransformerBridge, methods: Sequence[MethodSpec], prompts: Sequence[Prompt], config: EvalConfig
):
    """The checks that need the model but no generation: head ranges and prompt lengths."""
    for method in methods:
        check_heads(method.steering.heads, model.cfg.n_layers, model.cfg.n_heads)
    check_prompts(model, prompts, config)


def model_and_vectors(
    model: ModelSpec,
    out: str | Path,
    vectors: VectorSpec,
    fit_forms: Sequence[str] = (),
    checks: Callable[[TransformerBridge], None] = lambda model: None,
    causal: Sequence[str] = (),
) -> tuple[TransformerBridge, DetoxVectors]:
    """The model in its dtype and the folder's own vectors: built once (rank 0 of a launch) from a
    float32 forward, saved, and checked against the settings on a resume.

    `checks(model)` runs the checks that need the model, before the vectors are built. `causal`:
    the forms whose causal head ranking the vectors must hold (`causal_for`).
    """
    path = Path(out) / VECTORS_FILE
    build = distributed.is_main() and not path.exists()
    bridge = model.load(torch.float32 if build else None, folder=out)
    checks(bridge)
    built = None
    if build:
        built = build_all(bridge, vectors, fit_forms, causal)
        built.save(path)
        if model.torch_dtype != torch.float32:
            del bridge
            bridge = model.load()
    distributed.barrier()  # the other ranks load what rank 0 built
    if built is not None:
        return bridge, built
    loaded = DetoxVectors.load(path, model=bridge)
    settings = vectors.settings()
    found = {key: vectors_id(loaded)[key] for key in settings}
    if found != settings:
        raise DesteinError(f"{path} was built with other settings ({found}); use another --out folder")
    for form in fit_forms:
        loaded.fit(form)
    for form in causal:
        loaded.causal_ranking(form)
    _check_confirm(loaded, path, vectors, causal)
    return bridge, loaded
