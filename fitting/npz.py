"""Reading .npz files that a user passes, without trusting them.

An .npz is a zip of .npy members. `np.load` allocates whatever shape a member's header declares
before it reads a byte of data, and a reader that walks `data.files` decompresses every member.
`read_npz` reads each wanted member's header first and refuses one that declares Python objects,
more bytes than the member holds, or more than `max_bytes`; members it is not asked for are never
decompressed. `read_npy` reads a single .npy file the same way.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
from numpy.lib import format as npy

from fitting.errors import BadInput

_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
_CHUNK = 1 << 24  # bytes per read: a member is never held twice in memory


def memory_bytes() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _array(stream: BinaryIO, held: int, where: str, max_bytes: int) -> np.ndarray:
    """The .npy array in `stream`, which holds `held` bytes: its header is read and checked before
    anything is allocated."""
    start = stream.tell()
    try:
        version = npy.read_magic(stream)
        shape, fortran_order, dtype = _HEADER_READERS[version](stream)
    except (ValueError, KeyError) as exc:
        raise BadInput(f"{where} is not an .npy array ({' '.join(str(exc).split())[:120]})") from None
    if dtype.hasobject:
        raise BadInput(f"{where} holds Python objects; only plain arrays are read")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held -= stream.tell() - start
    if declared != held:
        raise BadInput(f"{where} declares {shape} {dtype} ({declared} bytes) but holds {held} bytes")
    if declared > max_bytes:
        raise BadInput(f"{where} declares {declared} bytes, more than the {max_bytes} allowed")
    raw = np.empty(declared, dtype=np.uint8)
    view, read = memoryview(raw), 0
    while read < declared:
        chunk = stream.read(min(_CHUNK, declared - read))
        if not chunk:
            break
        view[read:read + len(chunk)] = chunk
        read += len(chunk)
    if read != declared:
        raise BadInput(f"{where} ended after {read} of {declared} bytes")
    return raw.view(dtype).reshape(shape, order="F" if fortran_order else "C")


def _limit(max_bytes: int | None) -> int:
    return memory_bytes() // 2 if max_bytes is None else int(max_bytes)


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, max_bytes: int) -> np.ndarray:
    with archive.open(info) as stream:
        return _array(stream, info.file_size, f"{where}: '{info.filename[:-len('.npy')]}'", max_bytes)


def read_npy(path: str | os.PathLike, what: str = ".npy file", max_bytes: int | None = None) -> np.ndarray:
    """The array of a user's .npy file, with read_npz's checks (objects, declared size, limit)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}")
    try:
        with path.open("rb") as stream:
            return _array(stream, path.stat().st_size, str(path), _limit(max_bytes))
    except OSError as exc:
        raise BadInput(f"{path}: not a readable {what} ({' '.join(str(exc).split())[:160]})") from None


def read_npz(path: str | os.PathLike, keys: Iterable[str] | None = None, what: str = ".npz file",
             max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of `path` named in `keys` (every member when None) that the file has.

    BadInput (one line, naming `what`) for a missing or unreadable file, a member that holds
    Python objects, or one whose header declares another size than it holds or more than
    `max_bytes` (default: half this machine's memory)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}")
    limit = _limit(max_bytes)
    wanted = None if keys is None else set(keys)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.endswith(".npy") and not i.is_dir()]
            return {i.filename[:-4]: _member(archive, i, str(path), limit)
                    for i in members if wanted is None or i.filename[:-4] in wanted}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as exc:
        raise BadInput(f"{path}: not a readable {what} ({' '.join(str(exc).split())[:160]})") from None
