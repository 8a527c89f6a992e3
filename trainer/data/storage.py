"""Locations: a local path or a URI of a pyarrow filesystem (s3://bucket/key, gs://..., hdfs://...),
or else of an installed fsspec implementation (memory://, az://, ...).

A location is a `Path` when it is local (plain paths and file:// URIs) and the URI string otherwise,
so local code keeps its paths. Query parameters of a URI configure its filesystem
(s3://bucket/run?endpoint_override=host:port&scheme=http) and travel with every joined location.

Writes are atomic: locally a temporary file and a rename; on an object store one PUT, which
becomes visible only once complete, so a reader never sees half an object.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fitting.errors import BadInput

Location = Union[str, Path]


def is_uri(value: str | os.PathLike) -> bool:
    """True for a URI of a remote filesystem (not for plain paths nor file://)."""
    text = str(value)
    return "://" in text and not text.startswith("file://")


def location(value: str | os.PathLike) -> Location:
    """`value` as a location: a Path when local, else the URI string without a trailing slash."""
    text = os.fspath(value)
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    if not is_uri(text):
        return Path(text)
    parts = urlsplit(text)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def join(base: str | os.PathLike, *parts: str) -> Location:
    """base/part/...; a URI keeps its query string at the end."""
    base = location(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    split = urlsplit(base)
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def basename(value: str | os.PathLike) -> str:
    value = location(value)
    return value.name if isinstance(value, Path) else posixpath.basename(urlsplit(value).path)


@lru_cache(maxsize=64)
def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    # building a filesystem costs tens of milliseconds (an S3 client): once per bucket
    try:
        return pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, OSError) as exc:
        arrow_error = exc
    try:  # a scheme that pyarrow lacks but an fsspec implementation provides (memory://, az://, ...)
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(root)
        return PyFileSystem(FSSpecHandler(fs)), path
    except (ImportError, ValueError, OSError) as exc:
        reason = " ".join(f"{arrow_error}; {exc}".split())[:200]
        raise BadInput(f"unsupported location {root}: {reason}") from exc


def resolve(value: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location and the path inside it."""
    value = location(value)
    if isinstance(value, Path):
        return pafs.LocalFileSystem(), os.path.abspath(value)
    split = urlsplit(value)
    fs, root = _filesystem(urlunsplit(split._replace(path="")))
    inner = split.path.lstrip("/")
    if not inner:
        return fs, root
    return fs, posixpath.join(root, inner) if root else "/" + inner


def resolve_all(values: list[Location]) -> tuple[pafs.FileSystem | None, list[str]]:
    """Paths for readers that take one filesystem (Ray Data): None and the plain paths when local."""
    if not values or not is_uri(values[0]):
        return None, [str(v) for v in values]
    resolved = [resolve(v) for v in values]
    return resolved[0][0], [p for _, p in resolved]


def _info(value: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(value)
    return fs.get_file_info(path)


def exists(value: str | os.PathLike) -> bool:
    return _info(value).type != pafs.FileType.NotFound


def is_file(value: str | os.PathLike) -> bool:
    return _info(value).type == pafs.FileType.File


def is_dir(value: str | os.PathLike) -> bool:
    """A folder; on an object store, a prefix that holds objects."""
    return _info(value).type == pafs.FileType.Directory


def list_dir(directory: str | os.PathLike, kind: str = "file") -> list[Location]:
    """The files (or folders, kind="dir") directly inside `directory`, hidden names left out, sorted
    by name; empty when it does not exist."""
    directory = location(directory)
    fs, path = resolve(directory)
    wanted = pafs.FileType.File if kind == "file" else pafs.FileType.Directory
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == wanted and not i.base_name.startswith("."))
    return [join(directory, name) for name in names]


def read_bytes(value: str | os.PathLike) -> bytes:
    fs, path = resolve(value)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise BadInput(f"not found: {value}") from exc


def read_text(value: str | os.PathLike) -> str:
    return read_bytes(value).decode("utf-8")


@contextmanager
def atomic_local(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside `path` to write; it replaces `path` only if the block ends
    without error, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(value: str | os.PathLike, data: bytes | pa.Buffer) -> None:
    """Atomic write: a local temporary file and a rename, or a single object PUT."""
    value = location(value)
    if isinstance(value, Path):
        with atomic_local(value) as tmp:
            tmp.write_bytes(data)
        return
    # all bytes in hand before the stream opens: closing a stream, even on an error, completes the PUT
    buffer = pa.py_buffer(data)
    fs, path = resolve(value)
    with fs.open_output_stream(path) as f:
        f.write(buffer)


def write_text(value: str | os.PathLike, text: str) -> None:
    write_bytes(value, text.encode("utf-8"))


def delete(value: str | os.PathLike) -> None:
    """Remove a file if it exists."""
    fs, path = resolve(value)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(value: str | os.PathLike) -> None:
    """Remove a folder (or every object under a prefix) if it exists."""
    fs, path = resolve(value)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload(local: str | os.PathLike, value: str | os.PathLike) -> None:
    """Copy a local file to a location (atomically, as write_bytes)."""
    target = location(value)
    if isinstance(target, Path) and Path(local).resolve() == target.resolve():
        return
    if isinstance(target, Path):
        write_bytes(target, Path(local).read_bytes())
        return
    fs, path = resolve(target)
    pafs.copy_files(os.path.abspath(local), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(value: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy a location to a local file through a temporary file and a rename."""
    local = Path(local)
    fs, path = resolve(value)
    try:
        with atomic_local(local) as tmp:
            pafs.copy_files(path, str(tmp.resolve()), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except FileNotFoundError as exc:
        raise BadInput(f"not found: {value}") from exc
    return local


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "spin-pipeline"


def local_copy(value: str | os.PathLike) -> Path:
    """A local path to read `value` from: itself when local, else a cached download (keyed by the
    URI, size and modification time, so a rewritten object is fetched again)."""
    value = location(value)
    if isinstance(value, Path):
        return value
    info = _info(value)
    if info.type != pafs.FileType.File:
        raise BadInput(f"not found: {value}")
    key = hashlib.sha1(f"{value}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "downloads" / key / basename(value)
    return target if target.is_file() else download(value, target)


def staging_dir(value: str | os.PathLike) -> Path:
    """A stable local folder standing in for a remote folder (the same one on every call)."""
    value = location(value)
    if isinstance(value, Path):
        return value
    return cache_dir() / "staging" / hashlib.sha1(str(value).encode()).hexdigest()[:16] / basename(value)


def read_parquet(value: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    value = location(value)
    if isinstance(value, Path):
        return pq.read_table(value, columns=columns)
    fs, path = resolve(value)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_parquet(table: pa.Table, value: str | os.PathLike) -> None:
    """Atomic: locally a temporary file and a rename; remotely serialized in memory, then one PUT."""
    value = location(value)
    if isinstance(value, Path):
        with atomic_local(value) as tmp:
            pq.write_table(table, tmp)
        return
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(value, sink.getvalue())


def parquet_metadata(value: str | os.PathLike) -> pq.FileMetaData:
    fs, path = resolve(value)
    return pq.read_metadata(path, filesystem=fs)
