"""Which dtype a command runs its model in: the names, what a device refuses, and `auto` by measurement.

`auto` is float32 for the commands that do not generate (`vectors`, `attribute`, `figures`: their
effects are small differences). For those that generate it is whichever of float32 and bfloat16
multiplies the model's own decode-step matrices faster on this device, measured, because CPU flags
do not predict it: of two 2-core VMs whose CPUs both have AVX512-BF16 and no AMX, one decoded slower
in bfloat16 (a batch-64 step 337 against 267 ms) and the other 2.6x faster (223 against 578 ms).
The probe (about a second) times, at two decode batch sizes B, one layer's MLP ([B, d_model] x
[d_model, d_mlp] twice, [B, d_mlp] x [d_mlp, d_model]) and a slice of the unembedding ([B, d_model]
x [d_model, vocab]), each weight in nn.Linear's layout, and scales them to a step: n_layers MLPs
plus the whole vocabulary. The shape comes from the model's files before it loads
(`models.model_dims`). bfloat16 is chosen only where its step takes at most `MARGIN` of
float32's at each batch size: it costs precision, and the rest of a step (norms computed in
float32, dtype copies, hooks) does not shrink with it.

A measurement is cached per machine (CPU model, flags and threads, or the GPU's name), device
type, torch version and model shape: one JSON file per key under `cache_root()/dtype-probes`.
The first file written wins, so processes that probe at once (the ranks of a launch on one machine,
test workers) take the same decision; ranks on other machines without that folder measure their
own, so a multi-node launch should name its dtype. Delete the folder to measure again. A run folder
records the decision with the numbers behind it in `dtype.json` (`write_record`); the dtype itself
is part of the folder's identity (config.json). Vectors and probes are built in float32 whatever
the generation dtype (`lifecycle`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .errors import DesteinError
from .files import cache_root, write_atomic
from .models import ModelDims, check_device, model_dims

DTYPES = ("auto", "float32", "bfloat16", "float16")
CANDIDATES = ("float32", "bfloat16")  # auto never picks float16: Gemma's activations overflow it
BATCHES = (16, 64)  # decode batch sizes probed (`run`/`compare` decode 64 rows at a time)
MARGIN = 0.9  # bfloat16 only where its step takes at most this share of float32's
RECORD_FILE = "dtype.json"
# A model whose decode step multiplies less than this (GFLOP, at the larger batch) stays float32
# unmeasured: bfloat16 has nothing to gain there, and timings that short are mostly noise.
MIN_STEP_GFLOP = 1.0
_VOCAB_SLICE = 32768  # unembedding rows timed (more than a cache holds); the estimate scales them
# Each matmul is timed after a warm-up until _SPAN seconds and _MIN_PASSES passes (at most
# _MAX_PASSES); the fastest counts: on a shared machine a pass whose threads were descheduled is slow.
_SPAN, _MIN_PASSES, _MAX_PASSES = 0.05, 3, 200
_MEMO: dict[str, dict[str, Any]] = {}  # this process's probes: one decision per key, however often asked


@dataclass(frozen=True)
class DtypeChoice:
    """What `--dtype` asked for, the dtype that runs, why, and the probe behind `auto`."""

    asked: str
    dtype: str
    reason: str
    probe: dict[str, Any] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def check_dtype(name: str, device: str) -> None:
    """Refuse a dtype name we do not know, or one the device cannot run."""
    if name not in DTYPES:
        raise DesteinError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "float16" and torch.device(device).type == "cpu":
        # Gemma's activations overflow float16's range: on CPU the logits turn NaN and decoding
        # writes empty text. GPUs run it; CPUs take float32 or bfloat16.
        raise DesteinError("--dtype float16 is not supported on cpu; use float32, bfloat16 or auto there")


def choose_dtype(name: str, device: str, *, generates: bool, model: str | Path | None) -> DtypeChoice:
    """The dtype `--dtype name` means for `model` on `device` (module docstring)."""
    check_dtype(name, device)
    if name != "auto":
        return DtypeChoice(name, name, "asked for")
    if not generates:
        return DtypeChoice(name, "float32", "not generating: effects are small differences")
    dims = model_dims(model, hub=True)
    if dims is None:
        return DtypeChoice(name, "float32", "not measured: the model's shape is unknown before its load")
    if step_gflop(dims) < MIN_STEP_GFLOP:
        return DtypeChoice(name, "float32", f"not measured: a {step_gflop(dims):.3g} GFLOP step is too small")
    entry = probe(device, dims)
    ms = entry["step_ms"]
    faster = "bfloat16" in ms and all(ms["bfloat16"][b] <= MARGIN * ms["float32"][b] for b in ms["float32"])
    verdict = "" if faster else "not "
    reason = f"measured: bfloat16's step {verdict}within {MARGIN:g}x float32's at each batch size"
    return DtypeChoice(name, "bfloat16" if faster else "float32", reason, entry)


def generation_dtype(model: str | Path | None = None, device: str | None = None) -> torch.dtype:
    """The dtype `--dtype auto` generates `model` in on `device` (default: the embedded model, the
    default device): for code that builds vectors in float32 and then generates, as the
    explorer does."""
    return choose_dtype("auto", check_device(device), generates=True, model=model).torch_dtype


def step_gflop(dims: ModelDims) -> float:
    """The matmul work of one decode step at the larger probed batch, as the probe counts it."""
    per_token = dims.n_layers * 3 * dims.d_model * dims.d_mlp + dims.d_model * dims.d_vocab
    return 2 * max(BATCHES) * per_token / 1e9


def probe(device: str, dims: ModelDims) -> dict[str, Any]:
    """The cached measurement for this machine, device and shape, measured now if there is none:
    {"key", "step_ms": {dtype: {batch: ms}}, "measured", "file", "cached"}."""
    key = {**machine_key(device), "dims": asdict(dims)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    if digest not in _MEMO:
        path = cache_root() / "dtype-probes" / f"{digest}.json"
        entry = _read(path, key)
        cached = entry is not None
        if entry is None:
            measured = datetime.now(UTC).isoformat(timespec="seconds")
            entry = _keep_first(path, {"key": key, "step_ms": measure(device, dims), "measured": measured})
        _MEMO[digest] = {**entry, "file": str(path), "cached": cached}
    return _MEMO[digest]


def machine_key(device: str) -> dict[str, Any]:
    """What a measurement holds for: the processor, device type, torch version (and CPU threads)."""
    parsed = torch.device(device)
    key: dict[str, Any] = {"device": parsed.type, "torch": torch.__version__}
    if parsed.type == "cuda":
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        key["gpu"] = torch.cuda.get_device_name(index)
        key["capability"] = list(torch.cuda.get_device_capability(index))
    elif parsed.type == "cpu":
        name, flags = _cpu_info()
        key["cpu"] = name
        key["flags_sha256"] = hashlib.sha256(flags.encode()).hexdigest()[:16]
        key["capability"] = torch.backends.cpu.get_cpu_capability()
        key["threads"] = torch.get_num_threads()
    else:
        key["machine"] = f"{platform.machine()} {platform.processor()}".strip()
    return key


def measure(device: str, dims: ModelDims) -> dict[str, dict[str, float]]:
    """Estimated decode-step matmul time in ms, per candidate dtype and batch size; a dtype the
    device cannot multiply in is left out."""
    out = {}
    for name in CANDIDATES:
        try:
            out[name] = _step_ms(device, dims, getattr(torch, name))
        except (RuntimeError, TypeError):  # no kernel for this dtype on this device
            continue
    return out


@torch.no_grad()
def _step_ms(device: str, dims: ModelDims, dtype: torch.dtype) -> dict[str, float]:
    vocab = min(dims.d_vocab, _VOCAB_SLICE)
    up, down, unembed = (
        torch.full(shape, 0.01, dtype=dtype, device=device)
        for shape in ((dims.d_mlp, dims.d_model), (dims.d_model, dims.d_mlp), (vocab, dims.d_model))
    )
    out = {}
    for batch in BATCHES:
        x = torch.full((batch, dims.d_model), 0.5, dtype=dtype, device=device)
        h = torch.full((batch, dims.d_mlp), 0.5, dtype=dtype, device=device)
        layer = _best(device, _mlp, x, h, up, down)
        logits = _best(device, torch.matmul, x, unembed.T)
        out[str(batch)] = round(1000 * (dims.n_layers * layer + logits * dims.d_vocab / vocab), 3)
    return out


def _mlp(x: torch.Tensor, h: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """One layer's MLP matmuls: gate and up projections (the same shape), then down."""
    x @ up.T, x @ up.T, h @ down.T


