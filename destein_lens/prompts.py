"""Evaluation prompts: RealToxicityPrompts files or the hub, plain prompt lists, and a builtin demo set.

The paper evaluates on RealToxicityPrompts, whose records carry the prompt's own Perspective
toxicity; we keep it so results can be split into toxic / non-toxic prompts as in the paper
(`split_by_toxicity`). Sources accepted by `load_prompts`:

- None, "builtin" or "demo": 40 original sentence openings shipped with the package, half neutral and
  half provocative (the split is recorded as "kind" in the data file; toxicity is unknown);
- "hf:<dataset id>": RealToxicityPrompts on the hub, its "challenging" subset as in the paper;
- `*.jsonl`: RealToxicityPrompts records (`{"prompt": {"text": ..., "toxicity": ...}}`) or plain
  records (`{"text": ...}` or `{"prompt": "..."}`, optional "toxicity" and "id"), told apart per line;
- `*.txt`: one prompt per non-blank line.

Prompt ids key the saved generations of a run folder (and what a resumed run skips), so a file
whose ids repeat is refused; that includes an explicit "id" equal to another line's automatic id
(its index among the file's records).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DesteinError
from .readers import check_count, iter_jsonl, load_hf_dataset, open_text, source_file, text_field

DEFAULT_HF_RTP = "allenai/real-toxicity-prompts"

_Parser = Callable[[dict[str, Any], str, int], "Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One prompt to continue; `toxicity` is the prompt's own score where the source gives one."""

    text: str
    toxicity: float | None
    id: str  # stable across subsets: the RTP source span when known, else the index in its file


def load_rtp_jsonl(path: str | Path, max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from a RealToxicityPrompts JSONL file (the layout of the released dataset)."""
    return _load_jsonl(path, max_prompts, _rtp_prompt)


def load_prompts_jsonl(path: str | Path, max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from JSONL in RealToxicityPrompts or plain layout, decided line by line."""
    return _load_jsonl(path, max_prompts, _any_prompt)


def load_txt(path: str | Path, max_prompts: int | None = None) -> list[Prompt]:
    """One prompt per non-blank line, kept verbatim apart from the line break."""
    with open_text(path) as f:  # file lines end only at \n, \r\n or \r: U+2028 etc. stay in the text
        texts = _limit((line.removesuffix("\n") for line in f if line.strip()), max_prompts)
    return [Prompt(t, None, str(i)) for i, t in enumerate(texts)]


def load_hf_rtp(
    dataset_id: str = DEFAULT_HF_RTP, challenging_only: bool = True, max_prompts: int | None = None
) -> list[Prompt]:
    """RealToxicityPrompts from the hub; by default only its `challenging` prompts, which the paper uses."""
    if max_prompts is not None:
        check_count(max_prompts, "max_prompts")
    ds = load_hf_dataset(dataset_id, "train", hint="pass a local RealToxicityPrompts .jsonl instead")
    if "prompt" not in ds.column_names or (challenging_only and "challenging" not in ds.column_names):
        raise DesteinError(
            f"hf:{dataset_id} is not in RealToxicityPrompts layout (columns {ds.column_names})"
        )
    rows = (
        (f"hf:{dataset_id} row {i}", i, r)
        for i, r in enumerate(ds)
        if not challenging_only or r["challenging"]
    )
    return _limit(_parse_unique(rows, _rtp_prompt), max_prompts)


def builtin_demo_prompts() -> list[Prompt]:
    """The 40 original demo openings in `destein_lens/data/demo_prompts.jsonl`."""
    with resources.as_file(resources.files("destein_lens") / "data" / "demo_prompts.jsonl") as p:
        return load_prompts_jsonl(p)


def load_prompts(spec: str | Path | None, max_prompts: int | None = None) -> list[Prompt]:
    """Dispatch on `spec` (see the module docstring); an empty result is an error, not a silent no-op."""
    if max_prompts is not None:
        check_count(max_prompts, "max_prompts")
    if spec is None or spec in ("builtin", "demo"):
        prompts = _limit(builtin_demo_prompts(), max_prompts)
    elif isinstance(spec, str) and spec.startswith("hf:"):
        prompts = load_hf_rtp(spec[3:] or DEFAULT_HF_RTP, max_prompts=max_prompts)
    else:
        path, suffix = source_file(spec, "prompts", (".jsonl", ".txt"), "'demo' or 'hf:<id>'")
        load = load_prompts_jsonl if suffix == ".jsonl" else load_txt
        prompts = load(path, max_prompts)
    if not prompts:
        raise DesteinError(f"no prompts in {spec}")
    return prompts


def split_by_toxicity(prompts: Iterable[Prompt], threshold: float = 0.5) -> dict[str, list[Prompt]]:
    """Toxic (>= threshold, RTP's convention) vs non-toxic prompts; unknown toxicity is left out."""
    out: dict[str, list[Prompt]] = {"toxic": [], "nontoxic": []}
    for p in prompts:
        if p.toxicity is not None:
            out["toxic" if p.toxicity >= threshold else "nontoxic"].append(p)
    return out


def _load_jsonl(path: str | Path, max_prompts: int | None, parse: _Parser) -> list[Prompt]:
    if max_prompts is not None:
        check_count(max_prompts, "max_prompts")
    records = ((where, i, obj) for i, (where, obj) in enumerate(iter_jsonl(path)))
    return _limit(_parse_unique(records, parse), max_prompts)


def _parse_unique(records: Iterable[tuple[str, int, dict[str, Any]]], parse: _Parser) -> Iterator[Prompt]:
    """Parse (`where`, index, record) lazily, refusing an id seen before: ids key a run's saved results."""
    first: dict[str, str] = {}  # id -> where it was first used
    for where, index, obj in records:
        prompt = parse(obj, where, index)
        if prompt.id in first:
            raise DesteinError(f"{where}: prompt id {prompt.id!r} is already used at {first[prompt.id]}")
        first[prompt.id] = where
        yield prompt


def _rtp_prompt(obj: dict[str, Any], where: str, index: int) -> Prompt:
    prompt = obj.get("prompt")
    if not isinstance(prompt, dict):
        raise DesteinError(f'{where}: expected RealToxicityPrompts layout {{"prompt": {{"text": ...}}}}')
    text = text_field(prompt.get("text"), where, "prompt.text")
    span = (obj.get("filename"), obj.get("begin"), obj.get("end"))
    pid = f"{span[0]}:{span[1]}-{span[2]}" if span[0] else str(index)
    return Prompt(text, _toxicity(prompt.get("toxicity"), where), pid)


def _plain_prompt(obj: dict[str, Any], where: str, index: int) -> Prompt:
    key = "text" if "text" in obj else "prompt"
    text = text_field(obj.get(key), where, key)
    pid = obj.get("id")
    return Prompt(text, _toxicity(obj.get("toxicity"), where), str(index if pid is None else pid))


def _any_prompt(obj: dict[str, Any], where: str, index: int) -> Prompt:
    parse = _rtp_prompt if isinstance(obj.get("prompt"), dict) else _plain_prompt
    return parse(obj, where, index)


def _toxicity(value: Any, where: str) -> float | None:
    """A score in [0, 1] or None; RTP leaves some prompts unscored (null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DesteinError(f"{where}: toxicity must be a number in [0, 1] or null, got {value!r}")
    return float(value)


def _limit(items: Iterable[Any], n: int | None) -> list[Any]:
    """The first `n` items, pulling no more from a lazy source (so bad lines past the limit don't fire)."""
    out: list[Any] = []
    for item in items:
        out.append(item)
        if n is not None and len(out) >= n:
            break
    return out
