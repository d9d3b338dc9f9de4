"""Steering pairs: texts that differ only in toxicity, the raw material of DeStein's directions.

DeStein averages attention-head activation differences over (toxic, non-toxic) paraphrase pairs, so
the two sides must line up one to one; everything here keeps that alignment and refuses data that
breaks it. Sources, all returning `SteeringPairs` (see `load_pairs`):

- the builtin seeds: 50 original paraphrase pairs shipped with the package (no download needed);
- a pairs JSONL file, one `{"toxic": ..., "nontoxic": ...}` per line (what `to_jsonl` writes);
- a ParaDetox TSV (`toxic`, `neutral1`..`neutral3`), as published by s-nlp;
- the ParaDetox dataset on the Hugging Face hub (`hf:<dataset id>`).

ParaDetox gives up to three crowd-sourced paraphrases per toxic sentence. We keep one pair per toxic
sentence, with its first non-empty paraphrase that differs from it: the first is the one every row
has, and repeating a toxic side with several neutrals would weight those sentences more in the mean
difference. A pair whose two sides are the same text (whitespace aside) has no toxicity difference
and only dilutes the mean: JSONL lines and pairs built in code are refused for it, while ParaDetox
rows whose every paraphrase repeats the toxic text (84 of the 11,927 rows of the published TSV) are
skipped, since the published data cannot be fixed by its users.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DesteinError
from .files import write_atomic
from .readers import (
    check_count,
    fold_whitespace,
    iter_jsonl,
    load_hf_dataset,
    open_text,
    source_file,
    text_field,
)

TOXIC_PREFIX = "The following text is abusive, harmful, negative, obscene, racist, rude and toxic: "
NONTOXIC_PREFIX = "The following text is kind, polite, positive, respectful and supportive: "

BUILTIN_SOURCE = "builtin-seeds"
DEFAULT_HF_PARADETOX = "s-nlp/paradetox"


@dataclass(frozen=True)
class SteeringPairs:
    """Aligned toxic / non-toxic texts; `toxic[i]` and `nontoxic[i]` are paraphrases of each other."""

    toxic: tuple[str, ...]
    nontoxic: tuple[str, ...]
    source: str  # provenance: "builtin-seeds", a file path, "hf:<id>", "self-induced:<model>"

    def __post_init__(self) -> None:
        # Lists are accepted for convenience but stored as tuples so the value stays immutable.
        object.__setattr__(self, "toxic", tuple(self.toxic))
        object.__setattr__(self, "nontoxic", tuple(self.nontoxic))
        if len(self.toxic) != len(self.nontoxic):
            raise DesteinError(
                f"steering pairs from {self.source} are one-sided: "
                f"{len(self.toxic)} toxic vs {len(self.nontoxic)} non-toxic texts"
            )
        if not self.toxic:
            raise DesteinError(f"no steering pairs in {self.source}")
        for i, (tox, non) in enumerate(zip(self.toxic, self.nontoxic)):
            for side, text in (("toxic", tox), ("non-toxic", non)):
                if not isinstance(text, str) or not text.strip():
                    raise DesteinError(f"steering pair {i} from {self.source} has an empty {side} text")
            _check_distinct(tox, non, f"steering pair {i} from {self.source}")

    def __len__(self) -> int:
        return len(self.toxic)

    def sha256(self) -> str:
        """Content hash (texts and order, not `source`), so runs can record exactly which pairs they used."""
        payload = json.dumps([self.toxic, self.nontoxic], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def prefixed(
        self, toxic_prefix: str = TOXIC_PREFIX, nontoxic_prefix: str = NONTOXIC_PREFIX
    ) -> tuple[list[str], list[str]]:
        """Texts behind the paper's instruction prefixes, which sharpen the toxic/non-toxic contrast."""
        return [toxic_prefix + t for t in self.toxic], [nontoxic_prefix + t for t in self.nontoxic]

    def head(self, n: int) -> SteeringPairs:
        """The first `n` pairs (all of them if there are fewer)."""
        check_count(n, "number of pairs")
        return replace(self, toxic=self.toxic[:n], nontoxic=self.nontoxic[:n])

    def split(self, frac: float) -> tuple[SteeringPairs, SteeringPairs]:
        """Split in file order into (first `frac`, rest): fit directions on one part, check on the other."""
        if not 0.0 < frac < 1.0:
            raise DesteinError(f"split fraction must be strictly between 0 and 1, got {frac}")
        k = round(len(self) * frac)
        if not 0 < k < len(self):
            raise DesteinError(f"cannot split {len(self)} steering pairs at {frac}: one side would be empty")
        first = replace(self, toxic=self.toxic[:k], nontoxic=self.nontoxic[:k])
        return first, replace(self, toxic=self.toxic[k:], nontoxic=self.nontoxic[k:])

    def to_jsonl(self, path: str | Path) -> None:
        """Write JSONL readable by `load_jsonl`, atomically so a crash never leaves half a file."""
        lines = (
            json.dumps({"toxic": t, "nontoxic": n}, ensure_ascii=False) + "\n"
            for t, n in zip(self.toxic, self.nontoxic)
        )
        write_atomic(path, "".join(lines))


def load_jsonl(path: str | Path) -> SteeringPairs:
    """Pairs from JSONL lines `{"toxic": ..., "nontoxic": ...}` (other keys are ignored)."""
    toxic: list[str] = []
    nontoxic: list[str] = []
    for where, obj in iter_jsonl(path):
        tox, non = (text_field(obj.get(key), where, key) for key in ("toxic", "nontoxic"))
        _check_distinct(tox, non, where)
        toxic.append(tox)
        nontoxic.append(non)
    return SteeringPairs(tuple(toxic), tuple(nontoxic), source=str(path))


