"""Steering pairs: loaders, validation with file:line errors, provenance hashing, the builtin seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from destein_lens import pairs as pairs_module
from destein_lens.errors import DesteinError
from destein_lens.pairs import (
    NONTOXIC_PREFIX,
    TOXIC_PREFIX,
    SteeringPairs,
    builtin_seed_pairs,
    load_hf_paradetox,
    load_jsonl,
    load_pairs,
    load_paradetox_tsv,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PARADETOX = DATA / "paradetox" / "paradetox.tsv"
needs_paradetox = pytest.mark.skipif(not PARADETOX.is_file(), reason="shared ParaDetox data not present")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the dataclass ---------------------------------------------------------------------------------


def test_pairs_validate_alignment_and_content() -> None:
    with pytest.raises(DesteinError, match="one-sided: 2 toxic vs 1 non-toxic"):
        SteeringPairs(("a", "b"), ("c",), source="t")
    with pytest.raises(DesteinError, match="no steering pairs"):
        SteeringPairs((), (), source="t")
    with pytest.raises(DesteinError, match="pair 1 from t has an empty non-toxic text"):
        SteeringPairs(("a", "b"), ("c", "  \n"), source="t")
    with pytest.raises(DesteinError, match="pair 0 from t has an empty toxic text"):
        SteeringPairs(("",), ("c",), source="t")


def test_pairs_with_identical_sides_name_the_pair() -> None:
    with pytest.raises(DesteinError) as err:
        SteeringPairs(("a b", "you  idiot\n"), ("c", " you idiot"), source="t")
    assert str(err.value) == "steering pair 1 from t: the toxic and non-toxic texts are identical"
    assert len(SteeringPairs(("You idiot",), ("you idiot",), source="t")) == 1  # case makes other tokens


def test_lists_are_stored_as_tuples() -> None:
    pairs = SteeringPairs(["a"], ["b"], source="t")  # type: ignore[arg-type]
    assert pairs.toxic == ("a",) and pairs.nontoxic == ("b",)
    assert hash(pairs)  # frozen and hashable


def test_prefixed_uses_the_paper_prefixes() -> None:
    pairs = SteeringPairs(("you idiot",), ("you there",), source="t")
    assert pairs.prefixed() == (
        ["The following text is abusive, harmful, negative, obscene, racist, rude and toxic: you idiot"],
        ["The following text is kind, polite, positive, respectful and supportive: you there"],
    )
    assert pairs.prefixed(toxic_prefix="T: ", nontoxic_prefix="") == (["T: you idiot"], ["you there"])
    assert TOXIC_PREFIX.endswith(": ") and NONTOXIC_PREFIX.endswith(": ")


def test_sha256_is_stable_content_hash() -> None:
    a = SteeringPairs(("x", "y"), ("p", "q"), source="one")
    assert a.sha256() == SteeringPairs(("x", "y"), ("p", "q"), source="other").sha256()
    assert len(a.sha256()) == 64
    assert a.sha256() != SteeringPairs(("y", "x"), ("q", "p"), source="one").sha256()
    # Boundaries between texts matter: ("ab", "c") is not ("a", "bc").
    joined, split = SteeringPairs(("ab", "c"), ("p", "q"), "s"), SteeringPairs(("a", "bc"), ("p", "q"), "s")
    assert joined.sha256() != split.sha256()


def test_head_and_split() -> None:
    pairs = SteeringPairs(tuple("abcd"), tuple("ABCD"), source="t")
    assert pairs.head(2).toxic == ("a", "b") and pairs.head(10) == pairs
    first, rest = pairs.split(0.75)
    assert (first.toxic, rest.toxic, rest.nontoxic) == (("a", "b", "c"), ("d",), ("D",))
    with pytest.raises(DesteinError, match="one side would be empty"):
        SteeringPairs(("a",), ("b",), "t").split(0.5)
    with pytest.raises(DesteinError, match="strictly between"):
        pairs.split(1.0)
    with pytest.raises(DesteinError, match="positive integer"):
        pairs.head(0)


def test_to_jsonl_round_trips_atomically(tmp_path: Path) -> None:
    pairs = SteeringPairs(("ça craint, idiot", "b"), ("c'est dommage", "d"), source="t")
    out = tmp_path / "sub" / "pairs.jsonl"
    pairs.to_jsonl(out)
    back = load_jsonl(out)
    assert (back.toxic, back.nontoxic, back.source) == (pairs.toxic, pairs.nontoxic, str(out))
    assert back.sha256() == pairs.sha256()
    assert [p.name for p in out.parent.iterdir()] == ["pairs.jsonl"]  # no temp file left behind


# --- JSONL ---------------------------------------------------------------------------------------


def test_load_jsonl_ignores_blank_lines(tmp_path: Path) -> None:
    body = '\n{"toxic": "a", "nontoxic": "b", "x": 1}\n\n{"toxic": "c", "nontoxic": "d"}\n'
    f = write(tmp_path / "p.jsonl", body)
    pairs = load_jsonl(f)
    assert (pairs.toxic, pairs.nontoxic) == (("a", "c"), ("b", "d"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"toxic": "a", "nontoxic": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"toxic": "a"}', "missing or non-string 'nontoxic'"),
        ('{"toxic": 3, "nontoxic": "b"}', "missing or non-string 'toxic'"),
        ('{"toxic": "a", "nontoxic": "   "}', "empty 'nontoxic' text"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "p.jsonl", '{"toxic": "a", "nontoxic": "b"}\n\n' + line + "\n")
    with pytest.raises(DesteinError) as err:
        load_jsonl(f)
    assert f"{f}:3" in str(err.value) and message in str(err.value)


def test_load_jsonl_refuses_identical_sides_with_file_and_line(tmp_path: Path) -> None:
    body = '{"toxic": "a", "nontoxic": "b"}\n{"toxic": "x  y", "nontoxic": "x\\ny"}\n'  # whitespace aside
    f = write(tmp_path / "p.jsonl", body)
    with pytest.raises(DesteinError) as err:
        load_pairs(f)
    assert str(err.value) == f"{f}:2: the toxic and non-toxic texts are identical"


def test_byte_order_mark_is_not_part_of_the_first_pair(tmp_path: Path) -> None:
    f = write(tmp_path / "p.jsonl", '\ufeff{"toxic": "a", "nontoxic": "b"}\n')
    assert load_pairs(f).toxic == ("a",)
    t = write(tmp_path / "p.tsv", "\ufeff" + TSV_HEADER + "shut up\tplease stop\t\t\n")
    assert (load_pairs(t).toxic, load_pairs(t).nontoxic) == (("shut up",), ("please stop",))
    (tmp_path / "bad.tsv").write_bytes(TSV_HEADER.encode() + b"caf\xe9\tb\t\t\n")
    with pytest.raises(DesteinError, match=r"bad\.tsv: not UTF-8 text$"):
        load_pairs(tmp_path / "bad.tsv")


def test_load_jsonl_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DesteinError, match="no steering pairs"):
        load_jsonl(write(tmp_path / "p.jsonl", "\n\n"))


# --- ParaDetox TSV --------------------------------------------------------------------------------

TSV_HEADER = "toxic\tneutral1\tneutral2\tneutral3\n"


def test_tsv_takes_first_nonempty_neutral_and_folds_multiline_fields(tmp_path: Path) -> None:
    f = write(
        tmp_path / "p.tsv",
        TSV_HEADER + "shut up idiot\t\tplease stop\tbe quiet\n"
        'damn  thing\t"this\nthing"\t\t\n'
        "what crap\twhat a pity\t\t\n",
    )
    pairs = load_paradetox_tsv(f)
    assert pairs.toxic == ("shut up idiot", "damn thing", "what crap")
    assert pairs.nontoxic == ("please stop", "this thing", "what a pity")
    assert pairs.source == str(f)
    assert load_paradetox_tsv(f, max_pairs=2).toxic == ("shut up idiot", "damn thing")


def test_tsv_skips_paraphrases_that_repeat_the_toxic_text(tmp_path: Path) -> None:
    f = write(
        tmp_path / "p.tsv",
        TSV_HEADER + "damn it\tdamn  it\toh no\t\n"  # the first paraphrase is no paraphrase
        "you fool\tyou fool\t\tyou  fool\n"  # none is: no pair
        "you fool\tyou silly person\t\t\n",  # the same toxic text, now with a real paraphrase
    )
    pairs = load_paradetox_tsv(f)
    assert (pairs.toxic, pairs.nontoxic) == (("damn it", "you fool"), ("oh no", "you silly person"))


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ('a\t"two\nlines"\t\t\nb\tc\td\n', 4, "expected 4 tab-separated columns, got 3"),
        ("a\tb\t\t\n\tc\t\t\n", 3, "empty toxic text"),
        ("a\tb\t\t\nc\t\t \t\n", 3, "no non-empty neutral paraphrase"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    f = write(tmp_path / "p.tsv", TSV_HEADER + body)
    with pytest.raises(DesteinError) as err:
        load_paradetox_tsv(f)
    assert f"{f}:{line}: {message}" in str(err.value)


def test_tsv_needs_a_paradetox_header(tmp_path: Path) -> None:
    with pytest.raises(DesteinError, match=r"p\.tsv:1: expected a header"):
        load_paradetox_tsv(write(tmp_path / "p.tsv", "a\tb\n"))
    with pytest.raises(DesteinError, match=r"p\.tsv:1: expected a header"):
        load_paradetox_tsv(write(tmp_path / "p.tsv", ""))
    with pytest.raises(DesteinError, match="no steering pairs"):
        load_paradetox_tsv(write(tmp_path / "p.tsv", TSV_HEADER))


@needs_paradetox
def test_real_paradetox_tsv() -> None:
    pairs = load_paradetox_tsv(PARADETOX)
    assert len(pairs) > 10_000
    assert all("\n" not in t for t in pairs.toxic + pairs.nontoxic)
    assert all(t != n for t, n in zip(pairs.toxic, pairs.nontoxic))
    # The release quotes a few fields across line breaks; they must not shift or merge records.
    i = next(i for i, t in enumerate(pairs.toxic) if t.startswith("schandelmeier , who are you"))
    assert pairs.nontoxic[i] == "schandelmeier , who are you trying to impress with this article"
    assert load_paradetox_tsv(PARADETOX, max_pairs=25).toxic == pairs.toxic[:25]


# --- builtin seeds -------------------------------------------------------------------------------


def test_builtin_seeds_are_valid_paraphrase_pairs() -> None:
    seeds = builtin_seed_pairs()
    assert len(seeds) >= 40 and seeds.source == "builtin-seeds"
    assert len(set(seeds.toxic)) == len(seeds) and len(set(seeds.nontoxic)) == len(seeds)
    for tox, non in zip(seeds.toxic, seeds.nontoxic):
        assert 8 <= len(tox.split()) <= 25 and 8 <= len(non.split()) <= 25, (tox, non)
        assert tox != non


def test_builtin_seed_toxic_sides_score_as_profane() -> None:
    profanity_check = pytest.importorskip("profanity_check")
    seeds = builtin_seed_pairs()
    tox = profanity_check.predict_prob(list(seeds.toxic))
    non = profanity_check.predict_prob(list(seeds.nontoxic))
    assert tox.mean() - non.mean() > 0.5
    assert (tox >= 0.5).mean() >= 0.8
    assert (non < 0.5).mean() >= 0.9


# --- dispatcher and hub --------------------------------------------------------------------------


def test_load_pairs_dispatch(tmp_path: Path) -> None:
    seeds = builtin_seed_pairs()
    assert load_pairs(None) == seeds and load_pairs("builtin") == seeds
    assert load_pairs("builtin", max_pairs=3) == seeds.head(3)
    j = tmp_path / "p.jsonl"
    seeds.to_jsonl(j)
    assert load_pairs(j).sha256() == seeds.sha256()
    assert load_pairs(str(j), max_pairs=2).toxic == seeds.toxic[:2]
    t = write(tmp_path / "p.tsv", TSV_HEADER + "a\tb\t\t\n")
    assert load_pairs(t).toxic == ("a",)
    with pytest.raises(DesteinError, match="pairs file not found"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(DesteinError, match="unsupported pairs file"):
        load_pairs(write(tmp_path / "p.csv", "toxic,nontoxic\n"))


def test_hub_rows_skip_paraphrases_that_repeat_the_toxic_text(monkeypatch: pytest.MonkeyPatch) -> None:
    class Rows(list):
        column_names = ["en_toxic_comment", "en_neutral_comment"]

    rows = Rows(
        [
            {"en_toxic_comment": "shut up", "en_neutral_comment": "please be quiet"},
            {"en_toxic_comment": "damn it", "en_neutral_comment": "damn  it"},
        ]
    )
    monkeypatch.setattr(pairs_module, "load_hf_dataset", lambda *args, **kwargs: rows)
    pairs = load_pairs("hf:x/paradetox")
    assert (pairs.toxic, pairs.nontoxic) == (("shut up",), ("please be quiet",))
    assert pairs.source == "hf:x/paradetox"


def test_hub_failure_is_one_line_error(offline_hub: None) -> None:
    for call in (lambda: load_hf_paradetox(max_pairs=5), lambda: load_pairs("hf:s-nlp/paradetox")):
        with pytest.raises(DesteinError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert "hf:s-nlp/paradetox" in message and "unreachable" in message and ".tsv" in message
