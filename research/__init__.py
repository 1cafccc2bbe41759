"""Research code for replora: the papers' experiment grids, the estimation-rate simulation and the
benchmark against PEFT, with their results. Not part of the installed library; run it from the repository
root as `python -m research <command>` (see research/README.md)."""
