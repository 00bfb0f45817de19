"""Writing files the way ComfyUI users expect: whole or not at all, with the mode the umask gives.

`atomic_path(path)` hands out a temporary name next to `path`; when the block ends without an error
the file is renamed into place (an interrupted or failed write never leaves a partial file), and its
mode is what a plain `open(path, "w")` would give under the process umask (mkstemp's 0600 is not).
"""
from __future__ import annotations

import contextlib
import os
import tempfile


def umask_mode(base: int = 0o666) -> int:
    """`base` with the process umask applied (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_path(path: str):
    """with atomic_path(p) as tmp: write tmp  ->  tmp becomes p (mode 0666 & ~umask) only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] + ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