def _best(device: str, work: Callable[..., Any], *args: torch.Tensor) -> float:
    """The fastest of the timed calls of `work` after a warm-up, in seconds."""
    times: list[float] = []
    work(*args)
    while len(times) < _MAX_PASSES and (len(times) < _MIN_PASSES or sum(times) < _SPAN):
        _sync(device)
        start = time.perf_counter()
        work(*args)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: str) -> None:
    """Accelerators run asynchronously: wait for them before reading the clock."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def _cpu_info() -> tuple[str, str]:
    """The CPU's model name and feature flags (Linux's /proc/cpuinfo; elsewhere what platform says)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            found.setdefault(field.strip(), value.strip())
    except OSError:
        pass
    return found.get("model name") or platform.processor() or platform.machine(), found.get("flags", "")


def _read(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A cached measurement for `key`, or None (none, damaged, or another key's)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("step_ms"), dict)
    ok = (
        ok
        and "float32" in entry["step_ms"]
        and all(
            isinstance(v, dict) and set(v) == {str(b) for b in BATCHES} for v in entry["step_ms"].values()
        )
    )
    return entry if ok else None


def _keep_first(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Store `entry` unless another process stored a valid one first, and return the one stored
    (ours where the cache folder cannot be written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # shared like the rest of the cache
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1)
        try:
            os.link(tmp, path)  # fails if the file exists: the first writer wins
        except FileExistsError:
            first = _read(path, entry["key"])
            if first is not None:
                return first
            os.replace(tmp, path)  # a damaged file: ours replaces it
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass
    return entry


def write_record(folder: str | Path, choice: DtypeChoice) -> Path:
    """The folder's `dtype.json`: what was asked, what runs, why, and the probe's numbers."""
    return write_atomic(Path(folder) / RECORD_FILE, json.dumps(asdict(choice), indent=1))
