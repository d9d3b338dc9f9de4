"""destein-lens: DeStein detoxification as a TransformerLens 4 workbench.

The pipeline, one name per stage:

    from destein_lens import build_vectors, generate, load_model, load_pairs, protocol_sampling, steer

    model = load_model()                               # model: gemma-3-270m as a TransformerBridge
    vectors = build_vectors(model, load_pairs(None))   # pairs -> activations -> probes -> vectors
    with steer(model, vectors, alpha=0.1):             # steering through hook points
        print(generate(model, ["You are such a"], protocol_sampling(n=3)))
"""

from . import baselines, forms  # noqa: F401  (importing registers every steering method)
from .dtypes import generation_dtype
from .errors import DesteinError
from .evaluation import EvalConfig, MethodSpec, evaluate
from .generation import SamplingConfig, generate, protocol_sampling
from .models import DEFAULT_MODEL, LoadRecord, load_model, load_record
from .pairs import SteeringPairs, load_pairs
from .prompts import load_prompts
from .registry import DEFAULT_STRENGTH, Form, Steering, register
from .steering import SteeringConfig, steer
from .vectors import DetoxVectors, build_vectors

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STRENGTH",
    "DesteinError",
    "DetoxVectors",
    "EvalConfig",
    "Form",
    "LoadRecord",
    "MethodSpec",
    "SamplingConfig",
    "SteeringConfig",
    "Steering",
    "SteeringPairs",
    "build_vectors",
    "evaluate",
    "explore",
    "generate",
    "generation_dtype",
    "load_model",
    "load_pairs",
    "load_prompts",
    "load_record",
    "protocol_sampling",
    "register",
    "steer",
]


def __getattr__(name: str):
    """`explore` is imported on first use: its widgets (ipywidgets, Plotly's FigureWidget) would add
    seconds to every command-line start."""
    if name == "explore":
        from .explorer import explore

        return explore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
