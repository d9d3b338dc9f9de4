"""Evaluation prompts: RealToxicityPrompts and plain files, the demo set, the toxicity split."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from destein_lens import prompts as prompts_module
from destein_lens.errors import DesteinError
from destein_lens.prompts import (
    Prompt,
    builtin_demo_prompts,
    load_hf_rtp,
    load_prompts,
    load_rtp_jsonl,
    split_by_toxicity,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RTP = DATA / "rtp"
needs_rtp = pytest.mark.skipif(not (RTP / "test_100.jsonl").is_file(), reason="shared RTP data not present")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rtp_line(text: str, toxicity: float | None = 0.2, begin: int = 1, **extra: object) -> str:
    prompt = {"text": text, "toxicity": toxicity}
    return json.dumps({"filename": "f.txt", "begin": begin, "end": begin + 8, "prompt": prompt, **extra})


# --- real RealToxicityPrompts subsets --------------------------------------------------------------


@needs_rtp
def test_rtp_test_100() -> None:
    prompts = load_prompts(RTP / "test_100.jsonl")
    assert len(prompts) == 100
    assert all(p.toxicity is not None and p.text.strip() for p in prompts)
    assert len({p.id for p in prompts}) == 100
    split = split_by_toxicity(prompts)
    assert split["toxic"] and split["nontoxic"] and len(split["toxic"]) + len(split["nontoxic"]) == 100
    assert load_rtp_jsonl(RTP / "test_100.jsonl", max_prompts=7) == prompts[:7]


@needs_rtp
@pytest.mark.parametrize(("name", "side"), [("toxic_1k", "toxic"), ("nontoxic_1k", "nontoxic")])
def test_rtp_toxicity_subsets(name: str, side: str) -> None:
    prompts = load_rtp_jsonl(RTP / f"{name}.jsonl")
    assert len(prompts) == 1000
    assert len(split_by_toxicity(prompts)[side]) == 1000


# --- RTP layout ----------------------------------------------------------------------------------


def test_rtp_record_fields(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", rtp_line("Hello", 0.25) + "\n\n" + rtp_line("Unscored", None, 20) + "\n")
    assert load_rtp_jsonl(f) == [Prompt("Hello", 0.25, "f.txt:1-9"), Prompt("Unscored", None, "f.txt:20-28")]
    bare = write(tmp_path / "b.jsonl", json.dumps({"prompt": {"text": "x", "toxicity": 1}}) + "\n")
    assert load_rtp_jsonl(bare) == [Prompt("x", 1.0, "0")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": {"text": "x"', "invalid JSON"),
        ('"just a string"', "expected a JSON object"),
        ('{"text": "plain"}', "expected RealToxicityPrompts layout"),
        ('{"prompt": {"toxicity": 0.1}}', "missing or non-string 'prompt.text'"),
        (rtp_line("  "), "empty 'prompt.text' text"),
        (rtp_line("x", 1.5), "toxicity must be a number in [0, 1]"),
        (rtp_line("x", "high"), "toxicity must be a number in [0, 1]"),  # type: ignore[arg-type]
    ],
)
def test_rtp_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "r.jsonl", rtp_line("fine") + "\n" + line + "\n")
    with pytest.raises(DesteinError) as err:
        load_rtp_jsonl(f)
    assert f"{f}:2: " in str(err.value) and message in str(err.value)


def test_max_prompts_stops_before_later_bad_lines(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", rtp_line("one") + "\n" + rtp_line("two", begin=20) + "\nnot json\n")
    assert [p.text for p in load_prompts(f, max_prompts=2)] == ["one", "two"]
    with pytest.raises(DesteinError, match="positive integer"):
        load_prompts(f, max_prompts=0)


# --- plain files and dispatch --------------------------------------------------------------------


def test_plain_jsonl_and_mixed_layouts(tmp_path: Path) -> None:
    f = write(
        tmp_path / "p.jsonl",
        '{"text": "The cat", "id": "a"}\n{"prompt": "The dog", "toxicity": 0.9}\n' + rtp_line("A fox") + "\n",
    )
    expected = [Prompt("The cat", None, "a"), Prompt("The dog", 0.9, "1"), Prompt("A fox", 0.2, "f.txt:1-9")]
    assert load_prompts(f) == expected
    bad = write(tmp_path / "q.jsonl", '{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DesteinError, match=r"q\.jsonl:2: missing or non-string 'prompt'"):
        load_prompts(bad)


def test_duplicate_rtp_spans_name_both_lines(tmp_path: Path) -> None:
    lines = [rtp_line("one"), rtp_line("two", begin=20), "", rtp_line("x")]
    f = write(tmp_path / "r.jsonl", "\n".join(lines) + "\n")
    for load in (load_rtp_jsonl, load_prompts):
        with pytest.raises(DesteinError) as err:
            load(f)
        assert str(err.value) == f"{f}:4: prompt id 'f.txt:1-9' is already used at {f}:1"
    assert [p.text for p in load_prompts(f, max_prompts=2)] == ["one", "two"]  # lazy, like bad lines


@pytest.mark.parametrize(
    ("body", "pid"),
    [
        ('{"text": "a"}\n{"text": "b", "id": 0}\n', "0"),  # explicit id = line 1's automatic id
        ('{"text": "a", "id": 1}\n{"text": "b"}\n', "1"),  # line 2's automatic id = line 1's explicit id
        ('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n', "x"),
    ],
)
def test_explicit_ids_cannot_collide_with_other_ids(tmp_path: Path, body: str, pid: str) -> None:
    f = write(tmp_path / "p.jsonl", body)
    with pytest.raises(DesteinError) as err:
        load_prompts(f)
    assert str(err.value) == f"{f}:2: prompt id '{pid}' is already used at {f}:1"


def test_hub_rows_with_duplicate_ids_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Rows(list):
        column_names = ["filename", "begin", "end", "challenging", "prompt"]

    prompt = {"text": "a", "toxicity": 0.9}
    row = {"filename": "f.txt", "begin": 1, "end": 9, "challenging": True, "prompt": prompt}
    rows = Rows([row, {**row, "challenging": False}, row])
    monkeypatch.setattr(prompts_module, "load_hf_dataset", lambda *args, **kwargs: rows)
    assert load_prompts("hf:x/rtp", max_prompts=1) == [Prompt("a", 0.9, "f.txt:1-9")]
    with pytest.raises(DesteinError) as err:
        load_prompts("hf:x/rtp")
    assert str(err.value) == "hf:x/rtp row 2: prompt id 'f.txt:1-9' is already used at hf:x/rtp row 0"


def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path: Path) -> None:
    txt = write(tmp_path / "p.txt", "\ufeffFirst prompt\nSecond\n")
    assert [p.text for p in load_prompts(txt)] == ["First prompt", "Second"]
    jsonl = write(tmp_path / "p.jsonl", "\ufeff" + rtp_line("A fox") + '\n{"text": "The cat"}\n')
    assert [p.text for p in load_prompts(jsonl)] == ["A fox", "The cat"]


def test_non_utf8_file_is_one_clear_error(tmp_path: Path) -> None:
    for name in ("p.txt", "p.jsonl"):
        (tmp_path / name).write_bytes(b'{"text": "caf\xe9"}\n')
        with pytest.raises(DesteinError, match=rf"{name}: not UTF-8 text$"):
            load_prompts(tmp_path / name)


def test_txt_prompts(tmp_path: Path) -> None:
    f = write(tmp_path / "p.txt", "First prompt \n\n   \nSecond prompt\r\n")
    assert load_prompts(f) == [Prompt("First prompt ", None, "0"), Prompt("Second prompt", None, "1")]
    assert load_prompts(f, max_prompts=1) == [Prompt("First prompt ", None, "0")]


def test_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(DesteinError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(DesteinError, match="unsupported prompts file"):
        load_prompts(write(tmp_path / "p.csv", "a\n"))
    for empty in (write(tmp_path / "e.jsonl", "\n"), write(tmp_path / "e.txt", " \n")):
        with pytest.raises(DesteinError, match="no prompts in"):
            load_prompts(empty)


def test_demo_prompts() -> None:
    demo = builtin_demo_prompts()
    assert load_prompts(None) == demo and load_prompts("builtin") == demo
    assert load_prompts("demo", max_prompts=4) == demo[:4]
    assert len(demo) == 40 and len({p.text for p in demo}) == 40 and len({p.id for p in demo}) == 40
    assert all(p.toxicity is None for p in demo)
    text = (resources.files("destein_lens") / "data" / "demo_prompts.jsonl").read_text(encoding="utf-8")
    kinds = [json.loads(line)["kind"] for line in text.splitlines()]
    assert kinds.count("neutral") == kinds.count("provocative") == 20


def test_split_by_toxicity_threshold_and_unknowns() -> None:
    prompts = [Prompt("a", 0.5, "0"), Prompt("b", 0.49, "1"), Prompt("c", None, "2"), Prompt("d", 0.8, "3")]
    assert split_by_toxicity(prompts) == {"toxic": [prompts[0], prompts[3]], "nontoxic": [prompts[1]]}
    assert split_by_toxicity(prompts, threshold=0.6)["toxic"] == [prompts[3]]


def test_hub_failure_is_one_line_error(offline_hub: None) -> None:
    hub_id = "hf:allenai/real-toxicity-prompts"
    for call in (lambda: load_hf_rtp(max_prompts=5), lambda: load_prompts(hub_id)):
        with pytest.raises(DesteinError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "unreachable" in message and ".jsonl" in message
        assert hub_id in message
