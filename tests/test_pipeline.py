"""The product end to end: real local Ray, real SQLite MLflow, the tiny built-in benchmark."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import rundir
from pipeline.config import RunConfig, save_config
from pipeline.fit_stage import fit_round
from pipeline.rundir import read_fits, read_quarantine
from trainer.data.tables import SAMPLES_SCHEMA, make_table, read_table, to_numpy, write_table

FAST_SMPLIFY = {"stages": [{"name": "camera", "iterations": 10}, {"name": "body", "iterations": 25}]}


def config_for(data: Path, **overrides) -> RunConfig:
    config = RunConfig.from_dict({"data": str(data), "rounds": 2, "train_preset": "tiny",
                                  "fit": {"batch_size": 32, "smplify": FAST_SMPLIFY}})
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def copy_with_bad_sample(src: Path, dst: Path) -> str:
    """The benchmark with one train sample's keypoints made NaN; returns that sample's id."""
    shutil.copytree(src, dst)
    first = sorted((dst / "train").glob("*.parquet"))[0]
    table = read_table(first, SAMPLES_SCHEMA)
    keypoints = to_numpy(table, "keypoints").copy()
    keypoints[0, :5, 0] = np.nan
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    columns["keypoints"] = keypoints
    for name in ("center", "pose", "betas", "joints3d"):
        columns[name] = [None if v is None else np.asarray(v, np.float32) for v in columns[name]]
    write_table(make_table(columns, SAMPLES_SCHEMA), first)
    return table.column("sample_id")[0].as_py()


@pytest.mark.slow
@pytest.mark.fault("a finished step run again", "skipped")
@pytest.mark.fault("a new fit with a higher loss than the best fit, over two real rounds", "the old best fit stays")
@pytest.mark.fault("a sample with non-finite keypoints in a shard; a shard with no rows",
                   "the sample quarantined with its reason, an empty fits file for the empty shard, the round finishes")
def test_two_rounds_end_to_end(tiny_benchmark, tmp_path):
    import mlflow

    from pipeline.rounds import run_pipeline

    data = tmp_path / "data"
    bad_id = copy_with_bad_sample(tiny_benchmark, data)
    write_table(SAMPLES_SCHEMA.empty_table(), data / "train" / "part-99999.parquet")  # a shard with no rows
    run = tmp_path / "run"
    config = config_for(data)
    results = run_pipeline(run, config, rounds=2, progress=False)

    for r in (0, 1):
        for step in ("fits", "model", "eval"):
            assert rundir.is_done(run, r, step)
        empty = rundir.step_dir(run, r, "fits") / "part-99999.parquet"
        assert pq.ParquetFile(empty).metadata.num_rows == 0
    round0, round1 = read_fits(run, 0), read_fits(run, 1)
    ids0 = round0.column("sample_id").to_pylist()
    ids1 = round1.column("sample_id").to_pylist()
    assert sorted(ids0) == sorted(ids1) and bad_id not in ids0
    loss0 = dict(zip(ids0, to_numpy(round0, "loss")))
    loss1 = dict(zip(ids1, to_numpy(round1, "loss")))
    assert all(loss1[i] <= loss0[i] + 1e-4 for i in ids0), "a best fit got worse"
    found = to_numpy(round1, "found_in_round")
    init = np.asarray(round1.column("init").to_pylist())
    assert set(np.unique(init)) <= {"mean", "network"}
    assert np.all((found == 1) == (init == "network"))

    quarantine = read_quarantine(rundir.step_dir(run, 0, "fits"))
    reasons = dict(zip(quarantine.column("sample_id").to_pylist(), quarantine.column("reason").to_pylist()))
    assert "non-finite keypoints" in reasons[bad_id]
    success = rundir.read_success(run, 0, "fits")
    assert success["rows"] == len(ids0) and success["quarantined"] == 1
    assert 0.0 <= success["acceptance_rate"] <= 1.0 and success["code_version"]
    # the device plan and where each actor fitted, by rows (the quarantined sample's included)
    assert success["device_plan"]["device"] == "cpu" and success["device_plan"]["gpus_per_actor"] == 0
    actors = success["actors"]
    assert len(actors) <= success["device_plan"]["actors"] and all(a["device"] == "cpu" and a["actor"] for a in actors)
    assert sum(a["rows"] for a in actors) == success["rows"] + 1 == success["fit_modes"]["dynamic on cpu"]

    eval1 = results[1]["eval"]
    assert eval1["regressor"]["pa_mpjpe"] > 0 and eval1["fits"]["pa_mpjpe"] > 0
    assert (rundir.step_dir(run, 1, "eval") / "fit_overlays.png").stat().st_size > 1000

    mlflow.set_tracking_uri(f"sqlite:///{run / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["spin-pipeline"])
    names = set(runs["tags.mlflow.runName"])
    assert {"fit-round0", "train-round0", "eval-round0", "fit-round1", "train-round1", "eval-round1"} <= names
    fit0 = runs[runs["tags.mlflow.runName"] == "fit-round0"].iloc[0]
    assert (fit0["params.device_plan.device"], fit0["params.fitted_on"]) == ("cpu", "cpu")
    assert fit0["params.device_plan.actors"] == str(success["device_plan"]["actors"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1 and parent["metrics.rounds_done"].iloc[0] == 2

    # a finished step is a no-op
    again = fit_round(run, 0, config, progress=False)
    assert again.get("skipped") is True


def split_shards(src: Path, dst: Path, small: int, rows_per_small: int) -> None:
    """`small` shards of a few rows, then one shard with the rest: on a loaded machine the driver
    may commit the small shards late and in a burst, but the big last one keeps the round open."""
    (dst / "train").mkdir(parents=True)
    table = pq.read_table(sorted((src / "train").glob("*.parquet")))
    starts = [i * rows_per_small for i in range(small)] + [small * rows_per_small]
    for i, start in enumerate(starts):
        length = rows_per_small if i < small else len(table) - start
        pq.write_table(table.slice(start, length), dst / "train" / f"part-{i:05d}.parquet")


@pytest.mark.slow
@pytest.mark.fault("a fit round's process group killed (SIGKILL) after some shards",
                   "the rerun fits only the missing shards; committed shards keep their files; the result equals an uninterrupted round")
def test_killed_fit_round_resumes_without_redoing_shards(tiny_benchmark, tmp_path):
    data = tmp_path / "data"
    split_shards(tiny_benchmark, data, small=4, rows_per_small=8)
    shards = sorted(p.name for p in (data / "train").glob("*.parquet"))
    config = config_for(data)
    config.fit.batch_size = 8
    config.fit.num_actors = 1
    # one actor, one shard per batch, and some work per shard so that commits can spread in time
    config.fit.smplify = {"stages": [{"name": "camera", "iterations": 40, "solver": "adam"},
                                     {"name": "body", "iterations": 60, "solver": "adam"}]}
    killed = tmp_path / "killed"
    save_config(config, killed / "config.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "fit", "--round", "0", "--run", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    fits_dir = rundir.step_dir(killed, 0, "fits")
    deadline = time.time() + 240
    while time.time() < deadline and len(list(fits_dir.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if len(list(fits_dir.glob("part-*.parquet"))) == len(shards):
        # Ray Data can hand the driver every shard in one burst on a loaded machine, so the kill
        # may land after the last commit: remove the last shards as a kill before them would.
        for name in shards[-2:]:
            (fits_dir / name).unlink()
        rundir.clear_success(killed, 0, "fits")
    committed = {p.name: p.stat().st_mtime_ns for p in fits_dir.glob("part-*.parquet")}
    assert 2 <= len(committed) < len(shards)
    assert not rundir.is_done(killed, 0, "fits")

    summary = fit_round(killed, 0, config, progress=False)
    assert summary["shards_fitted_now"] == len(shards) - len(committed)
    for name, mtime in committed.items():
        assert (fits_dir / name).stat().st_mtime_ns == mtime, f"{name} was redone"

    clean = tmp_path / "clean"
    fit_round(clean, 0, config, progress=False)
    a, b = read_fits(killed, 0), read_fits(clean, 0)
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    for name in ("pose", "betas", "cam_t", "loss"):
        np.testing.assert_allclose(to_numpy(a, name), to_numpy(b, name), rtol=1e-4, atol=1e-4)


@pytest.mark.fault("a corrupt parquet shard", "one-line error, exit 2")
def test_corrupt_shard_is_one_clear_error(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", "--round", "0", "--data",
                             str(tmp_path / "data"), "--run", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "corrupt parquet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ablation_runs_comparable_arms_over_seeds(tmp_path):
    """`spin-pipeline ablation --backbone keypoints --seeds 2` on the tiny keypoint-only benchmark:
    three arms and the oracle with the same total steps per seed, the round-0 fits made once and
    shared, the loop's rounds, mean and sd per arm, the seed-paired ratios, the mean-pose
    reference, the init comparison, the table, the plot and MLflow."""
    import json

    import mlflow
    from click.testing import CliRunner

    from pipeline.ablation import arm_run
    from pipeline.cli import cli

    out = tmp_path / "ablation"
    result = CliRunner().invoke(cli, ["ablation", "--backbone", "keypoints", "--preset", "tiny-keypoints", "--rounds", "2",
                                      "--steps", "6", "--seeds", "2", "--out", str(out), "--train", "batch_size=16",
                                      "--smplify", "angle_prior_weight=7"])
    assert result.exit_code == 0, result.output
    # every arm says what it trained and scored, the 2D-only one too
    assert "== 2d-only, training seed 0\ntrain round 0: 6 steps" in result.output
    assert "== 2d-only, training seed 1\ntrain round 0: 6 steps" in result.output
    report = json.loads((out / "ablation.json").read_text())
    assert report["command"].endswith("--seeds 2 --train batch_size=16 --smplify angle_prior_weight=7")
    assert report["train_seeds"] == [0, 1]
    assert report["backbone"] == "keypoints" and report["dataset"]["train"] == 240
    assert set(report["arms"]) == {"2d-only", "static", "loop", "oracle"}
    for arm, summary in report["arms"].items():
        per_seed = [summary["by_seed"][s]["regressor"]["pa_mpjpe"] for s in ("0", "1")]
        assert summary["regressor"]["pa_mpjpe"] == pytest.approx(np.mean(per_seed))
        assert summary["regressor_sd"]["pa_mpjpe"] == pytest.approx(np.std(per_seed, ddof=1))
    assert [r["round"] for r in report["arms"]["loop"]["rounds"]] == [0, 1]
    reg = {arm: {s: r["regressor"]["pa_mpjpe"] for s, r in report["arms"][arm]["by_seed"].items()} for arm in report["arms"]}
    for name, top, bottom in (("static_vs_2d", "static", "2d-only"), ("loop_vs_static", "loop", "static"),
                              ("oracle_vs_static", "oracle", "static")):
        ratio = report["ratios"][name]
        assert ratio["by_seed"] == pytest.approx({s: reg[top][s] / reg[bottom][s] for s in ("0", "1")})
        assert ratio["worst"] == max(ratio["by_seed"].values())
    # the oracle's table is the train split's ground truth, joined to the right samples
    oracle_labels = report["arms"]["oracle"]["by_seed"]["1"]["fits"]
    assert oracle_labels["matched"] == oracle_labels["fits"] > 0 and oracle_labels["mpjpe"] < 1e-3
    shared = rundir.read_fits(arm_run(out, "static", 0), 0)
    for seed in (0, 1):
        for arm in ("2d-only", "static", "oracle"):
            model = rundir.read_success(arm_run(out, arm, seed), 0, "model")
            assert model["steps"] == 6 and model["input"] == "keypoints"
        assert sum(rundir.read_success(arm_run(out, "loop", seed), r, "model")["trained_steps"] for r in (0, 1)) == 6
        for arm in ("static", "loop"):   # fitted once: the same table and record, the same seconds
            assert rundir.read_fits(arm_run(out, arm, seed), 0).equals(shared)
            assert rundir.read_success(arm_run(out, arm, seed), 0, "fits") == rundir.read_success(arm_run(out, "static", 0), 0, "fits")
        config = yaml.safe_load((arm_run(out, "loop", seed) / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["train"]["batch_size"] == 16
        assert config["fit"]["smplify"] == {"angle_prior_weight": 7}
    assert report["mean_pose_reference"]["evaluated_3d"] == report["arms"]["static"]["regressor"]["evaluated_3d"]
    assert report["mean_pose_reference"]["pa_mpjpe"] > 0
    assert set(report["init_comparison"]) == {"mean", "network"}
    table = (out / "ablation.md").read_text()
    assert "| loop |" in table and "| mean pose, no input |" in table and "| ground-truth labels |" in table
    assert " ± " in table and "| loop / static |" in table
    assert (out / "ablation_pa_mpjpe.png").stat().st_size > 0
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablation")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert {f"{arm} seed {s}" for arm in ("2d-only", "static", "loop", "oracle") for s in (0, 1)} <= names


@pytest.mark.slow
def test_keypoints_regressor_initializes_the_next_fit_round(tiny_benchmark, tmp_path):
    """Two rounds with `train_preset: keypoints`: round 1's fits start from round 0's keypoint
    regressor, the best fit never gets worse, and the regressor is evaluated and drawn."""
    from pipeline.rounds import run_pipeline

    run = tmp_path / "run"
    config = config_for(tiny_benchmark, train_preset="keypoints",
                        train={"steps": 20, "batch_size": 16, "threads": 1, "checkpoint_every": 10})
    results = run_pipeline(run, config, rounds=2, progress=False)
    round0, round1 = read_fits(run, 0), read_fits(run, 1)
    loss0 = dict(zip(round0.column("sample_id").to_pylist(), to_numpy(round0, "loss")))
    loss1 = dict(zip(round1.column("sample_id").to_pylist(), to_numpy(round1, "loss")))
    assert all(loss1[i] <= loss0[i] + 1e-4 for i in loss0)
    init = np.asarray(round1.column("init").to_pylist())
    found = to_numpy(round1, "found_in_round")
    assert (found == 1).any() and np.all((found == 1) == (init == "network"))
    model = rundir.read_success(run, 0, "model")
    assert model["backbone"] == "keypoints" and model["input"] == "keypoints" and model["loss_body"] == "FastKeypointBody"
    assert results[1]["eval"]["regressor"]["pa_mpjpe"] > 0
    assert (rundir.step_dir(run, 1, "eval") / "regressor_overlays.png").stat().st_size > 1000
