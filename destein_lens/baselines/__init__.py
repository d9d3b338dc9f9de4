"""The training-free methods DeStein is compared with, one steering form each (see `forms`).

Each module cites its paper, fits what it needs from the same steering pairs as DeStein (no weight
training; `build_vectors(fit_forms=...)` stores the statistics in the vector file) and registers
one form with one strength knob; strength 0 registers no hook. `../shared/docs/baselines.md`
summarises them; where the released code and the paper differ, the docstring says which we follow.
"""

from . import act, actadd, iti, self_detoxify  # noqa: F401  (importing registers the forms)
