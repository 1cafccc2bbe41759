"""Writes tests/data/v0.2/: adapters saved by replora 0.2.0 (file format 2, RepLoRA's generators with biases and
nn.Linear's init: the design 0.3 replaced), with the inputs and outputs they must reproduce. Run once against
that release:
    PYTHONPATH=<checkout of 0.2.0>/src python tests/data/make_v0_2_adapters.py
The cases and tiny models are make_v0_1_adapters.py's."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import replora  # noqa: E402

from data.make_v0_1_adapters import CASES, write_fixtures  # noqa: E402

if __name__ == "__main__":
    assert replora.__version__ == "0.2.0", replora.__version__
    # LoRA, DoRA and MoSLoRA files did not change from 0.1 to 0.3: RepLoRA's cases only.
    write_fixtures(Path(__file__).parent / "v0.2", {k: v for k, v in CASES.items() if "replora" in k})
