"""LMA (language model arithmetic), the classifier-free toxicity formula M - lambda union(M_toxic, M).

Dekoninck, Fischer, Beurer-Kellner and Vechev 2024, "Controlled Text Generation via Language Model
Arithmetic" (ICLR 2024, arXiv 2311.14479; code eth-sri/language-model-arithmetic at 6779b40:
`scripts/formulas_toxicity.py` `negative_biasing(lambda_, max_=True)`, i.e. `l + lambda_ *
Max(l2, l)`, run by `scripts/evaluate_toxicity.py` with lambda_ = -0.9 on the GPT-2 models and
-0.96 / -0.99 on Llama-2-13b, Pythia-12b and MPT-7b; operators in `src/model_arithmetic/operators.py`).

Per row and step, with log p = log_softmax of the plain next-token logits, log q = that of the same
row behind the toxic prefix (decoded beside it with its own KV cache, `prefixed.PrefixContrast`) and
lambda the strength (the reference's -lambda_):

    log P = log_softmax((log p - lambda * max(log q, log p)) / (1 - lambda))
          = log_softmax(log p - lambda / (1 - lambda) * relu(log q - log p))

the second line for lambda < 1 (|lambda| <= 0.99 is accepted). The reference evaluates the formula
on log-softmax outputs (`PromptedLLM.run`), divides the sum by its norm 1 - lambda (`Sum.norm`;
`Max.norm` is 1 for two prompted models) and renormalises (`Operator.normalize`); temperature and
top-k/top-p then act on the result (`ModelArithmetic.create_sample_logprobs`), as the decoding loop
does here with the processor's output.

Why this formula: of the paper's toxicity formulas, the classifier terms (C, the fine-tuned
RoBERTa of `scripts/finetune.py`) need a trained classifier and SelfDebias is a method of its own;
the linear M - lambda M_toxic, normalised, is M - lambda / (1 - lambda) (M_toxic - M), i.e. PREADD
on log-probabilities (`preadd` here); the union formula is the paper's new classifier-free one: it
lowers only the tokens the toxic-prompted model likes more than the plain one and leaves the rest
of the distribution as it was.

Where it differs from the reference: the prefix is the vectors' toxic prefix (Self-Detoxify's and
DeStein's, default `pairs.TOXIC_PREFIX`) joined to the prompt as is, not the reference's
`negative_sentence` + "\\n" (`PromptedLLM`'s template); prompts are RealToxicityPrompts text as
given, not the reference's "Person 1: ...\\nPerson 2:" frame with its stop texts; the reference
experiments sample with top_p = 1, here the protocol's nucleus applies. No speculative sampling
(the reference's toxicity formulas run eager, which disables it).
"""

from __future__ import annotations

import torch

from ..registry import Form, register
from .prefixed import contrast_build


def union_subtract(plain: torch.Tensor, prefixed: torch.Tensor, strength: float) -> torch.Tensor:
    """M - lambda union(M_toxic, M) on next-token logits, normalised log-probabilities (module docstring)."""
    log_p, log_q = plain.log_softmax(-1), prefixed.log_softmax(-1)
    return ((log_p - strength * torch.maximum(log_q, log_p)) / (1 - strength)).log_softmax(-1)


register(
    Form(
        "lma",
        "LMA: M - lambda union(M_toxic, M), each step's tokens the toxic-prefixed prompt favours "
        "pushed down by lambda/(1-lambda) x their log-probability excess",
        contrast_build(union_subtract),
        default_strength=0.9,  # the reference's value for the GPT-2 models, the nearest in size
        max_strength=0.99,  # the reference's largest; lambda = 1 divides by zero
        grid=(0.5, 0.9, 0.96),
        head_wise=False,
    )
)
