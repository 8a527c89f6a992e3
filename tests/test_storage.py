"""Run and data directories as URIs, against a real S3 API on localhost (moto's server)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fitting.errors import BadInput
from pipeline import rundir
from trainer.data import storage
from trainer.data.tables import FITS_SCHEMA, fits_table, read_table, shard_paths, to_numpy, write_table

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "spin-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """host:port of a moto S3 server with one bucket; AWS test credentials in the environment."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
    # Ray workers take their environment (the credentials) from the session that starts them
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    yield f"{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_endpoint):
    """A fresh prefix in the bucket, as a URI that carries its endpoint."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}?endpoint_override={s3_endpoint}&scheme=http"


def test_locations_local_stay_paths_and_uris_keep_their_query():
    assert storage.location("runs/a") == Path("runs/a")
    assert storage.location("file:///tmp/run") == Path("/tmp/run")
    assert storage.join("runs/a", "round=0", "fits") == Path("runs/a/round=0/fits")
    uri = "s3://b/runs/exp1/?endpoint_override=h:1&scheme=http"
    joined = storage.join(uri, "round=0", "fits")
    assert joined == "s3://b/runs/exp1/round=0/fits?endpoint_override=h:1&scheme=http"
    assert storage.basename(joined) == "fits" and storage.is_uri(joined) and not storage.is_uri("/tmp/x")
    fs, path = storage.resolve(joined)
    assert type(fs).__name__ == "S3FileSystem" and path == "b/runs/exp1/round=0/fits"
    assert rundir.step_dir(uri, 2, "model") == "s3://b/runs/exp1/round=2/model?endpoint_override=h:1&scheme=http"
    assert rundir.step_dir(Path("r"), 2, "model") == Path("r/round=2/model")


def test_fsspec_only_schemes_and_unknown_ones():
    base = f"memory://spin-{uuid.uuid4().hex[:8]}/run"
    write_table(fits_rows(2), storage.join(base, "train", "part-00000.parquet"))
    [shard] = shard_paths(base, "train")
    assert shard == f"{base}/train/part-00000.parquet" and len(read_table(shard, FITS_SCHEMA)) == 2
    rundir.mark_done(base, 0, "fits", {"rows": 2})
    assert rundir.finished_rounds(base, "fits") == [0]
    with pytest.raises(BadInput, match="unsupported location"):
        storage.exists("nosuch://bucket/run")


def test_storage_round_trips_on_s3(s3, tmp_path):
    target = storage.join(s3, "a", "note.txt")
    assert not storage.exists(target) and not storage.is_dir(s3)
    storage.write_text(target, "first")
    storage.write_text(target, "second")
    assert storage.read_text(target) == "second" and storage.is_file(target) and storage.is_dir(storage.join(s3, "a"))
    storage.write_text(storage.join(s3, "a", ".hidden"), "x")
    storage.write_text(storage.join(s3, "a", "b", "deep.txt"), "x")
    assert storage.list_dir(storage.join(s3, "a")) == [target]
    assert storage.list_dir(storage.join(s3, "a"), kind="dir") == [storage.join(s3, "a", "b")]
    assert storage.list_dir(storage.join(s3, "missing")) == []

    local = tmp_path / "blob.bin"
    local.write_bytes(os.urandom(3000))
    storage.upload(local, storage.join(s3, "blob.bin"))
    copy = storage.local_copy(storage.join(s3, "blob.bin"))
    assert copy.read_bytes() == local.read_bytes()
    local.write_bytes(b"rewritten")  # a rewritten object is fetched again, not served from the cache
    storage.upload(local, storage.join(s3, "blob.bin"))
    assert storage.local_copy(storage.join(s3, "blob.bin")).read_bytes() == b"rewritten"
    assert storage.download(storage.join(s3, "a", "note.txt"), tmp_path / "n.txt").read_text() == "second"

    storage.delete(target)
    storage.delete(target)  # deleting what is gone is fine
    assert not storage.exists(target) and storage.exists(storage.join(s3, "a", "b", "deep.txt"))
    storage.delete_dir(storage.join(s3, "a"))
    assert not storage.exists(storage.join(s3, "a", "b", "deep.txt"))
    with pytest.raises(BadInput, match="not found"):
        storage.read_text(target)


def fits_rows(n: int, start: int = 0) -> pa.Table:
    return fits_table([f"s{start + i}" for i in range(n)], pose=0.0, betas=0.0, cam_t=1.0, loss=np.arange(n),
                      joint_loss=0.0, valid=True, betas_ok=True, found_in_round=0, init="mean", iterations=3)


def test_tables_and_shards_through_uris(s3):
    data = storage.join(s3, "data")
    write_table(fits_rows(4), storage.join(data, "train", "part-00001.parquet"))
    write_table(fits_rows(3, 4), storage.join(data, "train", "part-00000.parquet"))
    paths = shard_paths(data, "train")
    assert [storage.basename(p) for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(storage.is_uri(p) for p in paths)
    back = read_table(paths[1], FITS_SCHEMA)
    assert back.column("sample_id").to_pylist() == ["s0", "s1", "s2", "s3"]
    np.testing.assert_array_equal(to_numpy(back, "cam_t"), np.ones((4, 3)))
    with pytest.raises(BadInput, match="table not found"):
        read_table(storage.join(data, "nope.parquet"))
    storage.write_text(storage.join(data, "bad.parquet"), "PAR1 not really")
    with pytest.raises(BadInput, match="corrupt parquet"):
        read_table(storage.join(data, "bad.parquet"))
    with pytest.raises(BadInput, match="data directory not found"):
        shard_paths(storage.join(s3, "data", "train", "x"))
    storage.write_text(storage.join(s3, "empty", "README"), "no shards here")
    with pytest.raises(BadInput, match="no parquet shards"):
        shard_paths(storage.join(s3, "empty"))


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.fault("a write that fails, locally or on `s3://`", "no file or object left; an existing one untouched")
def test_failed_writes_leave_nothing(s3, tmp_path, remote):
    """A table that cannot be serialized, or text that cannot be written, leaves no object or file,
    and an existing one untouched."""
    base = storage.join(s3, "w") if remote else tmp_path / "w"
    bad = pa.table({"sample_id": ["a"], "span": pa.array([(1, 2, 3)], pa.month_day_nano_interval())})
    with pytest.raises(pa.ArrowNotImplementedError):
        write_table(bad, storage.join(base, "part-00000.parquet"))
    storage.write_text(storage.join(base, "keep.json"), "old")
    with pytest.raises(TypeError):
        storage.write_bytes(storage.join(base, "keep.json"), 12345)
    assert storage.read_text(storage.join(base, "keep.json")) == "old"
    fs, path = storage.resolve(base)
    from pyarrow.fs import FileSelector
    names = [i.base_name for i in fs.get_file_info(FileSelector(path, recursive=True))]
    assert names == ["keep.json"]


@pytest.mark.fault("a round with no `_SUCCESS.json`, on `s3://`",
                   "ignored by readers; the config is written only when a step succeeds")
def test_success_markers_and_config_on_s3(s3, tmp_path):
    from pipeline.config import resolve_config, save_run_config

    assert not rundir.is_done(s3, 0, "fits")
    rundir.mark_done(s3, 0, "fits", {"rows": 3})
    rundir.mark_done(s3, 2, "fits", {"rows": 4})
    storage.write_text(storage.join(rundir.step_dir(s3, 1, "fits"), "part-00000.parquet"), "x")  # unfinished
    assert rundir.finished_rounds(s3, "fits") == [0, 2] and rundir.read_success(s3, 2, "fits")["rows"] == 4
    rundir.clear_success(s3, 2, "fits")
    assert rundir.finished_rounds(s3, "fits") == [0]

    (tmp_path / "data" / "train").mkdir(parents=True)
    config = resolve_config(s3, None, {"data": str(tmp_path / "data"), "rounds": 5})
    assert not storage.exists(storage.join(s3, "config.yaml")), "written before a step succeeded"
    save_run_config(s3, config)
    assert "rounds: 5" in storage.read_text(storage.join(s3, "config.yaml"))
    assert resolve_config(s3, None, {}).rounds == 5 and config.data == str(tmp_path / "data")
    with pytest.raises(BadInput, match="data directory not found"):
        resolve_config(s3, None, {"data": storage.join(s3, "no-data")})


@pytest.mark.fault("a URI run without `MLFLOW_TRACKING_URI`",
                   "one-line error, exit 2, nothing written; with it, a resumed run appends to its parent run")
def test_uri_run_needs_a_tracking_server(s3, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.tracking import PARENT_ID_FILE, Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(BadInput, match="MLFLOW_TRACKING_URI"):
        Tracker(s3, "spin-test")
    (tmp_path / "data" / "train").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--rounds", "1", "--run", s3,
                             "--data", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "MLFLOW_TRACKING_URI" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not storage.exists(storage.join(s3, "config.yaml")), "a failed command wrote the config"

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--run", s3])
    assert exit_info.value.code == 2 and "MLFLOW_TRACKING_URI" in capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(s3, "spin-test")
    assert storage.read_text(storage.join(s3, PARENT_ID_FILE)) == tracker.parent_id
    assert Tracker(s3, "spin-test").parent_id == tracker.parent_id  # a resumed run appends to its parent


FAST_SMPLIFY = {"stages": [{"name": "camera", "iterations": 10}, {"name": "body", "iterations": 20}]}


@pytest.mark.slow
@pytest.mark.fault("a fit round on `s3://` that lost one shard's fits object and its marker",
                   "the rerun redoes that shard only; a marked row in a kept shard survives")
def test_fit_and_train_with_the_run_on_s3(s3, tiny_benchmark):
    """Fit round 0 and train regressor 0 into s3://; then a round that lost one shard's fits object
    redoes only that shard, reading the samples from s3:// as well."""
    from pipeline.config import RunConfig
    from pipeline.fit_stage import fit_round
    from pipeline.rounds import eval_round, train_round
    from pipeline.rundir import read_fits, read_quarantine

    config = RunConfig.from_dict({"data": str(tiny_benchmark), "train_preset": "tiny", "train": {"steps": 4},
                                  "fit": {"batch_size": 64, "num_actors": 1, "smplify": FAST_SMPLIFY}})
    run = s3
    summary = fit_round(run, 0, config, progress=False)
    shards = [storage.basename(p) for p in shard_paths(tiny_benchmark, "train")]
    fits_dir = rundir.step_dir(run, 0, "fits")
    assert [storage.basename(p) for p in storage.list_dir(fits_dir)] == ["_SUCCESS.json", *shards]
    fits = read_fits(run, 0)
    assert summary["rows"] == len(fits) == 160 - len(read_quarantine(fits_dir)) and summary["shards"] == len(shards)

    train = train_round(run, 0, config)
    model_dir = rundir.step_dir(run, 0, "model")
    assert rundir.is_done(run, 0, "model") and train["steps"] == 4
    assert storage.is_file(storage.join(model_dir, "checkpoint.pt"))

    metrics = eval_round(run, 0, config)  # pictures drawn locally, then uploaded
    assert metrics["regressor"]["mpjpe"] > 0 and rundir.is_done(run, 0, "eval")
    assert storage.is_file(storage.join(rundir.step_dir(run, 0, "eval"), "fit_overlays.png"))

    # round 1's actor code, in process: regressor 0 and the round-0 fits come from s3://
    from pipeline.best_fit import BatchFitter
    from pipeline.fit_stage import make_spec
    fitter = BatchFitter(make_spec(run, 1, config, "cpu", 1))
    batch = read_table(shard_paths(tiny_benchmark, "train")[0]).slice(0, 8)
    batch = batch.append_column("path", pa.array([shards[0]] * 8))
    out = fitter.fit_table(batch)
    previous = dict(zip(fits.column("sample_id").to_pylist(), to_numpy(fits, "loss")))
    new = zip(out.column("sample_id").to_pylist(), to_numpy(out, "loss"))
    assert all(loss <= previous[sid] + 1e-3 for sid, loss in new), "a best fit got worse"
    assert set(out.column("init").to_pylist()) <= {"network", "mean"} and fitter.regressor is not None

    # A round killed after two shards: the third shard's object and the marker are gone. A marked
    # row in a kept shard shows that kept shards are not redone.
    kept = storage.join(fits_dir, shards[0])
    marked = read_table(kept, FITS_SCHEMA)
    iterations = to_numpy(marked, "iterations").copy()
    iterations[0] = 777
    write_table(marked.set_column(marked.schema.get_field_index("iterations"), "iterations",
                                  pa.array(iterations, pa.int32())), kept)
    storage.delete(storage.join(fits_dir, shards[-1]))
    storage.delete(storage.join(fits_dir, rundir.SUCCESS))

    data = storage.join(s3, "data")
    for path in shard_paths(tiny_benchmark, "train"):
        storage.upload(path, storage.join(data, "train", path.name))
    config.data = data
    again = fit_round(run, 0, config, progress=False)
    assert again["shards_fitted_now"] == 1 and rundir.is_done(run, 0, "fits")
    assert to_numpy(read_table(kept, FITS_SCHEMA), "iterations")[0] == 777
    assert sorted(read_fits(run, 0).column("sample_id").to_pylist()) == sorted(fits.column("sample_id").to_pylist())
    assert fit_round(run, 0, config, progress=False).get("skipped") is True


def test_metric_names_from_free_text_are_accepted(tmp_path):
    from pipeline.tracking import Tracker, metric_name

    reason = "fit failed: RuntimeError: cannot reshape tensor of 0 elements into shape [0, -1]"
    assert metric_name(f"quarantine_reasons.{reason}") == \
        "quarantine_reasons.fit failed: RuntimeError: cannot reshape tensor of 0 elements into shape _0_ -1_"
    tracker = Tracker(tmp_path / "run", "spin-test", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.log_metrics(tracker.parent_id, {"quarantine_reasons": {reason: 2}, "rows": 5})
    logged = tracker.client.get_run(tracker.parent_id).data.metrics
    assert logged["rows"] == 5 and logged[metric_name(f"quarantine_reasons.{reason}")] == 2
