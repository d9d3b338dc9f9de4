"""Generation speed through our hooked decoding loop versus Hugging Face `generate`, same weights.

Ours: `destein_lens.generation.generate_ids` on the default model (`load_model()`, the embedded
gemma-3-270m), nucleus sampling p = 0.9, no top-k, 20 new tokens, KV cache on; every step is a
TransformerBridge forward, so every hook point runs. Theirs: `AutoModelForCausalLM.generate` on the
plain HF model loaded from the dequantised cache folder of the same GGUF file, with
do_sample=True, top_p=0.9, top_k=0 (no top-k) and min_new_tokens = max_new_tokens, so both produce
exactly batch x max_new_tokens tokens; this is what the hooks and our loop cost over plain HF.

Booting the bridge swaps modules inside the HF model in place and patches Gemma attention
process-wide (TransformerLens issue 1795), so the two models live in two separate long-lived
worker processes (this script re-run with `--worker`), talking JSON lines over stdin/stdout. The
machine may be shared, so timed rounds alternate between the workers (ours, HF, HF, ours, ...)
with only one computing at a time, both with the same `torch.set_num_threads`, and the figure to
read is the ratio of median tokens/s (the JSON "ratio", judged against the target). Under a
fluctuating load three other estimators are printed beside it: the median of per-round ratios
(each round paired with its neighbour in time), the ratio of the best rounds, and the ratio of
tokens per CPU second of the worker process (less sensitive to being descheduled).

Both workers time tokenisation + generation of the same left-padded batch (checked to encode
identically), and count tokens as batch x max_new_tokens. A greedy variant runs the same way and
also reports how many generated tokens agree between the two. Peak RSS (`ru_maxrss`) is that of
our worker after loading and after all generation, with the HF worker's beside it. The default
of one torch thread per worker is deliberate: on a small machine shared with other work, two
threads stall on each other whenever one is descheduled, and timings swing tenfold.
`--warper-calls` additionally times transformers' TopPLogitsWarper alone on a [batch, vocab]
logit tensor (it sorts the whole 262k-token vocabulary every step, in both paths). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The city council met on Tuesday to discuss",
    "When I walked into the kitchen this morning, I noticed that",
    "Scientists have long argued about whether",
    "My neighbour keeps telling everyone that",
    "The best way to learn a new language is",
    "After the match, the coach said the referee",
    "She opened the letter and",
    "In the comments section, people started calling him",
    "Honestly, the worst part of the whole trip was",
    "He said",
    "According to a report published yesterday, the company",
    "The old man at the bus stop looked at me and",
]


# ----------------------------------------------------------------------------- worker side


def _sync(device: str) -> None:
    """GPU work is asynchronous: wait for it before reading the clock."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(kind: str, threads: int, entry: str | None, device: str = "cpu") -> None:
    """Serve timed generation requests as JSON lines; library chatter goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries must not corrupt the protocol

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if kind == "ours":
        import destein_lens
        from destein_lens.generation import SamplingConfig, generate_ids
        from destein_lens.models import gguf_entry_dir, load_record

        model = destein_lens.load_model(device=device)
        tokenizer = model.tokenizer
        entry = str(gguf_entry_dir(load_record(model).file_sha256))

        def run(prompts: list[str], sample: bool, seed: int, new: int) -> torch.Tensor:
            cfg = SamplingConfig(
                do_sample=sample, top_p=0.9 if sample else None, max_new_tokens=new, seed=seed
            )
            new = generate_ids(model, prompts, cfg)
            _sync(device)
            return new

    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(entry)
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval().to(device)

        @torch.no_grad()
        def run(prompts: list[str], sample: bool, seed: int, new: int) -> torch.Tensor:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
            kwargs = (
                dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0) if sample else dict(do_sample=False)
            )
            torch.manual_seed(seed)
            out = model.generate(
                **enc,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **kwargs,
            )
            _sync(device)
            return out[:, enc.input_ids.shape[1] :]

    reply(
        {"ready": True, "load_s": time.perf_counter() - t0, "entry": entry, "peak_rss_mib": _peak_rss_mib()}
    )
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "encode":
            enc = tokenizer(req["prompts"], padding=True, padding_side="left")
            reply({"input_ids": enc["input_ids"]})
        elif req["op"] == "generate":
            t, c = time.perf_counter(), time.process_time()
            new = run(req["prompts"], req["sample"], req["seed"], req["new_tokens"])
            elapsed, cpu = time.perf_counter() - t, time.process_time() - c
            reply(
                {
                    "elapsed_s": elapsed,
                    "cpu_s": cpu,
                    "shape": list(new.shape),
                    "ids": new.tolist(),
                    "peak_rss_mib": _peak_rss_mib(),
                }
            )
        elif req["op"] == "rss":
            reply({"peak_rss_mib": _peak_rss_mib()})
        elif req["op"] == "warper":
            from transformers.generation.logits_process import TopPLogitsWarper

            warper = TopPLogitsWarper(0.9)
            logits = torch.randn(req["batch"], req["vocab"], generator=torch.Generator().manual_seed(0)) * 3
            ids = torch.zeros(req["batch"], 1, dtype=torch.long)
            warper(ids, logits.clone())
            t = time.perf_counter()
            for _ in range(req["calls"]):
                warper(ids, logits.clone())
            reply({"ms_per_call": 1000 * (time.perf_counter() - t) / req["calls"]})


# ----------------------------------------------------------------------------- driver side


class Worker:
    def __init__(
        self, kind: str, threads: int, log: Path, entry: str | None = None, device: str = "cpu"
    ) -> None:
        self.kind, self.log = kind, log
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--threads", str(threads)]
        cmd += ["--device", device]
        if entry:
            cmd += ["--entry", entry]
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            sys.stderr.write(self.log.read_text()[-4000:])
            raise SystemExit(f"{self.kind} worker died (log: {self.log})")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.stderr.close()


def interleaved(ours: Worker, hf: Worker, rounds: int, prompts: list[str], sample: bool, new: int) -> dict:
    """Alternate timed rounds (ABBA order); tokens/s (wall and per CPU second) and the last outputs."""
    tokens = len(prompts) * new
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "hf": []}
    last: dict[str, list] = {}
    for w in (ours, hf):  # untimed warm-up round each
        w.ask(op="generate", prompts=prompts, sample=sample, seed=10_000, new_tokens=new)
    for r in range(rounds):
        order = (ours, hf) if r % 2 == 0 else (hf, ours)
        for w in order:
            res = w.ask(op="generate", prompts=prompts, sample=sample, seed=r, new_tokens=new)
            if res["shape"] != [len(prompts), new]:
                raise SystemExit(f"{w.kind}: unexpected output shape {res['shape']}")
            rates[w.kind].append(tokens / res["elapsed_s"])
            cpu_rates[w.kind].append(tokens / res["cpu_s"])
            last[w.kind] = res["ids"]
        print(
            f"  {'sample' if sample else 'greedy'} round {r + 1}/{rounds}: "
            f"ours {rates['ours'][-1]:.1f} tok/s, hf {rates['hf'][-1]:.1f} tok/s",
            flush=True,
        )
    return {"rates": rates, "cpu_rates": cpu_rates, "last": last}


def summary(result: dict) -> dict[str, float]:
    """Ratios ours / hf by four estimators: of medians, paired by round, of best rounds, of CPU time."""
    r, c = result["rates"], result["cpu_rates"]
    med = {k: statistics.median(v) for k, v in r.items()}
    return {
        "ours": med["ours"],
        "hf": med["hf"],
        "ratio": med["ours"] / med["hf"],
        "paired": statistics.median(a / b for a, b in zip(r["ours"], r["hf"])),
        "best": max(r["ours"]) / max(r["hf"]),
        "cpu": statistics.median(c["ours"]) / statistics.median(c["hf"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="prompts per batch (cycled from a fixed list; default 8)"
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="new tokens per prompt (default 20)")
    parser.add_argument("--rounds", type=int, default=6, help="timed sampling rounds per side (default 6)")
    parser.add_argument(
        "--greedy-rounds", type=int, default=3, help="timed greedy rounds per side; 0 skips (default 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads in both workers (default 1: steadier than 2 on a shared 2-core box)",
    )
    parser.add_argument(
        "--warper-calls", type=int, default=20, help="time TopPLogitsWarper alone; 0 skips (default 20)"
    )
    parser.add_argument(
        "--target", type=float, default=0.8, help="pass if ours / hf tokens/s >= this (default 0.8)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of both models (default cpu)")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--entry", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.entry, args.device)
        return

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    logdir = Path(tempfile.mkdtemp(prefix="destein-bench-gen-"))
    ours = hf = None
    try:
        # ours first: it loads the model (building the cache if needed) and names the cache folder
        ours = Worker("ours", args.threads, logdir / "ours.log", device=args.device)
        hf = Worker("hf", args.threads, logdir / "hf.log", entry=ours.ready["entry"], device=args.device)
        load_rss = ours.ready["peak_rss_mib"]
        print(
            f"loaded: ours {ours.ready['load_s']:.1f} s (peak RSS {load_rss:.0f} MiB), "
            f"hf {hf.ready['load_s']:.1f} s (peak RSS {hf.ready['peak_rss_mib']:.0f} MiB); "
            f"threads {args.threads}",
            flush=True,
        )
        if ours.ask(op="encode", prompts=prompts) != hf.ask(op="encode", prompts=prompts):
            raise SystemExit(
                "the two tokenizers encode the prompts differently; the comparison would be unfair"
            )

        sample = interleaved(ours, hf, args.rounds, prompts, True, args.new_tokens)
        greedy = None
        if args.greedy_rounds > 0:
            greedy = interleaved(ours, hf, args.greedy_rounds, prompts, False, args.new_tokens)
        peak_rss = ours.ask(op="rss")["peak_rss_mib"]
        hf_peak_rss = hf.ask(op="rss")["peak_rss_mib"]
        warper_ms = None
        if args.warper_calls > 0:
            vocab = 262144
            warper_ms = ours.ask(op="warper", batch=args.batch, vocab=vocab, calls=args.warper_calls)[
                "ms_per_call"
            ]
    finally:
        for w in (ours, hf):
            if w is not None:
                w.close()
    shutil.rmtree(logdir, ignore_errors=True)  # worker logs are kept only when something failed

    s = summary(sample)
    passed = s["ratio"] >= args.target
    tokens = args.batch * args.new_tokens
    print(
        f"sampling (top_p 0.9, batch {args.batch} x {args.new_tokens} new tokens, median of {args.rounds}): "
        f"ours {s['ours']:.1f} tok/s ({tokens / s['ours']:.2f} s/batch), "
        f"hf {s['hf']:.1f} tok/s ({tokens / s['hf']:.2f} s/batch), ratio {s['ratio']:.3f} "
        f"(target >= {args.target}): {'PASS' if passed else 'FAIL'}\n"
        f"  other estimators of ours/hf: paired by round {s['paired']:.3f}, best rounds {s['best']:.3f}, "
        f"per CPU second {s['cpu']:.3f}"
    )
    out = {
        "bench": "generation",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "ours_tok_s": round(s["ours"], 2),
        "hf_tok_s": round(s["hf"], 2),
        "ratio": round(s["ratio"], 4),
        "ratio_paired": round(s["paired"], 4),
        "ratio_best": round(s["best"], 4),
        "ratio_cpu": round(s["cpu"], 4),
        "ratios_by_round": [round(a / b, 3) for a, b in zip(sample["rates"]["ours"], sample["rates"]["hf"])],
    }
    if greedy is not None:
        g = summary(greedy)
        a, b = greedy["last"]["ours"], greedy["last"]["hf"]
        agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / tokens
        rows_equal = sum(ra == rb for ra, rb in zip(a, b))
        print(
            f"greedy (median of {args.greedy_rounds}): ours {g['ours']:.1f} tok/s, hf {g['hf']:.1f} tok/s, "
            f"ratio {g['ratio']:.3f} (paired {g['paired']:.3f}, best {g['best']:.3f}, CPU {g['cpu']:.3f}); "
            f"outputs: {rows_equal}/{args.batch} rows identical, {agree:.1%} of tokens agree"
        )
        out.update(
            greedy_ours_tok_s=round(g["ours"], 2),
            greedy_hf_tok_s=round(g["hf"], 2),
            greedy_ratio=round(g["ratio"], 4),
            greedy_ratio_cpu=round(g["cpu"], 4),
            greedy_rows_identical=rows_equal,
        )
    if warper_ms is not None:
        step_ms = 1000 / s["ours"] * args.batch
        print(
            f"TopPLogitsWarper alone on [{args.batch}, 262144]: {warper_ms:.1f} ms/call, "
            f"vs {step_ms:.1f} ms per decoding step of ours ({warper_ms / step_ms:.0%}); "
            "HF runs the same warper"
        )
        out["top_p_warper_ms_per_step"] = round(warper_ms, 2)
    print(
        f"peak RSS of our worker: {load_rss:.0f} MiB after load, {peak_rss:.0f} MiB after generation "
        f"(HF worker: {hf.ready['peak_rss_mib']:.0f} MiB after load, {hf_peak_rss:.0f} MiB after generation)"
    )
    out.update(
        target=args.target,
        peak_rss_mib=round(peak_rss, 1),
        load_rss_mib=round(load_rss, 1),
        hf_peak_rss_mib=round(hf_peak_rss, 1),
        **{"pass": passed},
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
