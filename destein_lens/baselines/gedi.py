"""GeDi (generative discriminator guided decoding): a class-conditional adapter reweights each step.

Krause, Gotmare, McCann, Keskar, Joty, Socher and Rajani 2021, "GeDi: Generative Discriminator
Guided Sequence Generation" (Findings of EMNLP 2021, arXiv 2009.06367; code salesforce/GeDi at
2346c7e, `modeling_utils.py` `_generate_no_beam_search` (the `gedi_model` branch), settings of the
detoxify mode in `generate_GeDi.py`: codes clean/dirty, disc_weight 30, filter_p 0.8, target_p 0.8,
class_bias 2).

The class-conditional model is the `gedi` LoRA adapter (`destein-lens experts train --kind gedi`),
trained on both sides of the pairs, each text behind its code (`experts.settings.GEDI_CODES`,
desired "clean" first). Each row is decoded behind both codes with their own KV caches
(`prefixed.PrefixedRows`). Per row and step, with S_c the sum of log P(x_i | code c, x_<i) over the
row's tokens after the code so far (the prompt and what was generated), n their number, and
l_c(x) the code's next-token log-softmax:

    g_c(x)     = logit_scale * (S_c + l_c(x)) / (n + 1)          (+ class_bias for clean)
    log P(x)   = log_softmax over c of g_c(x), for c = clean     (Bayes' rule, uniform prior)
    logits(x)  = log_softmax(z)(x) + omega * log P(x)

then, going through the tokens from the least to the most desired (by log P), those within the
first filter_p of the reweighted distribution's mass whose posterior is below target_p are removed
(the reference's threshold, its Equation 7 with rho = 1 - filter_p and tau = target_p, target_p
shifted by the class bias as the reference's detoxify mode does). omega is the strength.
logit_scale is the one learned in training (GeDi's), stored with the adapter.

Where it differs from the reference: the discriminator is a LoRA adapter of the model itself, not a
separate GPT2-medium; the codes are text lines ("clean\\n") behind the tokenizer's BOS, not one
token prepended; the filter removes tokens with -inf (the reference subtracts 10000); no repetition
penalty; the decoding loop's temperature and top-p act after the reweighting, as in the reference.
Strength 0 registers nothing, so the threshold filter, which the reference applies at any omega,
starts at the first positive strength. Cost: the bridge's forward plus two forwards of the plain copy
(one per code), and a sort of the vocabulary per row, every step: measured 3.1x the unsteered
decoding time (16 rows x 20 tokens, 2 shared CPU cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from ..errors import DesteinError
from ..experts.adapters import carrier, forward
from ..experts.settings import GEDI_CODES
from ..registry import Form, Steering, register
from .adapted import adapter_check
from .prefixed import PrefixedRows, check_every_step

if TYPE_CHECKING:
    from ..steering import SteeringConfig
    from ..vectors import DetoxVectors

KIND = "gedi"
CLASS_BIAS = 2.0
FILTER_P = 0.8
TARGET_P = 1 / (1 + math.exp(-(math.log(0.8 / 0.2) + CLASS_BIAS)))  # 0.8 shifted by the class bias
_HEAD_ROWS = 256  # positions per chunk of the prompt's output layer (a 262k-token vocabulary)

# one code's read of a forward: (next-token log-softmax [batch, vocab], sum of the log-probs of the
# row's scored tokens in this forward [batch], their number [batch])
Read = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def token_logprobs(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(target) from final hidden states [n, d] through the model's output layer, in chunks."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    out = []
    for h, t in zip(hidden.split(_HEAD_ROWS), targets.split(_HEAD_ROWS)):
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


def posterior(last: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, scale: float) -> torch.Tensor:
    """log P(clean | row, next token) [batch, vocab] from the codes' [2, batch, vocab] next-token
    log-softmax, their running sums [2, batch] and counts [2, batch] (module docstring)."""
    g = scale * (last + sums[..., None]) / (counts[..., None] + 1)
    g[0] += CLASS_BIAS
    return g.log_softmax(0)[0]


def reweight(base: torch.Tensor, desired: torch.Tensor, weight: float) -> torch.Tensor:
    """log_softmax(base) + omega log P(clean), with the posterior threshold filter (module docstring)."""
    logits = base.log_softmax(-1) + weight * desired
    order = desired.argsort(-1)  # least desired first
    mass = logits.softmax(-1).gather(-1, order).cumsum(-1)
    drop = (mass < FILTER_P) & (desired.gather(-1, order) < math.log(TARGET_P))
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


class GeDi:
    """The decoding processor: the rows behind both codes, their posterior, the reweighted logits."""

    def __init__(self, bridge: TransformerBridge, weight: float) -> None:
        self._model, metas = carrier(bridge, [KIND])
        self._scale = float(metas[KIND]["logit_scale"])
        self._weight = weight
        lengths = {len(bridge.tokenizer(code).input_ids) for code in GEDI_CODES}
        if len(lengths) != 1:
            raise DesteinError("GeDi's control codes tokenise to different lengths with this tokenizer")
        (self._n_code,) = lengths
        self._rows = PrefixedRows(bridge, GEDI_CODES, self._read)
        self._last = self._sums = self._counts = torch.zeros(0)

    @torch.no_grad()
    def _read(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> Read:
        out = forward(
            self._model,
            ids,
            mask,
            cache,
            adapter_names=[KIND] * ids.shape[0],
            output_hidden_states=True,
            logits_to_keep=1,
        )
        index = (mask.cumsum(-1) - 1)[:, -ids.shape[1] :]  # each token's place among the row's tokens
        scored = (index[:, 1:] >= self._n_code) & mask[:, -ids.shape[1] :][:, 1:].bool()
        rows, cols = scored.nonzero(as_tuple=True)
        logp = token_logprobs(self._model, out.hidden_states[-1][rows, cols], ids[rows, cols + 1])
        sums = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, logp)
        return out.logits[:, -1].float().log_softmax(-1), sums, scored.sum(-1).float()

    def _take(self, reads: list[Read]) -> None:
        last, sums, counts = (torch.stack(parts) for parts in zip(*reads))
        self._last, self._sums, self._counts = last, self._sums + sums, self._counts + counts

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._sums = self._counts = torch.zeros(len(GEDI_CODES), input_ids.shape[0], device=input_ids.device)
        self._take(self._rows.start(input_ids, attention_mask))

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        desired = posterior(self._last, self._sums, self._counts, self._scale)
        return reweight(logits, desired, self._weight)

    def advance(self, tokens: torch.Tensor) -> None:
        chosen = self._last.gather(-1, rearrange(tokens, "b one -> 1 b one").expand(len(GEDI_CODES), -1, -1))
        self._sums = self._sums + chosen.squeeze(-1)
        self._counts = self._counts + 1
        self._take(self._rows.advance(tokens))


def _build(
    model: TransformerBridge,
    vectors: DetoxVectors | None,
    config: SteeringConfig,
    mask: torch.Tensor,
    prompts: Sequence[str] | None,
) -> Steering:
    check_every_step(config)
    return Steering(processors=[GeDi(model, config.alpha)])


register(
    Form(
        "gedi",
        "GeDi: each step's log-probabilities + omega x log P(clean | text, token) from the class-conditional "
        "adapter by Bayes' rule, least-clean tokens under the posterior threshold removed",
        _build,
        default_strength=30.0,  # the reference's disc_weight
        max_strength=100.0,
        grid=(7.5, 15.0, 30.0),
        head_wise=False,
        compared=False,  # needs a trained adapter for the model; name it in --methods
        needs_vectors=False,
        check=adapter_check([KIND]),
    )
)
