"""Image datasets (replora.training.images): CIFAR-10 from BIG-bench and a user's image folders, built here
in tmp_path with Pillow (a few pixels each)."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from replora.training.images import (CIFAR10_CLASSES, is_image_folder, load_images, natural_key,  # noqa: E402
                                     open_image)


def save(path, image=None, fmt=None, size=(6, 5), mode="RGB", colour=(200, 30, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or Image.new(mode, size, colour)).save(path, fmt)
    return path


def folder(root, counts: dict[str, int], suffix=".png"):
    for name, n in counts.items():
        for i in range(n):
            save(root / name / f"{i}{suffix}", colour=(i * 7 % 256, 10, 20))
    return root


def truncated(path, fmt):
    rng = np.random.default_rng(0)
    save(path, Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)), fmt)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def labels_of(examples, names):
    return Counter(names[e["label"]] for e in examples)


# layouts and splits --------------------------------------------------------------------------------

def test_layout_a_splits_80_10_10_per_class_in_natural_class_order(tmp_path):
    root = folder(tmp_path / "pets", {"10": 20, "2": 10, "1": 30})
    assert is_image_folder(root)
    data = load_images(str(root))
    assert data.name == "pets" and data.kind == "classification"
    assert data.label_names == ["1", "2", "10"]
    for split, per_class in (("train", {"1": 24, "2": 8, "10": 16}), ("validation", {"1": 3, "2": 1, "10": 2}),
                             ("test", {"1": 3, "2": 1, "10": 2})):
        assert labels_of(getattr(data, split), data.label_names) == per_class, split
    paths = [e["image"] for split in (data.train, data.validation, data.test) for e in split]
    assert len(paths) == len(set(paths)) == 60 and all(isinstance(p, str) for p in paths)
    assert all(f"/{data.label_names[e['label']]}/" in e["image"] for e in data.train + data.test)
    again = load_images(str(root))
    assert (again.train, again.validation, again.test) == (data.train, data.validation, data.test)


def test_a_relative_folder_gives_absolute_paths_and_its_own_name(tmp_path, monkeypatch):
    folder(tmp_path / "shapes", {"a": 3, "b": 3})
    monkeypatch.chdir(tmp_path / "shapes")
    data = load_images(".")
    assert data.name == "shapes" and all(e["image"].startswith(str(tmp_path)) for e in data.train)


def test_natural_key_orders_numbers_as_numbers():
    assert sorted(["b10", "B2", "a", "10", "9", "img10", "img9"], key=natural_key) == \
        ["9", "10", "a", "B2", "b10", "img9", "img10"]


def test_tiny_classes_stay_in_train_and_three_images_give_one_to_each_split(tmp_path):
    data = load_images(str(folder(tmp_path / "f", {"one": 1, "two": 2, "three": 3})))
    names = data.label_names
    assert labels_of(data.train, names) == {"one": 1, "two": 2, "three": 1}
    assert labels_of(data.validation, names) == {"three": 1} and labels_of(data.test, names) == {"three": 1}


def test_too_few_images_for_an_evaluation_split_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"too few images for a validation split .*at least 3 images"):
        load_images(str(folder(tmp_path / "f", {"a": 2, "b": 2})))


def test_layout_b_keeps_the_given_splits(tmp_path):
    root = tmp_path / "b"
    folder(root / "train", {"cat": 4, "dog": 5})
    folder(root / "val", {"cat": 1, "dog": 2})
    folder(root / "test", {"dog": 3, "bird": 0})  # bird/ absent: folder() makes no file for 0
    assert is_image_folder(root)
    data = load_images(str(root))
    assert data.label_names == ["cat", "dog"]
    assert data.sizes() == {"train": 9, "validation": 3, "test": 3}
    assert all("/train/" in e["image"] for e in data.train) and all("/val/" in e["image"] for e in data.validation)


def test_layout_b_train_and_test_only_carves_validation_from_train(tmp_path):
    root = tmp_path / "b"
    folder(root / "train", {"x": 20, "y": 10})
    folder(root / "test", {"x": 2, "y": 2})
    data = load_images(str(root))
    names = data.label_names
    assert labels_of(data.validation, names) == {"x": 2, "y": 1}
    assert labels_of(data.train, names) == {"x": 18, "y": 9}
    assert all("/train/" in e["image"] for e in data.validation) and all("/test/" in e["image"] for e in data.test)
    assert not {e["image"] for e in data.validation} & {e["image"] for e in data.train}


def test_layout_b_with_only_train_is_split_like_layout_a(tmp_path):
    root = tmp_path / "b"
    folder(root / "train", {"x": 10, "y": 10})
    assert load_images(str(root)).sizes() == {"train": 16, "validation": 2, "test": 2}


def test_a_class_named_train_beside_other_classes_is_layout_a(tmp_path):
    data = load_images(str(folder(tmp_path / "vehicles", {"bus": 3, "train": 3})))
    assert data.label_names == ["bus", "train"]


def test_layout_b_classes_are_the_union_but_need_train_images(tmp_path):
    root = tmp_path / "b"
    folder(root / "train", {"cat": 3, "dog": 3})
    folder(root / "validation", {"cat": 1, "dog": 1})
    folder(root / "test", {"cat": 1, "fox": 1})
    with pytest.raises(ValueError, match=r"class 'fox' has images in test but none in train/"):
        load_images(str(root))


def test_layout_b_refusals(tmp_path):
    root = tmp_path / "b"
    folder(root / "val", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"has val/ but no train/ folder"):
        load_images(str(root))
    folder(root / "train", {"cat": 1, "dog": 1})
    folder(root / "validation", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"both val/ and validation/"):
        load_images(str(root))


# bad input -----------------------------------------------------------------------------------------

def test_broken_and_non_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = folder(tmp_path / "f", {"a": 3, "b": 3})
    truncated(root / "a" / "cut.png", "PNG")
    truncated(root / "b" / "cut.jpg", "JPEG")
    (root / "b" / "garbage.png").write_bytes(b"not a png at all")
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored, not counted
    (root / ".cache").mkdir()
    save(root / ".cache" / "x.png")  # hidden folder: not a class
    (root / "README.txt").write_text("my pictures")  # beside the class folders: expected, not counted
    with caplog.at_level(logging.WARNING, logger="replora.training"):
        data = load_images(str(root))
    assert data.label_names == ["a", "b"] and sum(data.sizes().values()) == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 4 files" in message
    for name in ("cut.png", "cut.jpg", "garbage.png", "notes.txt"):
        assert name in message
    assert "truncated" in message and ".DS_Store" not in message and "README" not in message


def test_a_clean_folder_logs_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="replora.training"):
        load_images(str(folder(tmp_path / "f", {"a": 3, "b": 3})))
    assert not caplog.records


def test_an_image_outside_the_class_folders_is_counted(tmp_path, caplog):
    root = folder(tmp_path / "f", {"a": 3, "b": 3})
    save(root / "stray.png")
    with caplog.at_level(logging.WARNING, logger="replora.training"):
        load_images(str(root))
    assert "skipped 1 file " in caplog.text and "stray.png (not in a class folder)" in caplog.text


def test_one_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"single class \('only'\).*one subfolder per class.*at least two classes"):
        load_images(str(folder(tmp_path / "f", {"only": 5})))


def test_empty_folder_and_folder_without_subfolders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert not is_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"image folder .*empty has no subfolders.*one subfolder per class"):
        load_images(str(tmp_path / "empty"))
    save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match=r"flat has no subfolders"):
        load_images(str(tmp_path / "flat"))
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "x.txt").write_text("x")
    (tmp_path / "noimages" / "b").mkdir()
    with pytest.raises(ValueError, match=r"noimages has no image files"):
        load_images(str(tmp_path / "noimages"))


def test_a_class_folder_with_only_broken_files_is_refused(tmp_path):
    root = folder(tmp_path / "f", {"a": 3})
    truncated(root / "b" / "1.png", "PNG")
    (root / "b" / "2.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ValueError, match=r"class folder .*/f/b has no readable image \(2 unreadable\)"):
        load_images(str(root))
    (root / "c").mkdir()
    for f in (root / "b").iterdir():
        f.unlink()
    (root / "b").rmdir()
    save(root / "b" / "ok.png")
    with pytest.raises(ValueError, match=r"class folder .*/f/c has no image files; add images"):
        load_images(str(root))


def test_the_loader_writes_nothing(tmp_path):
    root = folder(tmp_path / "f", {"a": 3, "b": 3})
    truncated(root / "a" / "cut.png", "PNG")
    before = sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*"))
    load_images(str(root))
    assert sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")) == before


def test_other_paths_are_left_to_the_text_loaders(tmp_path):
    assert load_images("not-a-folder.csv") is None
    assert load_images("rotten_tomatoes") is None
    (tmp_path / "rows.csv").write_text("text,label\n")
    assert load_images(str(tmp_path / "rows.csv")) is None
    hf = tmp_path / "saved"
    (hf / "train").mkdir(parents=True)
    (hf / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert load_images(str(hf)) is None and not is_image_folder(hf)
    assert not is_image_folder(tmp_path / "rows.csv") and not is_image_folder(tmp_path / "missing")


# decoding ------------------------------------------------------------------------------------------

def test_every_kind_of_image_decodes_to_rgb(tmp_path):
    root = tmp_path / "kinds"
    grey16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    palette = Image.new("RGB", (9, 9), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    rgba = Image.new("RGBA", (5, 5), (255, 0, 0, 0))  # fully transparent red: white once laid on white
    files = {
        "colour/a.png": Image.new("RGB", (32, 32), (10, 200, 30)),
        "colour/b.jpg": Image.new("RGB", (64, 48), (10, 200, 30)),
        "colour/c.JPEG": Image.new("RGB", (3, 100), (10, 200, 30)),
        "colour/d.bmp": Image.new("RGB", (7, 7), (10, 200, 30)),
        "colour/e.gif": Image.new("RGB", (7, 7), (10, 200, 30)).convert("P"),
        "colour/f.webp": Image.new("RGB", (7, 7), (10, 200, 30)),
        "colour/g.tif": Image.new("RGB", (7, 7), (10, 200, 30)),
        "grey/a.png": Image.new("L", (20, 10), 128),
        "grey/b.jpg": Image.new("L", (20, 10), 128),
        "grey/c.png": grey16,
        "grey/d.png": Image.new("1", (8, 8), 1),
        "other/a.png": rgba,
        "other/b.png": palette,
        "other/c.png": Image.new("LA", (4, 4), (50, 255)),
    }
    for name, image in files.items():
        save(root / name, image)
    data = load_images(str(root))
    assert sum(data.sizes().values()) == len(files)
    seen = {}
    for e in data.train + data.validation + data.test:
        image = open_image(e)
        assert image.mode == "RGB"
        seen[e["image"].split("kinds/")[1]] = image
    assert seen.keys() == files.keys()
    for name, image in seen.items():
        assert image.size == files[name].size, name
    assert seen["other/a.png"].getpixel((0, 0)) == (255, 255, 255)
    assert seen["other/b.png"].getpixel((4, 4)) == (0, 0, 255)
    assert seen["other/c.png"].getpixel((0, 0)) == (50, 50, 50)
    assert seen["grey/a.png"].getpixel((0, 0)) == (128, 128, 128)
    # 16 bits scaled, not clipped: the brightest pixel (59,950 of 65,535) is 233 of 255, not 255
    assert seen["grey/c.png"].getextrema() == ((0, 233),) * 3
    assert seen["grey/d.png"].getpixel((0, 0)) == (255, 255, 255)


def test_open_image_takes_bytes_and_pil_images_and_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2), (1, 2, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif)
    assert open_image({"image": str(path), "label": 0}).size == (2, 4)
    assert open_image({"image": path.read_bytes(), "label": 0}).size == (2, 4)
    grey = Image.new("L", (3, 3), 9)
    assert open_image({"image": grey, "label": 0}).getpixel((1, 1)) == (9, 9, 9)
    rgb = Image.new("RGB", (3, 3))
    assert open_image({"image": rgb, "label": 0}) is not rgb


def test_32_bit_and_float_images_are_scaled(tmp_path):
    from replora.training.images import to_rgb

    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.full((2, 2), 200, np.int32))).getpixel((0, 0)) == (200, 200, 200)
    wide = to_rgb(Image.fromarray(np.array([[-5, 5]], np.int32)))
    assert wide.getpixel((0, 0)) == (0, 0, 0) and wide.getpixel((1, 0)) == (255, 255, 255)


# CIFAR-10 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar():
    return load_images("cifar10")


def test_cifar10_split_sizes_and_names(cifar):
    assert cifar.name == "cifar10" and cifar.kind == "classification"
    assert cifar.label_names == list(CIFAR10_CLASSES) == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                           "frog", "horse", "ship", "truck"]
    assert cifar.sizes() == {"train": 800, "validation": 200, "test": 9000}
    for split, n in (("train", 80), ("validation", 20), ("test", 900)):
        assert Counter(e["label"] for e in getattr(cifar, split)) == {label: n for label in range(10)}, split


def test_cifar10_images_are_32x32_rgb_and_distinct_across_splits(cifar):
    for e in cifar.train[:50] + cifar.validation[:20] + cifar.test[:50]:
        image = open_image(e)
        assert image.mode == "RGB" and image.size == (32, 32)
    splits = [{e["image"] for e in split} for split in (cifar.train, cifar.validation, cifar.test)]
    assert [len(s) for s in splits] == [800, 200, 9000]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


def test_cifar10_split_is_the_same_on_every_call(cifar):
    again = load_images("cifar10")
    for split in ("train", "validation", "test"):
        assert getattr(again, split) == getattr(cifar, split), split


# research/make_digits_folder.py --------------------------------------------------------------------

def test_digits_folder_script_writes_a_loadable_folder(tmp_path):
    pytest.importorskip("sklearn")
    from research.make_digits_folder import write_digits_folder

    assert write_digits_folder(tmp_path / "digits", n_per_class=3) == 30
    data = load_images(str(tmp_path / "digits"))
    assert data.label_names == [str(d) for d in range(10)] and sum(data.sizes().values()) == 30
    image = Image.open(data.train[0]["image"])
    assert image.mode == "L" and image.size == (8, 8) and image.getextrema()[1] > 200
    with pytest.raises(FileExistsError, match="not empty"):
        write_digits_folder(tmp_path / "digits")
