"""DExperts (decoding-time experts): the base logits moved by strength x (expert - anti-expert) logits.

Liu, Sap, Lu, Swayamdipta, Bhagavatula, Smith and Choi 2021, "DExperts: Decoding-Time Controlled
Text Generation with Experts and Anti-Experts" (ACL 2021, arXiv 2105.03023; code
alisawuffles/DExperts at 4ef198f, `generation/dexperts_generation.py` `DExpertsGeneration.generate`,
toxicity setting alpha = 2.0 in `scripts/our_scripts/toxicity/dexperts.sh`).

Per row and step, with z the base model's next-token logits and z+ / z- those of the non-toxic
expert and the toxic anti-expert on the same tokens, strength alpha:

    logits = z + alpha * (z+ - z-)

The experts are LoRA adapters of the loaded model (`destein-lens experts train`), run beside it in
one mixed-adapter batch with their own KV cache (`adapted.AdapterRows`).

Cost here: every step is the bridge's forward over the batch plus one forward of the plain copy
over twice the rows; on gemma-3-270m the 262k-token output layer dominates a step, so that is about
three forwards' worth per token, as the paper says. Measured (16 rows x 20 sampled tokens, 2 shared
CPU cores): 2.5x the unsteered model's decoding time (244 s against 80-113 s).

Where it differs from the released code:
- the experts: LoRA adapters (rank 8, query and value projections) trained for minutes on about
  1000 ParaDetox texts of one side, not GPT-2 models fully fine-tuned for an epoch on Jigsaw's
  toxic (>= 0.5) and non-toxic comments;
- nucleus: the released code cuts the base logits to their top-p nucleus (filter_p = 0.9, -inf
  outside) before adding the experts and samples the ensemble with p = 1; here the decoding loop's
  temperature and top-k/top-p act on the combined logits (a decoding processor does not see the
  sampling settings), as for `preadd`;
- the released code runs every step as a full forward over the whole sequence; here each model
  keeps a KV cache (the same logits), and rows are left-padded with positions from the mask.
"""

from __future__ import annotations

import torch

from ..registry import Form, register
from .adapted import adapter_build, adapter_check

KINDS = ("expert", "antiexpert")


def ensemble(base: torch.Tensor, adapted: torch.Tensor, strength: float) -> torch.Tensor:
    """z + alpha (z+ - z-), adapted = [expert, anti-expert] logits (module docstring)."""
    expert, anti = adapted
    return base + strength * (expert - anti)


register(
    Form(
        "dexperts",
        "DExperts: each step's logits + alpha x (non-toxic expert - toxic anti-expert) logits, "
        "both LoRA adapters of the model (destein-lens experts train)",
        adapter_build(KINDS, ensemble),
        default_strength=2.0,  # the released toxicity setting
        max_strength=10.0,
        grid=(0.5, 1.0, 2.0),
        head_wise=False,
        compared=False,  # needs trained adapters for the model; name it in --methods
        needs_vectors=False,
        check=adapter_check(KINDS),
    )
)
