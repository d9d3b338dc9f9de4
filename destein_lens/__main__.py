"""`python -m destein_lens`: the command line, as `torchrun -m` and `accelerate launch -m` start it."""

from .cli import main

main()
