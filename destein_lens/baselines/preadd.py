"""PREADD (prefix-adaptive decoding), the suppression variant: contrast the plain prompt's logits
with the toxic-prefixed prompt's, at every step.

Pei, Yang and Klein 2023, "PREADD: Prefix-Adaptive Decoding for Controlled Text Generation"
(Findings of ACL 2023, arXiv 2307.03214; code jonnypei/acl23-preadd at e364464,
`methods/method_preadd.py` `generate_preadd`, logits from `utils/model_server.py`).

Per row and step, with l the plain next-token logits and l_p those of the same row behind the toxic
prefix (decoded beside it with its own KV cache, `prefixed.PrefixContrast`), strength s:

    logits = l - s * (l_p - l)

The released code computes `base + strength * (prefix - base)` on the raw logits the model server
returns; its toxicity setting is strength -1 (README, `scripts/experiments/evaluate_toxicity.py`),
so s here is minus the released strength and s = 1 is the released setting; negative s toxifies.
Raw logits or log-softmax give the same distribution (the coefficients 1 + s and -s sum to 1).

Where it differs from the released code:
- nucleus: the released code first cuts the plain logits to their top-p/top-k nucleus (-1e9
  outside), combines, divides by the temperature and samples without a second cut, so only the
  plain nucleus can be drawn; here the decoding loop's temperature and top-k/top-p act on the
  combined logits (a decoding processor does not see the sampling settings), as LMA's code does;
- the prefix: the vectors' toxic prefix, the one Self-Detoxify and DeStein's prefixed pairs use
  (default `pairs.TOXIC_PREFIX`), joined to the prompt as is (it ends in ": "), not the released
  `preadd_prefixes.toxic_prefixes["pos"]` joined with " ";
- the released model server forbids EOS and newline tokens in both streams; here the model decodes
  as in every other method of the comparison; rows are batched and left-padded.
"""

from __future__ import annotations

import torch

from ..registry import Form, register
from .prefixed import contrast_build


def suppress(plain: torch.Tensor, prefixed: torch.Tensor, strength: float) -> torch.Tensor:
    """PREADD-S: the plain logits moved away from the prefixed ones (module docstring)."""
    return plain - strength * (prefixed - plain)


register(
    Form(
        "preadd",
        "PREADD-S: each step's logits moved away from the toxic-prefixed prompt's, "
        "l - s (l_prefix - l), the prefixed prompt decoded beside the plain one",
        contrast_build(suppress),
        default_strength=1.0,  # the released toxicity setting (strength -1)
        max_strength=30.0,  # the released sweep's largest (scripts/decoding_bash_scripts)
        grid=(0.5, 1.0, 2.0),
        head_wise=False,
    )
)
