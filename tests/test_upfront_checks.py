"""Everything that can be checked before the work is checked before the work: the run config, the
body model and the prior, the shards' schemas and pages, and .npz files that lie about their
arrays. Each is one line on stderr and exit code 2, before a Ray session starts."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main

FAST = {"stages": [{"name": "camera", "iterations": 2}, {"name": "body", "iterations": 2}]}


@pytest.fixture(scope="module")
def samples(tiny_benchmark, tmp_path_factory) -> Path:
    """Two train shards of 16 rows each."""
    root = tmp_path_factory.mktemp("samples")
    (root / "train").mkdir()
    table = pq.read_table(sorted((tiny_benchmark / "train").glob("*.parquet"))).slice(0, 32)
    for i in range(2):
        pq.write_table(table.slice(16 * i, 16), root / "train" / f"part-{i:05d}.parquet")
    return root


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command reaches the point of starting (or joining) a Ray session."""
    import pipeline.ray_session

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray session was started before the input was found bad")

    monkeypatch.setattr(pipeline.ray_session, "ensure_ray", refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def write_config(path: Path, data: Path, **sections) -> Path:
    config = {"data": str(data), "train_preset": "tiny", "fit": {"batch_size": 8, "smplify": FAST}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------- body model and prior


def edited_copy(source: Path, path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """`source`'s arrays, changed in place by `change`, saved to `path`."""
    with np.load(source) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(path, **arrays)
    return path


def body_model_file(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    from fitting.body_model import builtin_body_model_path

    return edited_copy(builtin_body_model_path(), path, change)


def prior_file(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Path:
    from fitting.priors import builtin_prior_path

    return edited_copy(builtin_prior_path(), path, change)


def nan_extra_regressor(arrays):
    arrays["J_regressor_extra"] = arrays["J_regressor_extra"].copy()
    arrays["J_regressor_extra"][3, 10] = np.nan


def parent_out_of_range(arrays):
    arrays["kintree_table"] = arrays["kintree_table"].copy()
    arrays["kintree_table"][0, 5] = 40


def not_positive_definite(arrays):
    arrays["covars"] = arrays["covars"].copy()
    arrays["covars"][2] = -np.eye(arrays["covars"].shape[1])


# ---------------------------------------------------------------------------- shards


def rewrite_shard(samples: Path, dst: Path, index: int, change: Callable[[pa.Table], pa.Table]) -> Path:
    """A copy of the samples with shard `index` rewritten by `change`."""
    (dst / "train").mkdir(parents=True)
    for i, src in enumerate(sorted((samples / "train").glob("*.parquet"))):
        table = pq.read_table(src)
        pq.write_table(change(table) if i == index else table, dst / "train" / src.name)
    return dst


def corrupt_first_data_page(path: Path, column: str) -> None:
    """Overwrite the header of `column`'s first data page; the footer stays intact, so the file's
    metadata reads fine and only reading the column fails."""
    meta = pq.read_metadata(path)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(next(i for i, n in enumerate(names) if n.split(".")[0] == column))
    offset = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def bad_shards(kind: str, samples: Path, dst: Path) -> Path:
    if kind == "no sample_id":
        return rewrite_shard(samples, dst, 1, lambda t: t.drop_columns(["sample_id"]))
    if kind == "no keypoints":
        return rewrite_shard(samples, dst, 1, lambda t: t.drop_columns(["keypoints"]))
    if kind == "null sample_id":
        def null_first(t):
            ids = t.column("sample_id").to_pylist()
            return t.set_column(t.schema.get_field_index("sample_id"), "sample_id", pa.array([None] + ids[1:], pa.string()))
        return rewrite_shard(samples, dst, 1, null_first)
    if kind == "duplicate sample_id across shards":
        first = pq.read_table(sorted((samples / "train").glob("*.parquet"))[0]).column("sample_id")[0].as_py()
        def duplicate(t):
            ids = t.column("sample_id").to_pylist()
            return t.set_column(t.schema.get_field_index("sample_id"), "sample_id", pa.array([first] + ids[1:], pa.string()))
        return rewrite_shard(samples, dst, 1, duplicate)
    if kind == "shards with different columns":
        return rewrite_shard(samples, dst, 1, lambda t: t.append_column("extra", pa.array([1.0] * len(t))))
    if kind == "corrupt data page behind an intact footer":
        out = rewrite_shard(samples, dst, 1, lambda t: t)
        corrupt_first_data_page(out / "train" / "part-00001.parquet", "keypoints")
        return out
    raise ValueError(kind)


# ---------------------------------------------------------------------------- npz files that lie


def npy_declaring(shape: tuple[int, ...], dtype: str, payload: bytes = b"") -> bytes:
    """An .npy member whose header declares `shape` whatever bytes follow it."""
    from numpy.lib import format as npy

    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                        "shape": shape})
    return buffer.getvalue() + payload


def npz_with(path: Path, members: dict[str, bytes], compress: bool = True) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def spin_npz_members(n: int = 1) -> dict[str, bytes]:
    return {"center.npy": npy_declaring((n, 2), "<f8", np.zeros(2 * n).tobytes()),
            "scale.npy": npy_declaring((n,), "<f8", np.ones(n).tobytes())}


def undecodable_member(path: Path, name: str) -> None:
    """Corrupt the deflated bytes of one member (the zip directory stays valid): reading that member
    fails, listing the archive does not."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------- the cases

RUN_CONFIG_CASES = [
    pytest.param(["fit", "--round", "-1"], {}, "round", id="fit --round -1",
                 marks=pytest.mark.fault("`fit --round -1`", "one line, exit 2; nothing written")),
    pytest.param(["fit", "--round", "0"], {"fit": {"batch_size": 0}}, "batch_size", id="fit.batch_size 0",
                 marks=pytest.mark.fault("`fit.batch_size: 0`", "one line, exit 2, before Ray")),
    pytest.param(["fit", "--round", "0"], {"fit": {"num_actors": -2}}, "num_actors", id="fit.num_actors -2",
                 marks=pytest.mark.fault("`fit.num_actors: -2`", "one line, exit 2, before Ray")),
    pytest.param(["fit", "--round", "0"], {"fit": {"num_actors": 1.5}}, "num_actors", id="fit.num_actors 1.5",
                 marks=pytest.mark.fault("`fit.num_actors: 1.5`", "one line, exit 2, before Ray")),
    pytest.param(["run"], {"rounds": 0}, "rounds", id="rounds 0",
                 marks=pytest.mark.fault("`rounds: 0`", "one line, exit 2, before round 0")),
    pytest.param(["run"], {"train_preset": "huge"}, "huge", id="unknown train preset",
                 marks=pytest.mark.fault("an unknown `train_preset`", "one line, exit 2, before round 0 is fitted")),
    pytest.param(["run"], {"train": {"stpes": 4}}, "stpes", id="unknown train key",
                 marks=pytest.mark.fault("a misspelt key under `train:`", "one line, exit 2, before round 0 is fitted")),
]


@pytest.mark.parametrize("command, settings, word", RUN_CONFIG_CASES)
def test_run_config_is_checked_before_any_work(samples, tmp_path, capsys, no_ray, command, settings, word):
    config = write_config(tmp_path / "config.yaml", samples, **settings)
    code, err = run_cli([*command, "--run", tmp_path / "run", "--config", config], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert word in err
    assert not list((tmp_path / "run").glob("round=*")), "a failed command wrote a round"


MODEL_CASES = [
    pytest.param("body_model", nan_extra_regressor, "J_regressor_extra", id="NaN in J_regressor_extra",
                 marks=pytest.mark.fault("a body model with NaN in `J_regressor_extra`", "one line, exit 2, before any actor")),
    pytest.param("body_model", parent_out_of_range, "kintree", id="kintree parent out of range",
                 marks=pytest.mark.fault("a body model whose kintree names a parent out of range", "one line, exit 2, before any actor")),
    pytest.param("prior", not_positive_definite, "positive definite", id="prior not SPD",
                 marks=pytest.mark.fault("a pose prior whose covariance is not positive definite", "one line, exit 2, before any actor")),
    pytest.param("body_model", None, "not found", id="body model missing",
                 marks=pytest.mark.fault("a configured body model that does not exist", "one line, exit 2, before any actor")),
]


@pytest.mark.parametrize("key, change, word", MODEL_CASES)
def test_body_model_and_prior_are_checked_in_the_driver(samples, tmp_path, capsys, no_ray, key, change, word):
    make = body_model_file if key == "body_model" else prior_file
    path = tmp_path / f"{key}.npz"
    if change is not None:
        make(path, change)
    config = write_config(tmp_path / "config.yaml", samples, **{key: str(path)})
    code, err = run_cli(["fit", "--round", "0", "--run", tmp_path / "run", "--config", config], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert word in err


SHARD_CASES = [pytest.param(kind, word, id=kind, marks=pytest.mark.fault(f"samples: {kind}", "one line, exit 2, before Ray"))
               for kind, word in [("no sample_id", "sample_id"), ("no keypoints", "keypoints"),
                                  ("null sample_id", "sample_id"), ("duplicate sample_id across shards", "duplicate"),
                                  ("shards with different columns", "columns"),
                                  ("corrupt data page behind an intact footer", "corrupt")]]


@pytest.mark.parametrize("kind, word", SHARD_CASES)
def test_shards_are_checked_before_ray(samples, tmp_path, capsys, no_ray, kind, word):
    data = bad_shards(kind, samples, tmp_path / "data")
    code, err = run_cli(["fit", "--round", "0", "--data", data, "--run", tmp_path / "run"], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert word in err and "part-00001" in err


@pytest.mark.fault("a SPIN .npz whose header declares a 233 TiB array", "one line, exit 2, nothing allocated")
def test_npz_declaring_a_huge_array_is_refused(tmp_path, capsys):
    npz = npz_with(tmp_path / "huge.npz", {"imgname.npy": npy_declaring((10**12,), "<U64"), **spin_npz_members()})
    (tmp_path / "images").mkdir()
    code, err = run_cli(["data", "ingest", npz, "--images", tmp_path / "images", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "imgname" in err


@pytest.mark.fault("a `J_regressor_h36m.npy` whose header declares an 8 TB array (`body-model convert`)",
                   "one line, exit 2, nothing allocated, nothing written")
def test_npy_declaring_a_huge_array_is_refused(tmp_path, capsys):
    model = body_model_file(tmp_path / "model.npz", lambda arrays: None)
    (tmp_path / "huge.npy").write_bytes(npy_declaring((10**12,), "<f8"))
    code, err = run_cli(["body-model", "convert", model, tmp_path / "out.npz", "--joint-regressor-h36m",
                         tmp_path / "huge.npy"], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "huge.npy declares" in err and not (tmp_path / "out.npz").exists()


@pytest.mark.fault("a body model .npz with an extra member that cannot be decompressed",
                   "the member is never decompressed: the model loads")
def test_unknown_npz_members_are_not_decompressed(tmp_path, capsys):
    path = body_model_file(tmp_path / "model.npz", lambda arrays: arrays.update(notes=np.zeros(4096)))
    with zipfile.ZipFile(path) as archive:  # np.savez stores; recompress so that the member is deflated
        members = {name: archive.read(name) for name in archive.namelist()}
    npz_with(path, members)
    undecodable_member(path, "notes.npy")
    code, err = run_cli(["body-model", "info", path], capsys)
    assert code == 0, err
