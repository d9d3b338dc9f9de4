"""Where trained adapters live, saving and loading them with their metadata, and the model carrying them.

An adapter is a folder `<root>/<model key>/<kind>/`: peft's `adapter_model.safetensors` and
`adapter_config.json`, and `training.json` (the training data's sha256, the settings, the loss
curve, the held-out loss, the training time, the package version, the model's `LoadRecord` and the
sha256 of the weights file), written last, so a folder without it is unfinished. Weights are read
with safetensors only, never torch.load or pickle, and refused if their digest no longer matches.

Two roots, looked up in this order:
- the user's, `cache_root()/experts`, where `destein-lens experts train` writes by default;
- the package's, `destein_lens/data/experts`: the default model's three adapters, committed. They
  are a few MB, reproducible by the command, and ParaDetox is not shipped, so a fresh user could
  not train them otherwise; a user's retraining in the cache takes precedence.
The model key is the weights' file digest where the model came from a GGUF (the default), else its
name, so adapters follow the model they were trained on.

The adapters act on a plain Hugging Face copy of the model (`models.load_plain_model`), loaded
once per bridge: the bridge has wrapped its own HF modules, which peft cannot inject into.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from ..errors import DesteinError, reason
from ..files import cache_root, write_atomic
from ..models import LoadRecord, _sha256_file, load_plain_model, load_record
from ..registry import paused

WEIGHTS = "adapter_model.safetensors"
META = "training.json"
BUILD_HINT = "destein-lens experts train --kind {kind} --pairs <ParaDetox TSV or hf:s-nlp/paradetox>"


def model_key(record: LoadRecord) -> str:
    """The folder name of a model's adapters: its GGUF digest, else its name made path-safe."""
    if record.file_sha256:
        return record.file_sha256[:24]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", record.name).strip("_.")[-40:]
    return f"{slug}-{hashlib.sha256(record.name.encode()).hexdigest()[:12]}"


def user_root() -> Path:
    return cache_root() / "experts"


def shipped_root() -> Path:
    return Path(str(resources.files("destein_lens").joinpath("data", "experts")))


def build_command(record: LoadRecord, kind: str) -> str:
    """The command line that trains `kind` for the model of `record`."""
    model = "" if record.source == "gguf-package" else f" --model {record.name}"
    return BUILD_HINT.format(kind=kind) + model


def find_adapter(record: LoadRecord, kind: str) -> Path:
    """The folder of the model's `kind` adapter: the user's, else the package's."""
    for root in (user_root(), shipped_root()):
        folder = root / model_key(record) / kind
        if (folder / META).is_file():
            return folder
    raise DesteinError(
        f"no {kind} adapter for model {record.name}; build it with: {build_command(record, kind)}"
    )


def read_meta(folder: Path, record: LoadRecord | None = None) -> dict[str, Any]:
    """An adapter's training.json, its weights checked against their digest (and, given `record`,
    that it was trained on that model)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        digest = _sha256_file(folder / WEIGHTS)
        trained_on = LoadRecord.from_dict(meta["model"])
        matches = digest == meta["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError, DesteinError) as e:
        raise DesteinError(f"adapter {folder} is damaged ({reason(e)}); delete it and train it again") from e
    if not matches:
        raise DesteinError(f"adapter {folder} no longer matches its digest; delete it and train it again")
    if record is not None and not trained_on.same_model(record):
        raise DesteinError(f"adapter {folder} was trained on {trained_on.name}, not on {record.name}")
    return meta


def check_adapters(bridge: TransformerBridge, kinds: Sequence[str]) -> dict[str, str]:
    """Refuse, without loading anything, a missing or damaged adapter of `kinds` for this model;
    each adapter's weights digest (what identifies it in a run's config)."""
    record = load_record(bridge)
    return {kind: read_meta(find_adapter(record, kind), record)["weights_sha256"] for kind in kinds}


def save_adapter(peft_model: Any, kind: str, folder: Path, meta: dict[str, Any]) -> Path:
    """Write adapter `kind` of `peft_model` to `folder` (safetensors), then its training.json."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{kind}-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[kind], safe_serialization=True)
        written = Path(tmp) / kind if (Path(tmp) / kind).is_dir() else Path(tmp)  # peft: a subfolder per name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(written), folder)
    for path in folder.iterdir():
        path.chmod(0o644)  # peft and the temp folder leave 0600, hiding adapters from other readers
    write_atomic(
        folder / META, json.dumps({**meta, "weights_sha256": _sha256_file(folder / WEIGHTS)}, indent=1)
    )
    return folder


def attach(model: Any, kind: str, folder: Path) -> Any:
    """`model` (plain HF, or a PeftModel) with adapter `kind` loaded from `folder` as `kind`."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    if isinstance(model, PeftModel):
        model.add_adapter(kind, config)
    else:
        model = get_peft_model(model, config, adapter_name=kind)
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, load_file(folder / WEIGHTS, device=str(device)), adapter_name=kind)
    return model.eval()


# bridge -> (the plain copy carrying adapters, each loaded adapter's weights digest)
_CARRIERS: WeakKeyDictionary[TransformerBridge, tuple[Any, dict[str, str]]] = WeakKeyDictionary()


def carrier(bridge: TransformerBridge, kinds: Sequence[str]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The plain copy of the bridge's model with adapters `kinds` loaded, and each one's metadata.

    The copy is loaded once per bridge; an adapter once per content (one trained again since is
    loaded again). A missing or damaged adapter is refused before anything loads.
    """
    record = load_record(bridge)
    folders = {kind: find_adapter(record, kind) for kind in kinds}
    metas = {kind: read_meta(folder, record) for kind, folder in folders.items()}
    model, loaded = _CARRIERS.get(bridge) or (load_plain_model(record, bridge.cfg.device), {})
    for kind, folder in folders.items():
        digest = metas[kind]["weights_sha256"]
        if loaded.get(kind) != digest:
            if kind in loaded:
                model.delete_adapter(kind)
            model = attach(model, kind, folder)
            loaded = {**loaded, kind: digest}
    _CARRIERS[bridge] = (model, loaded)
    return model, metas


@torch.no_grad()
def forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, **kwargs: Any) -> Any:
    """One cached forward of the plain model over the new `ids`, `mask` covering cache and ids.

    Positions come from the mask, as the bridge derives them, so left-padded rows see the positions
    the bridge's own forward gives them.
    """
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)[:, -ids.shape[1] :]
    with paused():
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
