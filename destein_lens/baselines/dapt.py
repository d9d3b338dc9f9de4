"""DAPT (domain-adaptive pretraining) as DeStein's paper uses it: generation from the non-toxic expert.

Gururangan, Marasovic, Swayamdipta, Lo, Beltagy, Downey and Smith 2020, "Don't Stop Pretraining:
Adapt Language Models to Domains and Tasks" (ACL 2020, arXiv 2004.10964); as a detoxification
baseline (Gehman et al. 2020; DExperts, alisawuffles/DExperts at 4ef198f,
`scripts/our_scripts/toxicity/dapt.sh`; DeStein's tables), the language model further trained on
non-toxic text and sampled alone. Here the model is the non-toxic expert adapter of `dexperts`
(`destein-lens experts train --kind expert`), decoded beside the base with its own KV cache.

One strength s in [-1, 1], per row and step, with z the base logits and z+ the expert's:

    logits = (1 - s) z + s z+     (torch.lerp: exactly z+ at s = 1)

so 0 is the unsteered model (no processor at all), 1 is DAPT, and between them the geometric
mixture p^(1-s) p+^s, renormalised: the product-of-experts family DExperts belongs to, so a
calibration grid has something to choose between.

Where it differs: the expert is a LoRA adapter trained for minutes on about 1000 ParaDetox
non-toxic texts, not GPT-2 further pretrained on the non-toxic part of OpenWebText; at s = 1 the
bridge's own forward still runs every step (the decoding loop's), so DAPT costs two forwards per
token here, one of them unused (measured: 1.75x the unsteered decoding time, 16 rows x 20 tokens).
"""

from __future__ import annotations

import torch

from ..registry import Form, register
from .adapted import adapter_build, adapter_check

KINDS = ("expert",)


def interpolate(base: torch.Tensor, adapted: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 - s) z + s z+, adapted = [expert] logits (module docstring)."""
    return torch.lerp(base, adapted[0], strength)


register(
    Form(
        "dapt",
        "DAPT: the non-toxic expert adapter's logits, interpolated with the model's: "
        "(1 - s) z + s z_expert, s = 1 the expert alone (destein-lens experts train)",
        adapter_build(KINDS, interpolate),
        default_strength=1.0,  # DAPT itself
        max_strength=1.0,
        grid=(0.25, 0.5, 1.0),
        head_wise=False,
        compared=False,  # needs a trained adapter for the model; name it in --methods
        needs_vectors=False,
        check=adapter_check(KINDS),
    )
)
