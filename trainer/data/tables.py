"""The one schema module for every table on disk: samples shards, best-fit tables and quarantine
tables. Every reader and writer goes through here.

Array columns are stored as flat lists of float32 (parquet round-trips nulls in those, not in
fixed-size lists); `to_numpy` restores and checks their shapes from ARRAY_SHAPES.
Keypoints are in SPIN's normalized crop coordinates: x, y in [-1, 1] across the stored square crop,
then a confidence (0 where absent).
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from fitting.errors import BadInput
from fitting.keypoints import NUM_KEYPOINTS
from trainer.data import storage


def _fixed(n: int) -> pa.DataType:
    return pa.list_(pa.float32())


# column -> shape of one row's value, for the array columns
ARRAY_SHAPES: dict[str, tuple[int, ...]] = {
    "center": (2,),
    "keypoints": (NUM_KEYPOINTS, 3),
    "pose": (72,),
    "betas": (10,),
    "joints3d": (24, 4),
    "cam_t": (3,),
    "joint_loss": (NUM_KEYPOINTS,),
}
ARRAY_COLUMNS = frozenset(ARRAY_SHAPES)

SAMPLES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("imgname", pa.string()),        # the image as its source names it (relative to its root)
    pa.field("source_row", pa.int64()),      # the person's row in the source file (SPIN's row order)
    pa.field("protocol", pa.string()),       # evaluation protocol (trainer.data.protocols); null: from the dataset
    pa.field("gender", pa.string()),         # 'm' / 'f' where the source says (3DPW), else null
    pa.field("image", pa.binary()),          # encoded square crop (JPEG/PNG); null when image_uri is set
    pa.field("image_uri", pa.string()),      # alternative to bytes
    pa.field("center", _fixed(2)),           # crop centre in the source image, pixels
    pa.field("scale", pa.float32()),         # crop side / 200 in the source image (SPIN's scale)
    pa.field("keypoints", _fixed(NUM_KEYPOINTS * 3), nullable=False),
    pa.field("has_smpl", pa.bool_()),
    pa.field("pose", _fixed(72)),            # ground truth, null when absent
    pa.field("betas", _fixed(10)),
    pa.field("joints3d", _fixed(24 * 4)),    # 24 ground-truth joints in metres + confidence
    pa.field("mask", pa.binary()),           # encoded PNG foreground mask (evaluation sets)
    pa.field("part_mask", pa.binary()),      # encoded PNG 6-part segmentation (UP-3D's labels), 0 = background
])
# Masks are of the stored crop, except for datasets whose protocol scores segmentation on the full
# original image (SPIN's LSP): there they are the source's full-image PNGs, as they came.

FITS_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("pose", _fixed(72), nullable=False),
    pa.field("betas", _fixed(10), nullable=False),
    pa.field("cam_t", _fixed(3), nullable=False),
    pa.field("loss", pa.float32(), nullable=False),
    pa.field("joint_loss", _fixed(NUM_KEYPOINTS), nullable=False),
    pa.field("valid", pa.bool_(), nullable=False),
    pa.field("betas_ok", pa.bool_(), nullable=False),
    pa.field("found_in_round", pa.int32(), nullable=False),
    pa.field("init", pa.string(), nullable=False),   # mean | network | gt
    pa.field("iterations", pa.int32(), nullable=False),
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string()),
    pa.field("source", pa.string()),   # the image, shard, file or step it came from
    pa.field("reason", pa.string(), nullable=False),
])

INIT_KINDS = ("mean", "network", "gt")
# numpy type of each fits column (the array columns' shapes are in ARRAY_SHAPES)
_FITS_DTYPES = {"sample_id": object, "pose": np.float32, "betas": np.float32, "cam_t": np.float32,
                "loss": np.float32, "joint_loss": np.float32, "valid": bool, "betas_ok": bool,
                "found_in_round": np.int32, "init": object, "iterations": np.int32}


def _nulls(n: int, type_: pa.DataType) -> pa.Array:
    # pa.nulls() gives fixed-size lists an empty child array that parquet cannot read back
    return pa.array([None] * n, type=type_)


def _column_array(values, field: pa.Field, n: int) -> pa.Array:
    if values is None:
        return _nulls(n, field.type)
    if field.name in ARRAY_COLUMNS:
        size = int(np.prod(ARRAY_SHAPES[field.name]))
        if isinstance(values, np.ndarray) and values.dtype != object:
            flat = np.ascontiguousarray(values, dtype=np.float32).reshape(n * size)
            offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        rows = [None if v is None else np.asarray(v, dtype=np.float32).reshape(size).tolist() for v in values]
        return pa.array(rows, type=field.type)
    if isinstance(values, np.ndarray):
        values = values.tolist()
    return pa.array(values, type=field.type)


def make_table(columns: dict[str, object], schema: pa.Schema) -> pa.Table:
    """Build a table of `schema` from numpy arrays or lists; missing nullable columns are null."""
    n = len(columns["sample_id"])
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise BadInput(f"unknown columns {sorted(unknown)}")
    arrays = []
    for field in schema:
        values = columns.get(field.name)
        if values is None and not field.nullable:
            raise BadInput(f"column '{field.name}' is required")
        arrays.append(_column_array(values, field, n))
    return pa.Table.from_arrays(arrays, schema=schema)


def fits_columns(sample_id: Sequence[str], **columns: Any) -> dict[str, np.ndarray]:
    """The columns of n fits, in FITS_SCHEMA's order, each a new numpy array of the schema's type:
    pose (n, 72), betas (n, 10), cam_t (n, 3), loss (n,), joint_loss (n, 49), valid (n,),
    betas_ok (n,), found_in_round (n,), init (n,) of INIT_KINDS, iterations (n,). A value given
    for one row (a round, an init kind, a constant) stands for every row."""
    expected = set(FITS_SCHEMA.names) - {"sample_id"}
    if set(columns) != expected:
        raise BadInput(f"fits columns: missing {sorted(expected - set(columns))}, unknown {sorted(set(columns) - expected)}")
    n = len(sample_id)
    out = {"sample_id": np.asarray(list(sample_id), dtype=object)}
    for name in FITS_SCHEMA.names[1:]:
        shape = (n, *ARRAY_SHAPES.get(name, ()))
        out[name] = np.broadcast_to(np.asarray(columns[name], dtype=_FITS_DTYPES[name]), shape).copy()
    return out


def fits_table(sample_id: Sequence[str], **columns: Any) -> pa.Table:
    """A fits table (FITS_SCHEMA) from the columns of `fits_columns`."""
    return make_table(fits_columns(sample_id, **columns), FITS_SCHEMA)


def to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """Column `name` as numpy with its row shape restored; null rows of array columns are NaN.
    Raises BadInput when a row's array has the wrong number of values."""
    column = table.column(name).combine_chunks()
    if name not in ARRAY_COLUMNS:
        return column.to_numpy(zero_copy_only=False)
    shape = ARRAY_SHAPES[name]
    size = int(np.prod(shape))
    if column.null_count:
        column = column.fill_null(pa.scalar([np.nan] * size, type=column.type))
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and not np.all(lengths == size):
        bad = int(np.argmax(lengths != size))
        raise BadInput(f"column '{name}' row {bad} has {lengths[bad]} values, expected {size} {shape}")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(table), *shape)


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write atomically (a temporary file and a rename, or one object PUT for a URI), so that a
    reader never mistakes a half-written file for a finished one."""
    storage.write_parquet(table, path)


def read_table(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    """Read one parquet file (a path or a URI), with a one-line BadInput for a missing, corrupt
    or foreign file."""
    path = storage.location(path)
    if not storage.exists(path):
        raise BadInput(f"table not found: {path}")
    try:
        table = storage.read_parquet(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise BadInput(f"{path}: corrupt parquet file ({' '.join(str(exc).split())[:200]})") from exc
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names and not schema.field(n).nullable]
        if missing:
            raise BadInput(f"{path}: missing columns {missing}")
        table = conform(table, schema)
    return table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Add missing nullable columns as nulls and order columns as the schema does."""
    n = len(table)
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            cols.append(col.cast(field.type) if col.type != field.type else col)
        else:
            cols.append(_nulls(n, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


# A shard's file name: part-00000.parquet, or <dataset>-part-00000.parquet where several datasets
# share a folder. Readers take only files named so: a quarantine table or anything else beside
# the shards is never read as samples.
SHARD_NAME = re.compile(r"^(?:(?P<dataset>.+)-)?part-(?P<index>[0-9]+)\.parquet$")


def shard_name(index: int, dataset: str | None = None) -> str:
    """The file name of shard `index` (of `dataset`, when a folder holds several)."""
    return f"{dataset}-part-{index:05d}.parquet" if dataset else f"part-{index:05d}.parquet"


def is_shard(name: str) -> bool:
    return SHARD_NAME.match(name) is not None


def shard_paths(directory: str | os.PathLike, split: str | None = None) -> list[storage.Location]:
    """The finished parquet shards of a samples directory, sorted: Paths for a local directory,
    URIs for a remote one. Only shard names count (`SHARD_NAME`); temporary files, quarantine
    tables and sub-folders are not shards.

    With `split`, the shards of DIR/split/ (a data root holds train/ and test/)."""
    directory = storage.location(directory)
    if split is not None and storage.is_dir(storage.join(directory, split)):
        directory = storage.join(directory, split)
    if not storage.is_dir(directory):
        raise BadInput(f"data directory not found: {directory}")
    paths = [p for p in storage.list_dir(directory) if is_shard(storage.basename(p))]
    if not paths:
        raise BadInput(f"no parquet shards in {directory}")
    return paths


def read_split(directory: str | os.PathLike, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All sample shards of DIR/split (or DIR, see `shard_paths`) as one SAMPLES_SCHEMA table;
    with `columns`, only those."""
    table = concat([read_table(p, SAMPLES_SCHEMA) for p in shard_paths(directory, split)], SAMPLES_SCHEMA)
    return table.select(columns) if columns else table


def write_shards(table: pa.Table, directory: str | os.PathLike, shard_size: int,
                 dataset: str | None = None) -> list[storage.Location]:
    """Split `table` into shards of at most `shard_size` rows named by `shard_name`."""
    paths = []
    for index, start in enumerate(range(0, max(len(table), 1), shard_size)):
        path = storage.join(directory, shard_name(index, dataset))
        write_table(table.slice(start, shard_size), path)
        paths.append(path)
    return paths


def concat(tables: Iterable[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [conform(t, schema) for t in tables]
    return pa.concat_tables(tables) if tables else schema.empty_table()
