"""The methods DeStein is compared with, one steering form each (see `forms`).

Each module cites its paper and registers one form with one strength knob; strength 0 registers no
hook. The training-free ones fit what they need from the same steering pairs as DeStein (no weight
training; `build_vectors(fit_forms=...)` stores the statistics in the vector file); DExperts, DAPT
and GeDi decode with small LoRA adapters trained on the pairs' sides (`experts`, `destein-lens
experts train`). `../shared/docs/baselines.md` summarises them; where the released code and the
paper differ, the docstring says which we follow.
"""

# Importing registers the forms, in the order `compare` runs them.
# isort: off
from . import actadd, iti, act, self_detoxify, preadd, lma, goodtriever, dexperts, dapt, gedi  # noqa: F401
# isort: on
