"""Goodtriever: a kNN-LM over a toxic and a non-toxic datastore of the model's own hidden states,
combined with the model's next-token distribution as a product of experts.

Pozzobon, Ermis, Lewis and Hooker 2023, "Goodtriever: Adaptive Toxicity Mitigation with
Retrieval-augmented Models" (Findings of EMNLP 2023, arXiv 2310.07589); code for-ai/goodtriever at
60feeaf: `generation/knn_transformers/knnlm.py` (`KNNWrapper.post_forward_hook`,
`modify_probabilities`, `ensemble`, `KNNSaver`), `generation/knn_transformers/datastore.py`
(`get_knns`, `knns_to_log_prob`), defaults in `generation/args.py` and the README's command,
the alpha sweep in `experiments/alpha_experiment.py`. Its kNN part builds on neulab/knn-transformers.

Datastores: for each side of the vectors' steering pairs, one entry per token of a pair text that
has a next token: the key is the model's hidden state there, the value the next token. The key is
the input of the last block's MLP (`blocks.{L-1}.mlp.hook_in`, the residual after the last block's
pre-MLP norm), the reference's default `KEY_TYPE.last_ffn_input` (kNN-LM's best key), not the
final hidden state fed to the unembedding. At decoding, a hook that only reads records the same
site's last position on the forward the decoding loop runs anyway: no extra forward.

Per row and step, with l the next-token logits, d_j the squared L2 distance from the query to its
j-th of the k nearest keys of a datastore D and v_j that key's next token, strength alpha:

    p_D(w)  = sum_{j: v_j = w} softmax_j(-d_j / T)
    log P   = log_softmax(top_p(log_softmax(l)) + alpha * (log p_nontoxic - log p_toxic))

where top_p keeps the LM's nucleus of mass 0.9 (-inf outside; `filter_p`, which the reference took
from DExperts) and a kNN log-probability that is absent or at most -50 is patched to the smallest
one above -50 (`patch_log_probs`). k = 1024 per datastore, T = 100 and alpha = 2 (`--lmbda`, the
README's setting) are the reference's; the decoding loop's temperature and top-p then act on log P,
as Hugging Face's `generate` (top_p = 0.9, top_k = 0) did on the rewritten logits there. alpha = 0
registers nothing; a negative alpha toxifies.

Where it differs from the reference:
- the data: the steering pairs' two sides (the 50 built-in pairs, or ParaDetox) instead of Jigsaw
  comments (toxicity >= 0.5 / = 0, millions of tokens); each text runs alone (behind BOS where the
  tokenizer adds one), while the reference's `run_clm.py` concatenates texts into 1024-token windows
  (stride 512), so its keys carry the preceding, unrelated texts as context;
- exact search (`datastore`: a flat index, the k distances recomputed), where the reference
  defaults to IVF-PQ with approximate distances (its `--flat_index`, `--recompute_dists` options);
- the patch floor per row: the reference takes the smallest log-probability above -50 over the
  whole batch, so a row's distribution depended on the rows beside it; here a row's own, as the
  decoding loop keeps every row's draws independent of its batch;
- keys kept in the model's dtype (the reference stores float16); the datastores are built on first
  use with the model that decodes, in its dtype, and cached by content (pairs sha256, model, dtype,
  site), so they match the queries;
- T = 100 was set on GPT2-large's hidden states; other models' distances have other scales. On
  gemma-3-270m the squared distances from a query to the pair keys are 5-200, so T = 100 weighs the
  k neighbours almost evenly (the kNN distributions near each side's next-token frequencies). `K` and
  `TEMPERATURE` are read at every build, so a notebook can set them for another model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import einops
import torch
from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..models import load_record
from ..registry import FitInputs, FitState, Form, Steering, register
from .datastore import Datastore, cached, hidden_states, share_cores
from .prefixed import check_every_step

if TYPE_CHECKING:
    from ..steering import SteeringConfig
    from ..vectors import DetoxVectors

NAME = "goodtriever"
K = 1024  # neighbours retrieved from each datastore (`k`, `other_k`)
TEMPERATURE = 100.0  # `knn_temp`
FILTER_P = 0.9  # `filter_p`: the LM's own nucleus before the ensemble
PATCH_FLOOR = -50.0  # `patch_log_probs`
SIDES = ("toxic", "nontoxic")
_CANDIDATES = 1024  # `nucleus` sorts this many top tokens, the whole row only where they fall short
_MAX_TOKEN_ID = 2**24  # token ids are kept as float32 in the vector file: exact below this


def key_hook(model: TransformerBridge) -> str:
    """The datastores' key site: the input of the last block's MLP (`KEY_TYPE.last_ffn_input`)."""
    name = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_in"
    if name not in model.hook_dict:
        raise DesteinError(f"{NAME} reads {name}, which this model's bridge does not have")
    return name


@dataclass(frozen=True, eq=False)
class PairTokens(FitState):
    """The pair texts as the model's token ids, what the datastores are built from: every toxic
    text's ids then every non-toxic text's, concatenated [n_tokens], and each text's length
    [2, n_pairs] (floats, as the vector file keeps fits)."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def sides(self) -> dict[str, list[torch.Tensor]]:
        """Each side's texts as int64 token ids."""
        texts = self.tokens.long().split(self.lengths.flatten().long().tolist())
        n = self.lengths.shape[1]
        return dict(zip(SIDES, (list(texts[:n]), list(texts[n:]))))


