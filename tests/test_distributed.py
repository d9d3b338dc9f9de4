"""Data-parallel runs under a real `torchrun` launch (gloo, CPU processes) on the tiny model.

A launch must write what one process writes: the same run folder, byte-identical texts and the
same floats within tolerance (the ranks run one thread each, the single process two). kill -9
of one rank loses no finished prompt, and a folder started with 2 ranks resumes with 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from destein_lens.pairs import builtin_seed_pairs
from destein_lens.runfolder import SHARDS_DIR, gens_path

RUN = ["run", "--k", "4", "--samples", "2", "--batch-size", "2", "--dtype", "float32"]
METHODS = ("baseline", "destein")
DRIVER = """
import sys
from destein_lens import cli, figures
saver = figures._Saver
figures._Saver = lambda out, formats: saver(out, ("html",))  # PNG export is test_figures' subject
cli.main(sys.argv[1:])
"""


def _launch(n: int, *args: str, driver: Path | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node n -m destein_lens args` (or a driver script)."""
    target = [str(driver)] if driver else ["-m", "destein_lens"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    return subprocess.Popen([*cmd, *target, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "destein_lens", *args], capture_output=True, text=True)


def _assert_same_run(a: Path, b: Path) -> None:
    """Texts, prompts and order identical; toxicity and perplexity within float tolerance."""
    assert not (a / SHARDS_DIR).exists() or not any((a / SHARDS_DIR).iterdir())
    for method in METHODS:
        rows_a, rows_b = (
            [json.loads(x) for x in gens_path(d, method).read_text().splitlines()] for d in (a, b)
        )
        assert [r["prompt"] for r in rows_a] == [r["prompt"] for r in rows_b]
        for ra, rb in zip(rows_a, rows_b):
            assert [g["text"] for g in ra["generations"]] == [g["text"] for g in rb["generations"]]
            for ga, gb in zip(ra["generations"], rb["generations"]):
                assert ga["toxicity"] == pytest.approx(gb["toxicity"], rel=1e-6)
                assert ga["perplexity"] == pytest.approx(gb["perplexity"], rel=1e-4)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["config"] == mb["config"]
    for method in METHODS:
        for key, value in ma[method].items():
            if isinstance(value, float):
                assert value == pytest.approx(mb[method][key], rel=1e-4, nan_ok=True), key
    va, vb = (load_file(d / "vectors.safetensors") for d in (a, b))
    for name in va:
        assert va[name].allclose(vb[name], atol=1e-5), name


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    done = _single(*RUN, "--model", str(tiny_model_dir), "--max-prompts", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_write_what_one_process_writes(tiny_model_dir, single_run, tmp_path) -> None:
    out = tmp_path / "two"
    done = _finish(_launch(2, *RUN, "--model", str(tiny_model_dir), "--max-prompts", "40", "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(out, single_run)
    assert done.stdout.count("run folder:") == 1  # rank 0 alone prints and writes the report
    assert (out / "report.md").exists()


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The launch's worker processes by RANK (children of the torchrun agent)."""
    children = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    ranks = {}
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [v for v in env if v.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = int(pid)
    return ranks


def test_kill_9_of_one_rank_then_resume_with_more_ranks(tiny_model_dir, single_run, tmp_path) -> None:
    out = tmp_path / "killed"
    args = [*RUN, "--model", str(tiny_model_dir), "--max-prompts", "40", "--out", str(out)]
    launcher = _launch(2, *args)
    shard = out / SHARDS_DIR / "baseline.rank1.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not shard.exists() or shard.read_bytes().count(b"\n") < 2):
        time.sleep(0.02)
    os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
    killed = _finish(launcher)
    assert killed.returncode != 0 and not (out / "metrics.json").exists()
    kept = {
        json.loads(line)["prompt"]["id"]: line
        for path in (out / SHARDS_DIR).glob("*.jsonl")
        for line in path.read_text().splitlines()
        if line.endswith("}")
    }
    assert len(kept) >= 2
    resumed = _finish(_launch(3, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, single_run)
    merged = {json.loads(x)["prompt"]["id"]: x for x in gens_path(out, "baseline").read_text().splitlines()}
    assert all(merged[i] == line for i, line in kept.items())  # finished prompts were kept, not redone


def test_attribution_heads_shared_between_ranks(tiny_model_dir, tmp_path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    builtin_seed_pairs().head(30).to_jsonl(pairs)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["attribute", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--k", "4", "--held-out"]
    args += ["builtin", "--n-held-out", "4", "--study", "patching,steering,selection", "--max-prompts", "2"]
    one = subprocess.run(
        [sys.executable, str(driver), *args, "--out", str(tmp_path / "one")], capture_output=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finish(_launch(2, *args, "--out", str(tmp_path / "two"), driver=driver))
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("patching", "steering", "selection"):
        a, b = (load_file(tmp_path / d / f"{name}.safetensors") for d in ("one", "two"))
        for key in a:
            assert a[key].allclose(b[key], rtol=1e-4, atol=1e-5), (name, key)
    assert not list((tmp_path / "two" / ".partial").glob("*.safetensors"))
    assert (tmp_path / "two" / "report.md").read_text() == (tmp_path / "one" / "report.md").read_text()


# One case per way a launch is refused (`generate`, `pairs induce` and `figures` take the path of
# `vectors`; `attribute --study foo` that of `compare --methods foo`): each launch costs ~15 s.
LAUNCH_REFUSALS = {
    "vectors": (["vectors", "--out", "v.safetensors"], "does not run data-parallel"),
    "compare --methods foo": (["compare", "--methods", "foo"], "unknown method 'foo'"),
    "an unknown option": (["run", "--no-such-option"], "unrecognized arguments"),
    "a prompt beyond the context, after the load": (["run", "--k", "4", "--prompts", "LONG"], "context"),
}


@pytest.mark.parametrize("case", list(LAUNCH_REFUSALS))
def test_a_refused_launch_prints_one_error_line(case, tiny_model_dir, tmp_path) -> None:
    """Rank 0 alone prints the refusal and exits 2; torchrun exits 1, its own failure report
    (ChildFailedError, printed for any failure) naming rank 0's exit 2 as the root cause. Before the
    ranks join, the others exit 0 (or are listed as stopped by SIGTERM when torchrun ends them
    first); after, every rank that refuses exits 2, silently but for rank 0, and torchrun names
    whichever rank ended first."""
    argv, phrase = LAUNCH_REFUSALS[case]
    long = tmp_path / "long.txt"
    long.write_text("word " * 400 + "\n")
    argv = [str(long) if a == "LONG" else a for a in argv]
    args = [*argv, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    if argv[0] in ("generate", "figures"):
        args = [*argv, "--model", str(tiny_model_dir)]
    done = _finish(_launch(2, *args))
    errors = [
        line for line in done.stderr.splitlines() if line.startswith(("error:", "destein-lens: error:"))
    ]
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(errors) == 1 and phrase in errors[0], done.stderr[-2000:]
    root = done.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2" in root
    if "after the load" not in case:  # before joining, the other ranks leave quietly (status 0)
        assert "rank      : 0" in root and done.stderr.count("exitcode  : 2") == 1


def test_compare_with_calibration_on_two_ranks(tiny_model_dir, tmp_path) -> None:
    """Calibration, the choice made from its metrics and the chosen cells: the same on 2 ranks as on 1,
    hook methods and a decoding-time method (self-detoxify's per-step processor) alike."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    prompts, calibration = tmp_path / "prompts.txt", tmp_path / "calibration.txt"
    prompts.write_text("The weather today is\nHe said that\nYou are\n")
    calibration.write_text("My neighbour\nThe city council\n")
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--k",
        "4",
        "--methods",
        "baseline,destein,actadd,self-detoxify",
    ]
    args += ["--prompts", str(prompts), "--calibration-prompts", str(calibration), "--ppl-budget", "1.5"]
    args += ["--samples", "2", "--batch-size", "2", "--dtype", "float32"]
    one = subprocess.run(
        [sys.executable, str(driver), *args, "--out", str(tmp_path / "one")], capture_output=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finish(_launch(2, *args, "--out", str(tmp_path / "two"), driver=driver))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert a["compare"]["chosen"] == b["compare"]["chosen"]
    for cell in [k for k in a if k not in ("scorer", "config", "compare")]:
        texts = [
            [
                [g["text"] for g in json.loads(line)["generations"]]
                for line in gens_path(tmp_path / d, cell).read_text().splitlines()
            ]
            for d in ("one", "two")
        ]
        assert texts[0] == texts[1], cell
        assert a[cell]["expected_max_toxicity"] == pytest.approx(b[cell]["expected_max_toxicity"], rel=1e-6)
        assert a[cell]["perplexity"] == pytest.approx(b[cell]["perplexity"], rel=1e-4)
