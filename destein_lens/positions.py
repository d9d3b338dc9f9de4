"""Absolute token positions of the forward pass in flight.

Under the KV cache a hook sees the whole prompt once, then one position per decoding step, so a
hook cannot tell from its tensor alone whether a position belongs to the prompt or was generated.
The decoding loop (`generation`) declares the window it is running; steering hooks read it.
Outside any declared window a forward pass is taken to be all prompt, starting at position 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenWindow:
    """The forward pass covers positions [start, start + seq_len); [0, prompt_len) is the prompt."""

    start: int
    prompt_len: int | None


_WINDOW: ContextVar[TokenWindow | None] = ContextVar("destein_token_window", default=None)


@contextmanager
def token_window(start: int, prompt_len: int) -> Iterator[None]:
    """Declare the absolute positions of the forward passes run inside the block."""
    token = _WINDOW.set(TokenWindow(start, prompt_len))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def prompt_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [seq_len]: True where the current forward's position belongs to the prompt."""
    window = _WINDOW.get()
    if window is None or window.prompt_len is None:
        return torch.ones(seq_len, dtype=torch.bool, device=device)
    absolute = torch.arange(window.start, window.start + seq_len, device=device)
    return absolute < window.prompt_len
