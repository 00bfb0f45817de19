"""Writing output files atomically, with the permissions any new file gets (plain Python).

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, so a file written to a
temporary name and renamed into place would stay private to the ComfyUI user, unlike the PNGs
ComfyUI writes (0644 under the usual umask 022). These helpers create the temporary file with
`os.open(..., 0o666)`, so the process umask applies exactly as for a plain `open(path, "w")`.

    with atomic_path("out/story.mp4") as temporary:   # write `temporary` by name (PyAV, safetensors...)
        encode_into(temporary)
    # renamed onto out/story.mp4 when the block ends without an exception; removed otherwise

`temporary_beside(path)` alone gives the temporary file for callers that handle the rename themselves.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def temporary_beside(path: str, suffix: str = ".partial") -> str:
    """Create an empty hidden file next to `path` (same folder, so os.replace is atomic) with the mode
    0o666 & ~umask, and return its path. The folder is created if missing; OSError if it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for _ in range(100):
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(temporary, _FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temporary
    raise FileExistsError(f"could not create a temporary file next to {path!r}")


def new_file_mode() -> int:
    """0o666 with the process umask applied: the mode `open(path, "w")` gives a new file.

    Linux tells the umask in /proc (no change, safe beside other threads); elsewhere it is set and
    restored at once."""
    try:
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".partial") -> Iterator[str]:
    """Yield a temporary file name next to `path`; on success it is renamed onto `path` (os.replace),
    on any exception it is removed and the exception propagates: `path` is whole or untouched."""
    temporary = temporary_beside(path, suffix)
    try:
        yield temporary
        os.chmod(temporary, new_file_mode())  # writers that recreate the file (safetensors: 0600) get it back
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
