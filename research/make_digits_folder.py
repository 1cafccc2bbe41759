"""Write scikit-learn's digits (1,797 8x8 greyscale images of the digits 0-9) as PNG files, a real image
folder for an end-to-end run of `replora train --dataset <folder>`. From the repository root:

    python -m research.make_digits_folder /tmp/digits [--n-per-class 50]
    replora train --dataset /tmp/digits ...

Layout: <out>/<digit>/<index>.png, index being the image's row in `sklearn.datasets.load_digits()`
(zero-padded to 4 digits); the 0-16 values are scaled to 0-255 (uint8, mode L). --n-per-class keeps the
first n images of each digit. The folder must be new or empty.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_digits_folder(out, n_per_class: int | None = None) -> int:
    """Writes the PNG files under `out`; returns how many."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; give a new or empty folder")
    if n_per_class is not None and n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    written = {}
    for index, (image, digit) in enumerate(zip(pixels, digits.target)):
        if n_per_class is not None and written.get(digit, 0) >= n_per_class:
            continue
        path = out / str(digit) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
        written[digit] = written.get(digit, 0) + 1
    return sum(written.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.make_digits_folder",
                                     description="Write scikit-learn's digits as <out>/<digit>/<index>.png.")
    parser.add_argument("out", help="a new or empty folder")
    parser.add_argument("--n-per-class", type=int, default=None, help="keep the first n images of each digit")
    args = parser.parse_args(argv)
    try:
        n = write_digits_folder(args.out, args.n_per_class)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images of the digits 0-9 under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
