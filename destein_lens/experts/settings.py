"""What an expert is trained on and how: the kinds, and the settings every adapter records.

Kept free of torch and peft so the command line's parser can read the defaults cheaply.

The defaults fit the budget of at most 15 minutes per adapter on 2 CPU cores for gemma-3-270m.
On this 270M model the 262k-token output layer costs more than the 18 layers under it, forward
and backward, so the cost is per token: 20 steps of 8 x 64 tokens (about 10k tokens, one pass
over about 800 ParaDetox texts of one side) for an expert; GeDi reads each text behind both
control codes, so a step is 4 texts of each side, about as many tokens. Measured with these
defaults on ParaDetox (2 cores shared with other jobs, load average 7-10, so each command got
45-59% of one core): training 622 s (expert), 971 s (anti-expert), 764 s (GeDi), plus 31 / 60 /
576 s of held-out evaluation (GeDi reads 96 texts behind both codes, with and without the adapter);
the whole commands used 414 / 489 / 781 CPU-seconds, a few minutes each on 2 idle cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DesteinError

# kind -> the side of the pairs it learns ("both": GeDi's class-conditional model)
KINDS: dict[str, str] = {"expert": "nontoxic", "antiexpert": "toxic", "gedi": "both"}
# GeDi's control codes, the desired class first: the reference's detoxifier codes (`clean`, `dirty`),
# each ending a line so it tokenises apart from the text behind it, in training and decoding alike.
GEDI_CODES = ("clean\n", "dirty\n")


def parse_kinds(text: str) -> list[str]:
    """The comma list of --kind, each one of KINDS, in the order given."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DesteinError(f"--kind takes a comma list of {', '.join(KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


@dataclass(frozen=True)
class TrainSettings:
    """One adapter's training: texts, steps, batch, LoRA size and optimiser (stored with it)."""

    max_texts: int = 800  # training texts per side
    held_out: int = 48  # texts per side kept out of training, for the held-out loss
    steps: int = 20
    batch_size: int = 8  # blocks per step (experts); texts per step, half of each side (GeDi)
    block_size: int = 64  # tokens per packed block (experts)
    rank: int = 8
    lora_alpha: int = 16
    lr: float = 1e-3
    gen_weight: float = 0.8  # GeDi's lambda: generative share of its hybrid loss (released script)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_texts", "held_out", "steps", "batch_size", "block_size", "rank", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DesteinError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DesteinError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if not self.lr > 0:
            raise DesteinError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.gen_weight <= 1.0:
            raise DesteinError(f"--gen-weight must be within [0, 1], got {self.gen_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
