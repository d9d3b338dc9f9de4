"""destein-lens: DeStein detoxification as a TransformerLens 4 workbench."""

from .errors import DesteinError
from .generation import SamplingConfig, generate, protocol_sampling
from .models import DEFAULT_MODEL, LoadRecord, load_model, load_record

__all__ = [
    "DEFAULT_MODEL",
    "DesteinError",
    "LoadRecord",
    "SamplingConfig",
    "generate",
    "load_model",
    "load_record",
    "protocol_sampling",
]
