"""Writing files atomically: what replora writes (adapters, checkpoints, run files, caches, GGUF) appears
whole or not at all, and what was there before stays intact until the new version is complete."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _sync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary file beside `path` (a unique name: concurrent writers do not collide),
    then replace `path` with it in one step. On any error the temporary file is removed and `path` is
    left as it was."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created by `write` as any file is (so the umask applies: mkstemp's would be private to the owner).
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove what write_file and write_folder left in `folder` when a process was killed while writing."""
    for stale in Path(folder).glob(".*.tmp*"):  # write_file's `.<name>.<pid>-<hex>.tmp`, write_folder's `.<name>.tmp-*`
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path.write_text(text)`, atomically (write_file)."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary folder beside `path`, then publish it: a new folder appears whole or
    not at all; in an existing folder each file written is replaced atomically and others are left alone."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save to {path}: it exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        tmp = Path(tmp)
        write(tmp)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        for f in files:
            _sync(f)
        if not path.exists():
            os.rename(tmp, path)  # the folder appears complete, in one step
            os.makedirs(tmp)  # left for the context manager to remove
        else:
            for f in files:
                dest = path / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    return path
