"""An identity bank on disk: step files of a bank kept on disk, saved bank files, and reading tensors back.

Both are safetensors files whose tensors are named by `bank_format.tensor_prefix` ("/h" tokens, "/s" an
fp8 scale). A bank kept on disk writes one file per finished step; Save Identity Bank merges them into one
file a tensor at a time (`merge_safetensors`), so a bank never has to fit in memory, and a read opens a file
memory-mapped and reads only the tensors of the step it needs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import tempfile
import weakref

import torch

from ..common.files import atomic_path
from .bank_format import FORMAT, OLD_FORMATS, SAFETENSORS_DTYPES, BankError, decode, tensor_prefix


class SpillFolder:
    """The folder of step files of one bank kept on disk, owned by its writer and then by the bank it commits to.

    `remove()` deletes it (a cleared, rewritten or discarded bank); dropping the owner without that (a widget
    change makes a new bank, ComfyUI evicts its cache) deletes it too, through weakref.finalize rather than
    __del__: a finalizer runs once, at collection or at interpreter exit, and needs no reference to the bank."""

    def __init__(self, parent: str):
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="bank-", dir=parent)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def step_file(self, step: int) -> str:
        return os.path.join(self.path, f"step{step:04d}.safetensors")

    def remove(self):
        self._finalizer()


def entry_tensors(entries: dict) -> dict:
    """{tensor name: tensor} of in-memory entries, as a bank file names them."""
    tensors = {}
    for key, (stored, scale) in entries.items():
        prefix = tensor_prefix(key)
        tensors[prefix + "/h"] = stored.detach().to("cpu").contiguous()
        if scale is not None:
            tensors[prefix + "/s"] = scale.detach().to("cpu").contiguous()
    return tensors


def write_step_file(path: str, entries: dict):
    """One finished step of a bank kept on disk."""
    from safetensors.torch import save_file

    save_file(entry_tensors(entries), path)


def save_bank_file(path: str, metadata: dict, entries: dict, sources: list):
    """A saved bank, written atomically: the in-memory `entries`, or the tensors of `sources` ((prefix, file)
    pairs of step files) streamed into one file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        if sources:
            merge_safetensors(tmp, sources, metadata)
        else:
            save_file(entry_tensors(entries), tmp, metadata=metadata)


def copy_bank_file(source: str, path: str):
    """A loaded bank saves as a copy of its file (atomically)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def merge_safetensors(path: str, sources: list, metadata: dict):
    """Write one .safetensors file holding the tensors `prefix/h` (and `prefix/s`) of every (prefix, file) in
    `sources`, reading one tensor at a time: the safetensors layout (8-byte little-endian header length, JSON
    header with dtype, shape and byte offsets, then the bytes), so the bank never has to fit in memory."""
    from safetensors import safe_open

    by_file: dict = {}
    for prefix, file in sources:
        by_file.setdefault(file, []).append(prefix)
    plan, offset = [], 0  # (name, file, dtype, shape, begin, end), file by file
    for file in sorted(by_file):
        with safe_open(file, framework="pt", device="cpu") as f:
            names = set(f.keys())
            for prefix in sorted(by_file[file]):
                for name in (prefix + "/h", prefix + "/s"):
                    if name in names:
                        piece = f.get_slice(name)
                        dtype, shape = piece.get_dtype(), list(piece.get_shape())
                        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
                        plan.append((name, file, dtype, shape, offset, offset + size))
                        offset += size
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
              for name, _, dtype, shape, begin, end in plan}
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for file, items in itertools.groupby(plan, key=lambda item: item[1]):  # the plan is file by file
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, *_ in items:
                    out.write(f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_bank_file(path: str) -> tuple[dict, list]:
    """(header, tensor names) of a saved bank; a BankError says what is wrong with any other file."""
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: safetensors raises several error types)
        raise BankError(f"cannot read identity bank {name}: the file is damaged or not a safetensors file "
                        f"({type(e).__name__}). Save the bank again with 'Save Identity Bank (StoryDiffusion)'.") from None
    if meta.get("format") in OLD_FORMATS:
        raise BankError(f"{name} was saved by an earlier version of this pack (it stores projected keys/values); "
                        "re-create it: run the identity panels through 'Identity Bank Write (StoryDiffusion)' "
                        "and save the bank again")
    if meta.get("format") != FORMAT:
        raise BankError(f"{name} is not a StoryDiffusion identity bank (its metadata has no format {FORMAT!r}); "
                        "save banks with 'Save Identity Bank (StoryDiffusion)'")
    try:
        return json.loads(meta["bank"]), names
    except (KeyError, ValueError, TypeError) as e:
        raise BankError(f"identity bank {name} is damaged ({e}): save the bank again") from None


def read_tensors(by_file: dict, dtype: torch.dtype, device) -> dict:
    """{key: decoded tokens} for `by_file` = {file: [(key, tensor prefix), ...]}; each file is memory-mapped and
    only these tensors are read."""
    from safetensors import safe_open

    loaded = {}
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            names = set(f.keys())
            for key, prefix in items:
                scale = f.get_tensor(prefix + "/s") if prefix + "/s" in names else None
                loaded[key] = decode(f.get_tensor(prefix + "/h"), scale, dtype).to(device)
    return loaded


def looks_like_bank_file(path: str) -> bool:
    """False only for a readable .safetensors that is not a bank (e.g. a motion predictor sharing the
    models/storydiffusion folder), so loader lists stay short; unreadable files and banks of an older
    format stay listed, and the load explains what is wrong with them."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") in (FORMAT, *OLD_FORMATS)
    except Exception:  # noqa: BLE001 (whatever makes a file unreadable, it stays listed: see above)
        return True
