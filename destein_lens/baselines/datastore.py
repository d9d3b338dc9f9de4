"""kNN-LM datastores: a model's hidden state at each token of some texts, keyed to the token that
followed it, searched for nearest neighbours with faiss, built once per content and cached.

Search is exact (`faiss.IndexFlatL2`). The datastores here hold the steering pairs' tokens: about
700 per side for the 50 built-in pairs, 130-155 thousand for the whole of ParaDetox on
gemma-3-270m. A brute-force scan needs no training and costs milliseconds per step on the former
(about a second per 32 queries on the latter, on one busy CPU core, most of it selecting the 1024
nearest). The reference's IVF-PQ index (4096 centroids) pays off at its millions of keys; here it
would have barely enough keys to train on (faiss asks 39 per centroid) and would perturb the very
distances the kNN distribution is made of.

The squared distances of the k keys found are recomputed key by key, sum((q - key)^2), as the
reference does with `recompute_dists` (its advice for small datastores): the search computes them as
|q|^2 + |key|^2 - 2 q.key, through BLAS from 20 queries on, so a row's distances would otherwise
depend, in their last bits, on how many rows share the search (faiss's
`compute_distance_subset`: a few milliseconds, where gathering the keys in torch took ~90).

faiss brings an OpenMP runtime of its own beside torch's, and the threads of each spin-wait after
every parallel region: on the cores where the model computes, they oversubscribe them (decoding on
2 cores ran 4x slower, unsteered forwards included, once faiss had searched with 2 threads), so
`share_cores` gives faiss one thread where the model runs on the CPU.

A cache file is safetensors (keys in the model's dtype, next tokens as int64) under
`cache_root()/datastores`, named by the sha256 of what determines its content (the caller's
`fingerprint`, also kept in the file's metadata); never pickled, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..files import cache_root, write_atomic
from ..registry import paused

BATCH_SIZE = 32  # texts per forward while building


@dataclass(frozen=True, eq=False)
class Datastore:
    """Keys in a flat faiss index (float32) and the token that followed each key [n] (int64, CPU)."""

    index: faiss.IndexFlatL2
    values: torch.Tensor

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor) -> Datastore:
        index = faiss.IndexFlatL2(keys.shape[1])
        index.add(keys.float().numpy())
        return cls(index, values.long())

    def __len__(self) -> int:
        return len(self.values)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances [b, k'] and next tokens [b, k'] of each query's k' = min(k, n)
        nearest keys, nearest first (CPU); the distances recomputed key by key (module docstring)."""
        q = queries.detach().float().cpu().contiguous().numpy()
        k = min(k, len(self))
        _, found = self.index.search(q, k)
        distances = np.empty_like(found, dtype=np.float32)
        self.index.compute_distance_subset(
            len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(distances), faiss.swig_ptr(found)
        )
        return torch.from_numpy(distances), self.values[torch.from_numpy(found)]


def share_cores(device: torch.device | str) -> None:
    """faiss's threads: one where the model computes on the CPU, every core otherwise (module docstring)."""
    faiss.omp_set_num_threads(1 if torch.device(device).type == "cpu" else os.cpu_count() or 1)


@torch.no_grad()
def hidden_states(
    model: TransformerBridge, hook: str, sequences: Sequence[torch.Tensor], *, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hook`'s activation at every position of each token sequence that has a next token (keys
    [n, width], the model's dtype, CPU) and that next token (values [n]), run unsteered.

    Sequences run right-padded in batches of similar length (sorted), so padding never precedes a
    real token; a datastore's order is immaterial to its search.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pad, device = model.tokenizer.pad_token_id, model.cfg.device
    seen: list[torch.Tensor] = []

    def record(act: torch.Tensor, hook: Any) -> torch.Tensor:
        seen.append(act.detach())
        return act

    keys, values = [], []
    starts = range(0, len(order), BATCH_SIZE)
    for i in tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2):
        batch = [sequences[j] for j in order[i : i + BATCH_SIZE]]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad).to(device)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in batch], batch_first=True).to(
            device
        )
        with paused(), model.hooks(fwd_hooks=[(hook, record)]):
            model(ids, attention_mask=mask, return_type="logits", logits_to_keep=1)
        followed = mask[:, 1:].bool()  # positions whose next token is real
        keys.append(seen.pop()[:, :-1][followed].cpu())
        values.append(ids[:, 1:][followed].cpu())
    return torch.cat(keys), torch.cat(values)


def cached(
    fingerprint: dict[str, Any], build: Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor]]]
) -> dict[str, Datastore]:
    """The datastores `build()` makes ((keys, values) by name), from the cache when a file with this
    `fingerprint` is there; built and written otherwise. Opened files stay in memory (two at most)."""
    text = json.dumps(fingerprint, sort_keys=True)
    path = cache_root() / "datastores" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"
    if not path.exists():
        tensors = {
            f"{name}.{part}": t.contiguous()
            for name, pair in build().items()
            for part, t in zip(("keys", "values"), pair)
        }
        write_atomic(path, save(tensors, metadata={"fingerprint": text}))
    return _open(path)


@lru_cache(maxsize=2)
def _open(path: Path) -> dict[str, Datastore]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DesteinError(f"cannot read the datastore {path} ({e}); delete it to rebuild it") from None
    names = sorted({key.rpartition(".")[0] for key in tensors})
    return {name: Datastore.of(tensors[f"{name}.keys"], tensors[f"{name}.values"]) for name in names}
