"""`python -m research <command>`: see research/cli.py."""
import sys

from .cli import main

sys.exit(main())