def load_paradetox_tsv(path: str | Path, max_pairs: int | None = None) -> SteeringPairs:
    """Pairs from a ParaDetox TSV: one per toxic sentence, with its first non-empty paraphrase.

    The file quotes some fields CSV-style, with line breaks inside; those breaks are folded to spaces.
    """
    path = Path(path)
    if max_pairs is not None:
        check_count(max_pairs, "max_pairs")
    with open_text(path, newline="") as f:  # newline="": csv handles line breaks inside quoted fields
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader, [])
            if "toxic" not in header or not any(c.startswith("neutral") for c in header):
                raise DesteinError(
                    f"{path}:1: expected a header with columns toxic, neutral1, ... (got {header[:6]})"
                )
            rows = _paradetox_rows(reader, header, path)
            return _pairs_from_rows(rows, source=str(path), max_pairs=max_pairs)
        except csv.Error as e:
            raise DesteinError(f"{path}:{reader.line_num}: malformed TSV ({e})") from None


def load_hf_paradetox(
    dataset_id: str = DEFAULT_HF_PARADETOX, split: str = "train", max_pairs: int | None = None
) -> SteeringPairs:
    """Pairs from ParaDetox on the Hugging Face hub (either its `en_toxic_comment` or `toxic` layout)."""
    if max_pairs is not None:
        check_count(max_pairs, "max_pairs")
    ds = load_hf_dataset(dataset_id, split, hint="pass a local ParaDetox .tsv or pairs .jsonl instead")
    columns = set(ds.column_names)
    if {"en_toxic_comment", "en_neutral_comment"} <= columns:
        rows: Iterable[tuple[str, str, list[str]]] = (
            (f"hf:{dataset_id} row {i}", r["en_toxic_comment"] or "", [r["en_neutral_comment"] or ""])
            for i, r in enumerate(ds)
        )
    elif "toxic" in columns and any(c.startswith("neutral") for c in columns):
        neutral_cols = sorted(c for c in columns if c.startswith("neutral"))
        rows = (
            (f"hf:{dataset_id} row {i}", r["toxic"] or "", [r[c] or "" for c in neutral_cols])
            for i, r in enumerate(ds)
        )
    else:
        raise DesteinError(f"hf:{dataset_id} has no ParaDetox columns (found {sorted(columns)})")
    return _pairs_from_rows(rows, source=f"hf:{dataset_id}", max_pairs=max_pairs)


def builtin_seed_pairs() -> SteeringPairs:
    """The 50 original paraphrase pairs shipped in `destein_lens/data/seed_pairs.jsonl`."""
    with resources.as_file(resources.files("destein_lens") / "data" / "seed_pairs.jsonl") as p:
        return replace(load_jsonl(p), source=BUILTIN_SOURCE)


def load_pairs(spec: str | Path | None, max_pairs: int | None = None) -> SteeringPairs:
    """Dispatch on `spec`: None/"builtin" -> seeds, "hf:<id>" -> hub, `*.jsonl` / `*.tsv` -> file."""
    if spec is None or spec == "builtin":
        pairs = builtin_seed_pairs()
    elif isinstance(spec, str) and spec.startswith("hf:"):
        return load_hf_paradetox(spec[3:] or DEFAULT_HF_PARADETOX, max_pairs=max_pairs)
    else:
        path, suffix = source_file(spec, "pairs", (".jsonl", ".tsv"), "'builtin' or 'hf:<id>'")
        if suffix == ".tsv":
            return load_paradetox_tsv(path, max_pairs=max_pairs)
        pairs = load_jsonl(path)
    return pairs if max_pairs is None else pairs.head(max_pairs)


def _paradetox_rows(reader: Any, header: list[str], path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """(`file:line`, toxic, neutrals) per record, with the line a (possibly multi-line) record starts on."""
    toxic_col = header.index("toxic")
    neutral_cols = [i for i, c in enumerate(header) if c.startswith("neutral")]
    start = 2
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DesteinError(f"{where}: expected {len(header)} tab-separated columns, got {len(row)}")
        yield where, row[toxic_col], [row[i] for i in neutral_cols]


def _pairs_from_rows(
    rows: Iterable[tuple[str, str, list[str]]], source: str, max_pairs: int | None
) -> SteeringPairs:
    """One pair per distinct toxic text, with its first non-empty paraphrase that differs from it."""
    chosen: dict[str, str] = {}
    for where, toxic, neutrals in rows:
        toxic = fold_whitespace(toxic)
        paraphrases = [fold_whitespace(n) for n in neutrals if n.strip()]
        if not toxic:
            raise DesteinError(f"{where}: empty toxic text")
        if not paraphrases:
            raise DesteinError(f"{where}: no non-empty neutral paraphrase")
        neutral = next((n for n in paraphrases if n != toxic), None)
        if neutral is None:  # annotators left it as it was: no pair (see the module docstring)
            continue
        chosen.setdefault(toxic, neutral)
        if max_pairs is not None and len(chosen) >= max_pairs:
            break
    return SteeringPairs(tuple(chosen), tuple(chosen.values()), source=source)


def _check_distinct(toxic: str, nontoxic: str, where: str) -> None:
    """Refuse a pair whose sides are one text: its difference is zero, so it only dilutes the mean.

    Case counts ("Idiot" vs "idiot" tokenise differently); whitespace does not.
    """
    if fold_whitespace(toxic) == fold_whitespace(nontoxic):
        raise DesteinError(f"{where}: the toxic and non-toxic texts are identical")
