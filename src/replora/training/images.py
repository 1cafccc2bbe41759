"""Image datasets for the training pipeline: CIFAR-10 (`--dataset cifar10`) and a user's image folder
(`--dataset path/`). Every example is {"image": ..., "label": int}; `open_image(example)` gives its
picture as an RGB PIL image (the collator calls it for each example, so images are decoded lazily).

CIFAR-10: the 10,000 32x32 images of CIFAR-10's test batch (1,000 per class) as BIG-bench's
cifar10_classification/base64 task ships them (task_data/cifar10/, see its README). "image" holds the
image's original PNG bytes. Split (fixed, whatever the run's --seed): `random.Random(SPLIT_SEED)` shuffles
each class in turn, in CIFAR's class order (airplane, automobile, bird, cat, deer, dog, frog, horse, ship,
truck); the first 80 of a class go to train, the next 20 to validation (800 / 200, like VTAB-1k) and the
other 900 to test (9,000; runs cap it with --max-eval-examples). Each split keeps the file's order.

An image folder: "image" is the file's path (a str). Two layouts:
  A. path/<class>/<images>: one subfolder per class (images may sit in subfolders of a class folder).
  B. path/train/<class>/..., path/val/ or path/validation/<class>/..., path/test/<class>/...: the given
     splits are kept. Layout B is recognised when every subfolder of path is a split name and train/ is
     one of them (so classes may be called "train": layout A with folders bus/, car/, train/ stays A).
Class names are the class folders' names in natural order (numbers as numbers: 2 before 10); in layout B
they are the union over the splits, and a class with no train images is refused.
Split of layout A, and of layout B's train/ when val/ or test/ is missing (fixed, whatever the run's seed):
each class is shuffled by `random.Random(f"{SPLIT_SEED}/<class>")` (a class's split does not change when
other classes change) and gives round(10%) of its images to each missing split, 80/10/10 for layout A.
A class keeps at least one image in train: a class with fewer images than the missing splits + 1 (one or
two images in layout A) stays wholly in train, and one with a few more gives each missing split one
image (3 images in layout A: 1 / 1 / 1). A folder whose validation or test split ends up empty is refused.

Accepted images: .png .jpg .jpeg .bmp .gif .webp .tif .tiff (any case), grey or colour, 8 or 16 bits,
with or without transparency, any and mixed sizes (the model's processor resizes them). open_image
turns each into RGB: grey and palette images are expanded, transparent ones are laid on white, 16-bit
ones are scaled from 0-65535 to 0-255 (32-bit integer and float images: kept in 0-255, floats in 0-1
times 255, scaled like 16 bits in 0-65535, else stretched from their minimum to their maximum), and a
photo's EXIF orientation is applied.

Bad input:
  * Every candidate image is decoded in full when the folder is loaded (Pillow's LOAD_TRUNCATED_IMAGES
    is not set, so a cut-off file raises; JPEGs are decoded at 1/8 scale, which still reads every byte;
    a PNG missing only its end marker has all its pixels and is kept). Unreadable, truncated or corrupted
    images, files with other extensions inside the split or class folders (notes.txt) and images lying
    beside the class folders are skipped and counted in one warning on the "replora.training" logger,
    with the first few paths and why. Non-image files at the top of the folder (a README) and hidden
    files and folders (a name starting with '.': .DS_Store, .ipynb_checkpoints) are ignored, not counted.
  * Refused with one ValueError line naming the folder and the fix: no class subfolders (a flat folder
    of images, an empty folder), no image files at all, a single class, a class folder with no image
    file or none readable, val/ and validation/ both present, split folders without train/, a class
    only in val/ or test/, an empty validation or test split. A directory holding a saved Hugging Face
    dataset (dataset_dict.json, state.json or dataset_info.json) is left to data.py: load_images returns
    None for it. "cifar10" is always the built-in set (a folder of that name: ./cifar10).
  * The loader only reads: nothing is written, cached or moved.
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import os
import random
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .tasks import SPLIT_SEED, TaskData

log = logging.getLogger("replora.training")

CIFAR10_FILE = Path(__file__).parent / "task_data" / "cifar10" / "task.json.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN, CIFAR10_VALIDATION = 80, 20  # per class; the other 900 per class are the test split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
HF_DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")  # datasets' save_to_disk
HELD_OUT = 0.1  # the share of a class's images each missing split (validation, test) takes
SHOWN = 5  # bad files named in the warning

LAYOUT = ("needs one subfolder per class holding its images (at least two classes), or train/ (and "
          "optionally val/ and test/) folders each with one subfolder per class")


def load_images(dataset: str) -> TaskData | None:
    """CIFAR-10 for "cifar10", the images of a folder for a directory, None for anything else (a file,
    a built-in text dataset's name, a saved Hugging Face dataset folder), which data.py reads."""
    if dataset == "cifar10":
        return cifar10()
    path = Path(dataset)
    if not path.is_dir() or any((path / name).is_file() for name in HF_DATASET_FILES):
        return None
    return image_folder(path)


def is_image_folder(path) -> bool:
    """Whether `path` is a directory laid out as an image folder (layout A or B: an image file in a
    non-hidden subfolder, at most three levels down). A quick look at the names: nothing is decoded,
    so load_images may still refuse it (a single class, only broken files)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for top, dirs, files in os.walk(path):
        depth = len(Path(top).relative_to(path).parts)
        dirs[:] = [] if depth >= 3 else [d for d in dirs if not d.startswith(".")]
        if depth and any(_is_image_name(f) for f in files if not f.startswith(".")):
            return True
    return False


def open_image(example: dict):
    """The example's image as an RGB PIL image, whether "image" is a path, PNG/JPEG bytes or a PIL image
    (see the module docstring for how grey, palette, transparent and 16-bit images are converted)."""
    from PIL import Image, ImageOps

    image = example["image"] if isinstance(example, dict) else example
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a new image, turned upright if EXIF says so
        return image if image.mode == "RGB" else to_rgb(image)
    return to_rgb(image)


def to_rgb(image):
    """An RGB copy of a PIL image of any mode."""
    from PIL import Image

    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_depth_to_grey(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_grey(image):
    """16-bit: 0-65535 to 0-255. 32-bit integer or float: kept when in 0-255 (floats in 0-1 times 255),
    16-bit scaling when in 0-65535, else stretched from the image's minimum to its maximum."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):
        values = values * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif low < 0 or high > 255:
        values = (values - low) * (255 / (high - low))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


# CIFAR-10 ------------------------------------------------------------------------------------------

def cifar10() -> TaskData:
    """CIFAR-10's test images from BIG-bench, split 800 / 200 / 9,000 (see the module docstring)."""
    if not CIFAR10_FILE.is_file():
        raise FileNotFoundError(f"CIFAR-10's data file {CIFAR10_FILE} is missing; reinstall replora (it ships "
                                "in replora/training/task_data/cifar10)")
    with gzip.open(CIFAR10_FILE, "rt", encoding="utf-8") as fh:
        task = json.load(fh)
    by_class = defaultdict(list)
    for number, ex in enumerate(task["examples"]):
        scores = ex["target_scores"]
        by_class[CIFAR10_CLASSES.index(max(scores, key=scores.get))].append(number)
    rng = random.Random(SPLIT_SEED)
    splits = {"train": [], "validation": [], "test": []}
    for label in range(len(CIFAR10_CLASSES)):
        order = by_class[label]
        rng.shuffle(order)
        splits["train"] += order[:CIFAR10_TRAIN]
        splits["validation"] += order[CIFAR10_TRAIN:CIFAR10_TRAIN + CIFAR10_VALIDATION]
        splits["test"] += order[CIFAR10_TRAIN + CIFAR10_VALIDATION:]
    examples = task["examples"]

    def pick(numbers):
        return [{"image": base64.b64decode(examples[n]["input"]),
                 "label": CIFAR10_CLASSES.index(max(examples[n]["target_scores"],
                                                    key=examples[n]["target_scores"].get))}
                for n in sorted(numbers)]

    return TaskData("cifar10", "classification", pick(splits["train"]), pick(splits["validation"]),
                    pick(splits["test"]), list(CIFAR10_CLASSES))


# Image folders -------------------------------------------------------------------------------------

def image_folder(path: Path) -> TaskData:
    """A user's folder of images, layout A or B (see the module docstring); only reads."""
    where = f"image folder {path}"
    path = Path(path).absolute()  # examples hold absolute paths, whatever the working folder later
    subfolders = _visible_dirs(path)
    skipped: list[tuple[str, str]] = []  # (path, why)
    split_names = {SPLIT_FOLDERS.get(d.name.lower()) for d in subfolders}
    if subfolders and None not in split_names:  # layout B
        if "train" not in split_names:
            raise ValueError(f"{where} has {', '.join(d.name + '/' for d in subfolders)} but no train/ folder; add "
                             "train/<class>/ images (the other splits are carved out of train when missing)")
        if {"val", "validation"} <= {d.name.lower() for d in subfolders}:
            raise ValueError(f"{where} has both val/ and validation/; keep one of them")
        given = {}
        for d in subfolders:
            _stray_files(d, skipped)
            given[SPLIT_FOLDERS[d.name.lower()]] = _classes(d, f"{where}: {d.name}/", skipped)
        _stray_files(path, skipped, top=True)
    else:  # layout A
        _stray_files(path, skipped, top=True)
        if not subfolders:
            raise ValueError(f"{where} has no subfolders, so no classes; it {LAYOUT}")
        given = {"train": _classes(path, where, skipped)}

    names = sorted({name for classes in given.values() for name in classes}, key=natural_key)
    missing = [name for name in names if name not in given["train"]]
    if missing:
        found = ", ".join(split for split in given if missing[0] in given[split])
        raise ValueError(f"{where}: class {missing[0]!r} has images in {found} but none in train/; add train images "
                         "for it or remove it")
    if len(names) < 2:
        raise ValueError(f"{where} has a single class ({names[0]!r}); it {LAYOUT}")
    for classes in given.values():
        for folder, files in classes.values():
            if not files:
                raise ValueError(f"{where}: class folder {folder} has no image files; add images to it or remove it")

    candidates = [file for classes in given.values() for _, files in classes.values() for file in files]
    unreadable = _unreadable(candidates)
    skipped += [(str(file), why) for file, why in unreadable.items()]
    notes = []
    if skipped:
        notes.append(f"{where}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
                     f"{'are' if len(skipped) > 1 else 'is'} not readable images in a class folder: "
                     + "; ".join(f"{p} ({why})" for p, why in skipped[:SHOWN])
                     + (f"; and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""))
        log.warning("%s", notes[-1])
    for classes in given.values():
        for name, (folder, files) in classes.items():
            kept = [f for f in files if f not in unreadable]
            if not kept:
                raise ValueError(f"{where}: class folder {folder} has no readable image ({len(files)} unreadable); "
                                 "add images to it or remove it")
            classes[name] = kept

    wanted = [s for s in ("validation", "test") if s not in given]
    splits = {s: [] for s in ("train", "validation", "test")}
    label = {name: i for i, name in enumerate(names)}
    for name in names:
        parts = _split_class(given["train"][name], name, wanted)
        for split in ("train", "validation", "test"):
            files = parts.get(split, given.get(split, {}).get(name, []))
            splits[split] += [{"image": str(f), "label": label[name]} for f in files]
    for split in ("validation", "test"):
        if not splits[split]:
            raise ValueError(f"{where}: too few images for a {split} split (a class needs at least "
                             f"{len(wanted) + 1} images to give one to each split); add images or a "
                             f"{'val' if split == 'validation' else split}/ folder")
    return TaskData(path.resolve().name or str(path), "classification", splits["train"], splits["validation"],
                    splits["test"], names, notes=notes)


def _split_class(files: list[Path], name: str, wanted: list[str]) -> dict[str, list[Path]]:
    """A class's train images shared out: round(10%) to each wanted split, at least one each when the
    class has more images than wanted splits, and the rest (at least one) to train."""
    if not wanted:
        return {"train": files}
    order = list(files)
    random.Random(f"{SPLIT_SEED}/{name}").shuffle(order)
    take = round(HELD_OUT * len(order))
    if take == 0 and len(order) > len(wanted):
        take = 1
    parts, start = {}, 0
    for split in wanted:
        parts[split] = sorted(order[start:start + take], key=_path_key)
        start += take
    parts["train"] = sorted(order[start:], key=_path_key)
    return parts


def _classes(folder: Path, where: str, skipped: list) -> dict[str, tuple[Path, list[Path]]]:
    """The class subfolders of `folder`: name -> (folder, its image files in natural order); files with
    other extensions are noted in `skipped`."""
    classes = {}
    for d in _visible_dirs(folder):
        files = []
        for top, dirs, names in os.walk(d):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for n in names:
                if n.startswith("."):
                    continue
                f = Path(top) / n
                if _is_image_name(n):
                    files.append(f)
                else:
                    skipped.append((str(f), "not an image file"))
        classes[d.name] = (d, sorted(files, key=_path_key))
    if not classes:
        raise ValueError(f"{where} has no class subfolders; it {LAYOUT}")
    if not any(files for _, files in classes.values()):
        raise ValueError(f"{where} has no image files ({', '.join(s.lower() for s in IMAGE_SUFFIXES)}) in its "
                         f"class folders; it {LAYOUT}")
    return classes


def _stray_files(folder: Path, skipped: list, top: bool = False) -> None:
    """Files lying beside the class folders: skipped (an image there belongs to no class)."""
    for f in sorted(folder.iterdir(), key=_path_key):
        if f.name.startswith(".") or not f.is_file():
            continue
        if _is_image_name(f.name):
            skipped.append((str(f), "not in a class folder"))
        elif not top:  # a README beside the split folders or class folders of the top folder is expected
            skipped.append((str(f), "not an image file"))


def _unreadable(files: list[Path]) -> dict[Path, str]:
    """The files Pillow cannot decode in full, with the reason (threads: Pillow decodes without the GIL)."""
    if not files:
        return {}
    workers = min(8, os.cpu_count() or 1, max(1, len(files) // 64))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check, files))
    else:
        reasons = [_check(f) for f in files]
    return {f: why for f, why in zip(files, reasons) if why}


def _check(file: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(file) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))  # decode at 1/8 scale: every byte is still read
            image.load()
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises, the file is not a readable image
        message = str(e).strip() or type(e).__name__
        return message.replace(str(file), "").strip(" '\"") or type(e).__name__
    return None


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=_path_key)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def natural_key(name: str):
    """Sort key with runs of digits compared as numbers ("2" < "10", "img9" < "img10"), case folded."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.casefold())
            for part in re.split(r"(\d+)", name) if part], name


def _path_key(path: Path):
    return natural_key(str(path))
