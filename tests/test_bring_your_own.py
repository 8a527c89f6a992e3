"""Bring your own, end to end, through the command line, on files the test writes in SPIN's own
formats: two training datasets of different kinds (LSP-original: 2D labels and OpenPose; H36M:
2D, 3D joints and MoSh SMPL), an evaluation set (3DPW, with gender), an OpenPose folder with two
people in one image, a COCO keypoints file, SMPLify's gmm_08.pkl and SPIN's checkpoint. The
README's "Bring your own" section is these commands."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import rundir
from tests.spin_data_formats import write_bring_your_own
from tests.test_real_data import one_line_error, run_cli
from trainer.data.datasets import describe_root, records
from trainer.data.ingest import source_row
from trainer.data.tables import FITS_SCHEMA, QUARANTINE_SCHEMA, read_table, to_numpy


def cli(args: list, capsys) -> str:
    """Run one command; fail the test with its stderr unless it succeeds. Returns stdout."""
    code, out, err = run_cli(args, capsys)
    assert code == 0, f"{' '.join(map(str, args))}: {err[-2000:]}"
    return out


def mlflow_params(run: Path, step: str) -> dict[str, str]:
    """The MLflow params of one step of a run (its SQLite store under RUN)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`spin.step` = '{step}'")
    assert len(runs) == 1
    return runs[0].data.params


