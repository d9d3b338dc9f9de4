"""Interactive exploration in JupyterLab: pick heads on the map, move the strength, see the text change.

`explore(model, vectors)` returns one widget (`widget`); what it computes lives in plain modules
a script can call without it: `contrast` (one prompt's continuations with and without steering,
token by token), `tally` (the harness's metrics over a few prompts), `render` (the HTML and the
code that reproduces the screen), `headmap` (the clickable head grid) and `background` (work off
the notebook's thread, cancellable at every decoding step).
"""

from .contrast import Continuation, Contrast, contrast, draw
from .widget import Explorer, explore

__all__ = ["Continuation", "Contrast", "Explorer", "contrast", "draw", "explore"]
