"""Work off the notebook's thread: one job at a time, each cancellable at its next decoding step.

A widget callback must return at once (the kernel handles no other message until it does), so the
explorer's work runs in a background thread. A `Job` is also a decoding processor
(`registry.DecodeProcessor`): installed around the work with `registry.decoding`, the decoding
loop calls it at every step, where it reports progress and raises `Cancelled` once the job is
cancelled, so a cancel takes effect within one step without any hook in the loop itself. Jobs run
one after another on the same model (a steering hook is installed on the model, not per thread):
a new job cancels the one in flight and starts when that one has stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class Cancelled(Exception):
    """The job was cancelled: a newer request, or the cancel button."""


class Job:
    """One request's work: its cancel flag and its step count, seen by the decoding loop."""

    def __init__(self, on_step: Callable[[int], None] = lambda steps: None) -> None:
        self._cancel = threading.Event()
        self._on_step = on_step
        self.steps = 0

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Stop here if the job was cancelled (between stages that are not decoding steps)."""
        if self.cancelled:
            raise Cancelled

    # The DecodeProcessor protocol: observe each step, change nothing.
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.check()

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def advance(self, tokens: torch.Tensor) -> None:
        self.steps += 1
        self._on_step(self.steps)
        self.check()


class Worker:
    """Runs submitted work in background threads, one job at a time, the newest winning."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[[Job], None], on_step: Callable[[int], None] = lambda steps: None) -> Job:
        """Cancel the job in flight and run `work(job)` once it has stopped; returns at once."""
        with self._lock:
            self.cancel()
            job = Job(on_step)
            thread = threading.Thread(target=_run, args=(work, job, self._thread), daemon=True)
            self._job, self._thread = job, thread
            thread.start()
        return job

    def cancel(self) -> None:
        """Cancel the job in flight; it is no longer current, so it reports nothing more."""
        if self._job is not None:
            self._job.cancel()
            self._job = None

    def is_current(self, job: Job) -> bool:
        return job is self._job

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the newest job has finished, counting jobs submitted meanwhile (scripts,
        tests); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (thread := self._thread) is not None:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
            if thread is self._thread:
                break
        return True


def _run(work: Callable[[Job], None], job: Job, previous: threading.Thread | None) -> None:
    if previous is not None:
        previous.join()  # the model is free only once the previous job's hooks are removed
    try:
        work(job)  # a job cancelled before it starts stops at its first check, where it can say so
    except Cancelled:
        pass
