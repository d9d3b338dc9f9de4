"""Head attribution: which heads carry toxicity, causally, with intervals over held-out pairs.

The studies, each a function returning a frozen result of per-pair effects (`HeadEffects`):
- `patching_effects`: one head's output exchanged between the two sides of each pair;
- `direct_logit_attribution`: what a head's output writes straight into the toxic vs neutral logits;
- `steering_effects` / `leave_one_out`: one head steered alone, or all heads but one;
- `gradient_effects`: first-order estimates of patching and steering for every head at once, from
  one forward and backward per batch (attribution patching);
- `selection_curves`: the top-k heads of the probe, causal and random rankings steered together;
- `agreement`: Spearman's rho and top-k overlap between the rankings.
`causal_rankings` adds heads ranked by causal effect to the vectors (cross-fitted), for `heads="causal:k"`.
`run_study` runs them into a resumable folder with a report; `load_study` reads one back.
"""

from .agreement import Agreement, agreement
from .causal import causal_rankings
from .dla import DirectLogits, direct_logit_attribution
from .effects import HeadEffects
from .gradient import gradient_effects
from .heldout import HeldOut, Scores, held_out, score
from .patching import patching_effects
from .selection import SelectionCurves, rankings, selection_curves, selection_evaluation
from .steered import leave_one_out, steering_effects
from .studies import STUDIES, Study, parse_studies, register_study
from .study import StudyResults, StudySettings, held_out_pairs, load_study, run_study

__all__ = [
    "STUDIES",
    "Agreement",
    "DirectLogits",
    "HeadEffects",
    "HeldOut",
    "Scores",
    "SelectionCurves",
    "Study",
    "StudyResults",
    "StudySettings",
    "agreement",
    "causal_rankings",
    "direct_logit_attribution",
    "gradient_effects",
    "held_out",
    "held_out_pairs",
    "leave_one_out",
    "load_study",
    "parse_studies",
    "patching_effects",
    "rankings",
    "register_study",
    "run_study",
    "score",
    "selection_curves",
    "selection_evaluation",
    "steering_effects",
]
