"""Frozen reference: the DeStein release's executed math, ported to plain HF + numpy + sklearn.

Independent of destein_lens on purpose: a plain Hugging Face GPT-2 with forward hooks on each
attention output projection (`c_proj`), each text run alone, as the release does. Mirrors:
- activations: mean over the last 8 token positions of the c_proj output, per layer;
- direction per layer: sum over pairs of (toxic - non-toxic);
- probes: per layer and d_model/n_heads slice, sklearn LogisticRegression on the first 80% of
  pairs (toxic = 1, non-toxic = 0), accuracy on the last 20%;
- fusion at every layer and position: u = normalize(direction * (1 + acc per slice)),
  x' = ||x|| * normalize(x / ||x|| - alpha * u).
Do not "improve" this file: it is what the destein_lens "released_code" path must reproduce.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression


def _cproj_modules(model):
    return [block.attn.c_proj for block in model.transformer.h]


@torch.no_grad()
def head_out_means(model, tokenizer, texts, k=8):
    """[n_texts, n_layers, d_model]: mean of the last k positions of each c_proj output."""
    out = []
    for text in texts:
        captured = []
        handles = [
            m.register_forward_hook(lambda _m, _i, o, sink=captured: sink.append(o))
            for m in _cproj_modules(model)
        ]
        model(tokenizer(text, return_tensors="pt").input_ids)
        for h in handles:
            h.remove()
        out.append(torch.stack([c[0, -k:].mean(0) for c in captured]))
    return torch.stack(out)


def directions(toxic_acts, nontoxic_acts):
    return (toxic_acts - nontoxic_acts).sum(0)  # [n_layers, d_model]


def probe_accuracies(toxic_acts, nontoxic_acts, n_heads, train_frac=0.8):
    """[n_layers, n_heads] held-out accuracy of one probe per (layer, slice)."""
    n, n_layers, d_model = toxic_acts.shape
    width = d_model // n_heads
    n_train = int(n * train_frac)
    acc = np.zeros((n_layers, n_heads))
    for layer in range(n_layers):
        for head in range(n_heads):
            sl = slice(head * width, (head + 1) * width)
            tox, non = toxic_acts[:, layer, sl].numpy(), nontoxic_acts[:, layer, sl].numpy()
            x_train = np.concatenate([tox[:n_train], non[:n_train]])
            y_train = np.concatenate([np.ones(n_train), np.zeros(n_train)])
            x_test = np.concatenate([tox[n_train:], non[n_train:]])
            y_test = np.concatenate([np.ones(n - n_train), np.zeros(n - n_train)])
            clf = LogisticRegression(random_state=0, max_iter=1000).fit(x_train, y_train)
            acc[layer, head] = (clf.predict(x_test) == y_test).mean()
    return torch.tensor(acc, dtype=torch.float32)


@torch.no_grad()
def steered_logits(model, tokens, direction, acc, alpha):
    """Logits with the release's fusion hooked onto every c_proj output."""
    n_heads = acc.shape[1]

    def make_hook(layer):
        width = direction.shape[-1] // n_heads
        weights = (1 + acc[layer]).repeat_interleave(width)
        u = direction[layer] * weights
        u = u / u.norm()

        def hook(_module, _inputs, x):
            norm = x.norm(dim=-1, keepdim=True)
            y = x / norm - alpha * u
            return y / y.norm(dim=-1, keepdim=True) * norm

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(_cproj_modules(model))]
    try:
        return model(tokens).logits
    finally:
        for h in handles:
            h.remove()