def fit(inputs: FitInputs) -> PairTokens:
    """Tokenise the two sides (the datastores themselves are built at first use, `datastores`)."""
    ids = inputs.model.tokenizer([*inputs.pairs.toxic, *inputs.pairs.nontoxic]).input_ids
    if max(max(row) for row in ids) >= _MAX_TOKEN_ID:
        raise DesteinError(f"{NAME} keeps token ids as float32; this vocabulary exceeds {_MAX_TOKEN_ID}")
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.float32)
    tokens = torch.tensor([t for row in ids for t in row], dtype=torch.float32)
    return PairTokens(tokens, einops.rearrange(lengths, "(side n) -> side n", side=2))


def datastores(model: TransformerBridge, vectors: DetoxVectors) -> dict[str, Datastore]:
    """The toxic and non-toxic datastores of `vectors`' pairs on `model`: cached by content, built
    on first use (a progress bar per side)."""
    record, hook = load_record(model), key_hook(model)
    fingerprint = {
        "method": NAME,
        "pairs_sha256": vectors.pairs_sha256,
        "model": {k: getattr(record, k) for k in ("name", "file_sha256", "architecture", "mode")},
        "dtype": record.dtype,
        "hook": hook,
    }
    state = vectors.fit(NAME)
    assert isinstance(state, PairTokens)
    sides = state.sides()

    def build() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            side: hidden_states(model, hook, sides[side], desc=f"{NAME} datastore ({side})") for side in SIDES
        }

    return cached(fingerprint, build)


def nucleus(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`log_probs` [batch, vocab] with -inf outside each row's top-p nucleus: the most probable tokens
    while the mass above them is below top_p (Hugging Face's `TopPLogitsWarper`, which the
    reference's `top_k_top_p_filtering` runs).

    Found among each row's top `_CANDIDATES` tokens, and by a sort of the whole row only where those
    do not reach past the nucleus: sorting 262k tokens per row and step costs more than a forward.
    """
    keep = torch.zeros_like(log_probs, dtype=torch.bool)
    rows = torch.arange(len(log_probs), device=log_probs.device)
    vocab = log_probs.shape[-1]
    for width in (min(_CANDIDATES, vocab), vocab):
        top, at = log_probs[rows].topk(width, dim=-1)
        mass = top.exp()
        inside = mass.cumsum(-1) - mass < top_p
        keep[rows] = torch.zeros_like(keep[rows]).scatter(-1, at, inside)
        rows = rows[inside[:, -1]]  # the last candidate is inside: the nucleus may reach further
        if len(rows) == 0:
            break
    return log_probs.masked_fill(~keep, float("-inf"))


def knn_excess(distances: torch.Tensor, values: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """[batch, vocab]: each token's kNN log-probability minus its row's patch floor (0 for tokens
    not retrieved or at most `PATCH_FLOOR`): the reference's `knns_to_log_prob` then
    `patch_log_probs`, less a per-row constant, which the ensemble's log_softmax removes."""
    weights = (-distances / temperature).softmax(-1)
    mass = torch.zeros(len(values), vocab, device=values.device).scatter_add(-1, values, weights)
    log_p = mass.gather(-1, values).log()
    floor = log_p.masked_fill(log_p <= PATCH_FLOOR, float("inf")).amin(-1, keepdim=True)
    return mass.zero_().scatter_(-1, values, (log_p - floor).clamp_min(0.0))


def ensemble(
    logits: torch.Tensor,
    toxic: tuple[torch.Tensor, torch.Tensor],
    nontoxic: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """The product of experts (module docstring) from the next-token logits [batch, vocab] and each
    datastore's (distances, next tokens) [batch, k]."""
    vocab, device = logits.shape[-1], logits.device
    plus, minus = (knn_excess(d.to(device), v.to(device), vocab, temperature) for d, v in (nontoxic, toxic))
    lm = nucleus(logits.log_softmax(-1), FILTER_P)
    return lm.add_(plus, alpha=alpha).sub_(minus, alpha=alpha).log_softmax(-1)


class KnnEnsemble:
    """The decoding processor: each step's logits rewritten from the query its hook recorded."""

    def __init__(self, stores: dict[str, Datastore], alpha: float, k: int, temperature: float) -> None:
        self._stores = stores
        self._alpha, self._k, self._temperature = alpha, k, temperature
        self._query: torch.Tensor | None = None

    def record(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        """The step's query, the key site at the last position; the activation passes unchanged."""
        self._query = act[:, -1]
        return act

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._query = None

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        assert self._query is not None, "the key site's hook records every decoding forward"
        query, self._query = self._query, None
        toxic, nontoxic = (self._stores[side].search(query, self._k) for side in SIDES)
        return ensemble(logits, toxic, nontoxic, self._alpha, self._temperature)

    def advance(self, tokens: torch.Tensor) -> None:
        pass


def _build(
    model: TransformerBridge,
    vectors: DetoxVectors,
    config: SteeringConfig,
    mask: torch.Tensor,
    prompts: Sequence[str] | None,
) -> Steering:
    check_every_step(config)
    share_cores(model.cfg.device)
    processor = KnnEnsemble(datastores(model, vectors), config.alpha, K, TEMPERATURE)
    return Steering(hooks=[(key_hook(model), processor.record)], processors=[processor])


register(
    Form(
        NAME,
        "Goodtriever: kNN-LM over toxic and non-toxic datastores of the model's hidden states on the "
        "pairs, log p + alpha (log p_kNN(non-toxic) - log p_kNN(toxic)) in the LM's 0.9 nucleus",
        _build,
        default_strength=2.0,  # the README's --lmbda 2.0, the args.py default
        max_strength=10.0,  # 5x the released sweep's largest; within the LM nucleus, so never off-text
        grid=(0.5, 1.0, 2.0),  # experiments/alpha_experiment.py sweeps 0.5-2.0
        head_wise=False,
        fit=fit,
        state=PairTokens,
    )
)
