"""`python -m replora ...` (and `torchrun -m replora train ...`, `accelerate launch -m replora train ...`)."""
import sys

from .training.cli import main

sys.exit(main())