@pytest.mark.slow
def test_bring_your_own_end_to_end(tmp_path, capsys):
    byo = write_bring_your_own(tmp_path / "in")
    data, run = tmp_path / "data", tmp_path / "run"

    # 1. everything into one data root; the second ingest of a dataset changes nothing
    cli(["data", "ingest", byo.lsp.file, "--images", byo.lsp.images, "--out", data, "--img-size", 64], capsys)
    cli(["data", "ingest", byo.h36m.file, "--images", byo.h36m.images, "--out", data, "--img-size", 64], capsys)
    cli(["data", "ingest", byo.pw3d.file, "--images", byo.pw3d.images, "--out", data, "--img-size", 64], capsys)
    cli(["data", "ingest", "--format", "openpose", byo.openpose.images, byo.openpose.keypoints, "--out", data,
         "--img-size", 64], capsys)
    cli(["data", "ingest", "--format", "coco", byo.coco.file, "--images", byo.coco.images, "--out", data,
         "--img-size", 64], capsys)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (data / "train").iterdir())
    assert "already in" in one_line_error(["data", "ingest", byo.lsp.file, "--images", byo.lsp.images, "--out", data], capsys)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (data / "train").iterdir()) == before
    shown = cli(["data", "show", data, "--json"], capsys)
    table = {(r["split"], r["dataset"]): r for r in json.loads(shown)}
    assert {k: (r["samples"], r["quarantined"]) for k, r in table.items()} == {
        ("train", "lsp-orig"): (10, 0), ("train", "h36m"): (8, 0), ("train", "openpose"): (3, 2),
        ("train", "coco"): (3, 1), ("test", "3dpw"): (6, 0)}
    assert table[("test", "3dpw")]["protocol"] == "3dpw"

    # 2. SMPLify's prior converted once; a config naming the pickle stops before any work
    prior = tmp_path / "gmm_08.npz"
    cli(["prior", "convert", "--allow-pickle", byo.gmm_pkl, prior], capsys)
    settings = {
        "data": str(data), "prior": str(prior), "rounds": 2, "train_preset": "tiny",
        "mix": {"h36m": 0.3, "lsp-orig,coco,openpose": 0.6},
        "train": {"backbone": "resnet50", "img_res": 64, "batch_size": 4, "steps": 2, "checkpoint_every": 2},
        "fit": {"batch_size": 64, "num_actors": 1,
                "smplify": {"stages": [{"name": "camera", "iterations": 5}, {"name": "body", "iterations": 10}]}},
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**settings, "prior": str(byo.gmm_pkl)}))
    assert "prior convert --allow-pickle" in one_line_error(["run", "--run", tmp_path / "never", "--config", bad], capsys)
    assert not (tmp_path / "never" / "round=0").exists()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))

    # 3. two rounds from SPIN's checkpoint, mixed by weight, evaluated on 3DPW
    cli(["run", "--run", run, "--config", config, "--init-from", f"spin:{byo.checkpoint}"], capsys)
    for r in (0, 1):
        for step in ("fits", "model", "eval"):
            assert rundir.is_done(run, r, step)
    model0 = rundir.read_success(run, 0, "model")
    assert model0["backbone_weights"]["kind"] == "spin"
    assert model0["backbone_weights"]["sha256"] == hashlib.sha256(byo.checkpoint.read_bytes()).hexdigest()
    assert rundir.read_success(run, 1, "model")["backbone_weights"] == model0["backbone_weights"]  # carried
    tracked = mlflow_params(run, "train-round0")
    assert tracked["backbone_weights.kind"] == "spin" and tracked["backbone_weights.sha256"] == model0["backbone_weights"]["sha256"]
    drawn = {name: d["drawn"] for name, d in model0["datasets"].items()}
    assert sum(drawn.values()) == 8 and set(model0["datasets"]) == {"lsp-orig", "h36m", "openpose", "coco"}
    assert model0["datasets"]["h36m"]["probability"] == pytest.approx(1 / 3)
    fits0 = rundir.read_success(run, 0, "fits")
    assert {k: v["rows"] for k, v in fits0["per_dataset"].items()} == {"lsp-orig": 10, "h36m": 8, "openpose": 3, "coco": 3}
    assert rundir.read_success(run, 1, "eval")["regressor"]["samples"] == 6

    # 4. the last regressor on the OpenPose images, refined by SMPLify: one person each
    predicted = tmp_path / "predicted"
    cli(["predict", byo.openpose.images, "--keypoints", byo.openpose.keypoints, "--run", run, "--out", predicted,
         "--refine"], capsys)
    predictions = read_table(predicted / "predictions.parquet", FITS_SCHEMA)
    samples = read_table(predicted / "samples.parquet")
    assert samples.column("imgname").to_pylist().count("two_people.jpg") == 2 and len(predictions) == 3
    assert len(list((predicted / "overlays").glob("*.png"))) == 3
    assert np.isfinite(to_numpy(predictions, "loss")).all()
    # bare images: one whole-image crop each (SPIN's demo without a box), no keypoints, no loss
    bare = tmp_path / "bare"
    cli(["predict", byo.openpose.images, "--run", run, "--round", 0, "--out", bare, "--batch-size", 2], capsys)
    bare_predictions = read_table(bare / "predictions.parquet", FITS_SCHEMA)
    assert len(bare_predictions) == 3 and not any(bare_predictions.column("valid").to_pylist())
    assert np.isnan(to_numpy(bare_predictions, "loss")).all()
    assert json.loads((bare / "_SUCCESS.json").read_text())["round"] == 0
    assert "keypoints" in one_line_error(["predict", byo.openpose.images, "--run", run, "--out", tmp_path / "r", "--refine"], capsys)
    assert "already holds" in one_line_error(["predict", byo.openpose.images, "--run", run, "--out", bare], capsys)
    # a samples folder: every row of the data root, train and test
    cli(["predict", data, "--run", run, "--out", tmp_path / "on-data", "--max-overlays", 2], capsys)
    assert len(read_table(tmp_path / "on-data" / "predictions.parquet", FITS_SCHEMA)) == 30
    assert len(list((tmp_path / "on-data" / "overlays").glob("*.png"))) == 2

    # 5. fits out, in SPIN's static-fits layout and as an .npz
    cli(["export", "--run", run, "--round", 1, "--format", "spin-static-fits", "--out", tmp_path / "static_fits"], capsys)
    cli(["export", "--run", run, "--round", 1, "--format", "npz", "--out", tmp_path / "fits.npz"], capsys)

    # every row of every source is accounted for: a sample or quarantined at ingest; a fit or
    # quarantined in the fit; and the exported rows are the best-fit table's, in source order
    best = rundir.read_fits(run, 1)
    best_row = {sid: i for i, sid in enumerate(best.column("sample_id").to_pylist())}
    fit_lost = set(rundir.read_quarantine(rundir.step_dir(run, 1, "fits")).column("sample_id").to_pylist())
    exported = np.load(tmp_path / "fits.npz")
    for (split, name), record in records(data).items():
        shown = {(r["split"], r["dataset"]): r for r in describe_root(data)}[(split, name)]
        assert shown["samples"] + shown["quarantined"] == record["rows"]
        if split != "train":
            continue
        static = np.load(tmp_path / "static_fits" / f"{name}_fits.npy")
        assert static.shape == (record["rows"], 82) and static.dtype == np.float32
        lost = read_table(data / "_quarantine" / "train" / f"{name}.parquet", QUARANTINE_SCHEMA)
        lost_rows = {source_row(s) for s in lost.column("sample_id").to_pylist()}
        mine = exported["dataset"] == name
        assert (exported["source_row"][mine] == np.arange(record["rows"])).all()
        for row in range(record["rows"]):
            sid = exported["sample_id"][mine][row]
            if row in lost_rows or sid in fit_lost:
                assert not static[row].any() and not exported["has_fit"][mine][row]
                continue
            i = best_row[sid]
            np.testing.assert_array_equal(static[row, :72], to_numpy(best, "pose")[i])
            np.testing.assert_array_equal(static[row, 72:], to_numpy(best, "betas")[i])
            assert exported["valid"][mine][row] == best.column("valid")[i].as_py()
            assert exported["loss"][mine][row] == pytest.approx(float(best.column("loss")[i].as_py()))
    assert len(best) + len(fit_lost) == sum(r["written"] for (s, _), r in records(data).items() if s == "train")
    assert set(np.unique(exported["dataset"])) == {"lsp-orig", "h36m", "openpose", "coco"}
    # one dataset to one file; never over an existing file
    one = tmp_path / "openpose_fits.npy"
    cli(["export", "--run", run, "--round", 1, "--format", "spin-static-fits", "--dataset", "openpose", "--out", one],
        capsys)
    np.testing.assert_array_equal(np.load(one), np.load(tmp_path / "static_fits" / "openpose_fits.npy"))
    assert "exists" in one_line_error(["export", "--run", run, "--round", 1, "--format", "npz", "--out", tmp_path / "fits.npz"],
                             capsys)
    assert "no training samples" in one_line_error(["export", "--run", run, "--round", 1, "--format", "npz", "--dataset",
                                           "3dpw", "--out", tmp_path / "x.npz"], capsys)
    assert exported["imgname"][exported["dataset"] == "lsp-orig"][0] == "images/im0001.jpg"
