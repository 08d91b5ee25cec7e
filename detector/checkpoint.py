"""Atomic checkpoints of per-stream state: write, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never half of one, even across a power cut.
A checkpoint that cannot be read is moved aside (``*.corrupt-<time>``) so the daemon
starts fresh and the evidence is kept.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np


def state_dir_problem(path: Path) -> str | None:
    """Why the state directory ``path`` can never be created, without creating it (for
    ``check-config``): it, or its nearest existing ancestor, is a file. Permissions are
    not judged: check-config may run as another user than the service (and systemd's
    ``StateDirectory=`` creates the folder at start); the daemon says so at start."""
    p = Path(path).absolute()
    if p.exists():
        return None if p.is_dir() else "exists and is not a directory"
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    return None


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` or leave it as it was: an ``OSError`` (disk full,
    read-only or unwritable folder) leaves the old file intact and no temporary file
    behind (it would hold the space a full disk needs back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(arrays, None); (None, None) when there is no checkpoint; (None, problem) when it
    was unreadable and has been moved aside."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        return None, f"unreadable checkpoint moved to {aside.name}: {err}"
