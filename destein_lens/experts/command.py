"""`destein-lens experts train`: the command's checks and work, kept out of `cli` (which only dispatches).

Everything that can be wrong is refused before the model loads: the kinds, the settings, the pairs
file (and whether it leaves pairs to train on), the output folder. Then the bridge loads once, for
the model's identity (`LoadRecord`, by which adapters are found) and its tokenizer, and each kind is
trained in turn on the plain Hugging Face copy of the same weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train(args: argparse.Namespace) -> None:
    from ..files import check_out_dir
    from ..lifecycle import ModelSpec
    from ..models import load_plain_model, load_record
    from ..pairs import load_pairs
    from ..store import package_version
    from .adapters import WEIGHTS, model_key, save_adapter, user_root
    from .settings import TrainSettings, parse_kinds
    from .training import split_pairs, train_adapter

    kinds = parse_kinds(args.kind)
    settings = TrainSettings(
        max_texts=args.max_texts,
        held_out=args.held_out,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        lr=args.lr,
        gen_weight=args.gen_weight,
        seed=args.seed,
    )
    pairs = load_pairs(args.pairs)
    split_pairs(pairs, settings)
    root = check_out_dir(args.out) if args.out is not None else user_root()
    spec = ModelSpec(args.model, args.device, args.dtype, generates=False)
    spec.check()
    bridge = spec.load()
    record, tokenizer = load_record(bridge), bridge.tokenizer
    del bridge
    model = load_plain_model(record, spec.device)
    data = {"source": pairs.source, "sha256": pairs.sha256()}
    for kind in kinds:
        peft_model, report = train_adapter(model, tokenizer, pairs, kind, settings)
        meta = {**report, "pairs": data, "model": record.to_dict(), "package_version": package_version()}
        folder = save_adapter(peft_model, kind, Path(root) / model_key(record) / kind, meta)
        curve = report["loss_curve"]
        print(
            f"wrote {folder} ({(folder / WEIGHTS).stat().st_size / 1e6:.1f} MB): {settings.steps} steps in "
            f"{report['train_seconds']:.0f} s, loss {curve[0]:.3f} -> {curve[-1]:.3f}, held-out loss "
            f"{report['held_out_loss']:.3f} (base model {report['base_held_out_loss']:.3f})"
        )
        model = peft_model.unload()
