"""Where a fit round's actors run: the plan for a cluster's CPUs and GPUs (several actors may share
a GPU by fraction), the one-line error when a round asks for GPUs and gets none (from the plan,
before Ray would wait for a GPU forever, and from an actor that finds no CUDA device), and the
device each actor reports, recorded in the round's _SUCCESS.json."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fitting.errors import BadInput
from pipeline import rundir
from pipeline.config import FitStageConfig, RunConfig
from pipeline.fit_stage import FitterSpec, ShardFitter, actor_bad_input, fit_round, make_spec, plan_devices
from tests.test_pipeline import FAST_SMPLIFY, copy_with_bad_sample
from trainer.data.tables import to_numpy


def plan(cpus: float, gpus: float, **fit):
    return plan_devices(FitStageConfig(**fit), cpus, gpus)


@pytest.mark.parametrize("cpus, gpus, fit, expected", [
    (2, 0, {}, (2, 0.5, 0.0, "cpu")),                                       # one actor per core, one core left over
    (16, 1, {}, (1, 15.0, 1.0, "cuda")),                                    # a GPU: one actor holds it
    (16, 1, {"gpus_per_actor": 0.25}, (4, 3.75, 0.25, "cuda")),              # four actors share it
    (16, 2, {"gpus_per_actor": 0.5}, (4, 3.75, 0.5, "cuda")),
    (16, 1, {"gpus_per_actor": 0.1}, (10, 1.5, 0.1, "cuda")),               # 1 / 0.1 is 10, not 9
    (16, 1, {"gpus_per_actor": 0.25, "num_actors": 3}, (3, 5.0, 0.25, "cuda")),
    (8, 1, {"device": "cuda", "gpus_per_actor": 0.5, "cpus_per_actor": 2}, (2, 2.0, 0.5, "cuda")),
    (4, 2, {"device": "cpu"}, (4, 0.75, 0.0, "cpu")),                       # GPUs there, but not asked for
    (4, 0.5, {"device": "cuda"}, (1, 3.0, 0.5, "cuda")),                    # what is free of a shared GPU
])
def test_the_plan_for_a_cluster(cpus, gpus, fit, expected):
    got = plan(cpus, gpus, **fit)
    assert (got.actors, got.cpus_per_actor, got.gpus_per_actor, got.device) == expected
    assert (got.free_cpus, got.free_gpus) == (cpus, gpus)
    assert f"{got.actors} actor" in got.line() and f"on {got.device}" in got.line()


@pytest.mark.parametrize("cpus, gpus, fit, message", [
    (16, 0, {"device": "cuda"}, r"asks for GPUs \(fit.device: cuda\) but Ray has none free"),
    (16, 0, {"gpus_per_actor": 0.5}, r"asks for GPUs \(fit.gpus_per_actor: 0.5\) but Ray has none free"),
    (16, 1, {"gpus_per_actor": 2}, "more than the 1 GPUs Ray has free"),
    (16, 1, {"gpus_per_actor": 0.5, "num_actors": 3}, "3 fit actors at 0.5 GPU each need 1.5 GPUs"),
    (4, 0, {"num_actors": 2, "cpus_per_actor": 3}, "2 fit actors at 3 CPUs each need 6 CPUs"),
])
def test_a_plan_that_cannot_be_met_is_an_error(cpus, gpus, fit, message):
    with pytest.raises(BadInput, match=message):
        plan(cpus, gpus, **fit)


@pytest.mark.parametrize("fit, message", [
    ({"device": "gpu"}, "device must be one of auto, cpu, cuda"),
    ({"gpus_per_actor": 1.5}, "gpus_per_actor must be -1"),
    ({"gpus_per_actor": -0.5}, "gpus_per_actor must be -1"),
    ({"device": "cpu", "gpus_per_actor": 0.5}, "an actor that holds a GPU fits on it"),
    ({"device": "cuda", "gpus_per_actor": 0}, "must hold one"),
    ({"num_actors": -1}, "num_actors must be >= 0"),
])
def test_contradictory_fit_settings_are_refused_when_read(fit, message):
    with pytest.raises(BadInput, match=message):
        RunConfig.from_dict({"fit": fit})


def test_an_actors_bad_input_is_found_in_rays_error_text():
    text = ("The actor died because of an error raised in its creation task, ray::MapWorker.__init__()\n"
            "  File \"pipeline/fit_stage.py\", line 80, in __init__\n"
            "fitting.errors.BadInput: a fit actor planned for a GPU sees none: ...\n")
    assert actor_bad_input(RuntimeError(text)) == "a fit actor planned for a GPU sees none: ..."
    assert actor_bad_input(RuntimeError("ActorDiedError: out of memory")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_actor_planned_for_a_gpu_that_sees_none_refuses_to_start(tmp_path):
    spec = make_spec(tmp_path / "run", 0, RunConfig(), "cuda", 1)
    with pytest.raises(BadInput, match="planned for a GPU sees none: torch.cuda.is_available.. is false"):
        ShardFitter(spec)


def test_an_in_process_fitter_reports_its_device(tmp_path):
    """Also beside a running Ray (as in a driver): only an actor reports an actor id."""
    from pipeline.ray_session import ensure_ray

    ensure_ray(None, progress=False)
    fitter = ShardFitter(make_spec(tmp_path / "run", 0, RunConfig(), "cpu", 1))
    assert fitter.fitter.worker == '{"device": "cpu"}' and fitter.fitter.smplify.mode == "dynamic"
    assert isinstance(fitter.spec, FitterSpec)


def test_a_shard_fitted_with_static_shapes_equals_the_dynamic_fit(tiny_benchmark, tmp_path):
    """The fixed-shape LM that a GPU runs (mode 'static'), taken on the CPU through the fit
    stage's own fitter: the same rows as the dynamic fit, the broken sample quarantined alike."""
    bad_id = copy_with_bad_sample(tiny_benchmark, tmp_path / "data")
    shard = str(sorted((tmp_path / "data" / "train").glob("*.parquet"))[0])
    tables = {}
    for mode in ("dynamic", "static"):
        config = RunConfig.from_dict({"fit": {"batch_size": 16, "smplify": {**FAST_SMPLIFY, "mode": mode}}})
        tables[mode] = ShardFitter(make_spec(tmp_path / mode, 0, config, "cpu", 1)).fit_shard(shard)
    dynamic, static = tables["dynamic"], tables["static"]
    assert set(dynamic.column("fit_mode").to_pylist()) == {"dynamic on cpu"}
    assert set(static.column("fit_mode").to_pylist()) == {"static on cpu"}
    for name in ("sample_id", "reason", "valid", "betas_ok", "init", "found_in_round"):
        assert static.column(name).to_pylist() == dynamic.column(name).to_pylist(), name
    reasons = dict(zip(dynamic.column("sample_id").to_pylist(), dynamic.column("reason").to_pylist()))
    assert "non-finite keypoints" in reasons[bad_id]
    # The two sum in different orders (a padded batch against the rows still moving), so a sample
    # whose stopping test sits within float32 rounding may stop a step or two apart: a few may.
    apart = to_numpy(static, "iterations") != to_numpy(dynamic, "iterations")
    assert apart.sum() <= len(apart) // 32, np.nonzero(apart)
    loss_s, loss_d = to_numpy(static, "loss"), to_numpy(dynamic, "loss")
    np.testing.assert_allclose(loss_s[apart], loss_d[apart], rtol=0.03)
    for name, rtol in (("pose", 1e-4), ("betas", 1e-4), ("cam_t", 1e-4), ("loss", 1e-4), ("joint_loss", 1e-3)):
        np.testing.assert_allclose(to_numpy(static, name)[~apart], to_numpy(dynamic, name)[~apart],
                                   atol=1e-4, rtol=rtol, err_msg=name)  # joint_loss: squared pixels, summed


def test_gpus_asked_of_a_ray_without_any_fail_before_the_pool(tiny_benchmark, tmp_path):
    """Real local Ray (this machine's, no GPU): Ray Data would wait for a GPU forever."""
    from pipeline.ray_session import available_gpus, ensure_ray

    ensure_ray(None, progress=False)
    if available_gpus() > 0:
        pytest.skip("this Ray has a GPU")
    config = RunConfig.from_dict({"data": str(tiny_benchmark), "fit": {"gpus_per_actor": 0.5, "smplify": FAST_SMPLIFY}})
    start = time.perf_counter()
    with pytest.raises(BadInput, match="asks for GPUs .fit.gpus_per_actor: 0.5. but Ray has none free"):
        fit_round(tmp_path / "run", 0, config, progress=False)
    assert time.perf_counter() - start < 60
    assert not rundir.is_done(tmp_path / "run", 0, "fits")
    assert list((tmp_path / "run" / "round=0" / "fits").glob("part-*.parquet")) == []


ACTOR_WITHOUT_CUDA = """
import sys
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
from pipeline.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_actor_that_finds_no_cuda_device_fails_the_round_in_one_line(tiny_benchmark, tmp_path):
    """A Ray that says it has a GPU (declared, as a misconfigured node would) on a machine where
    torch sees none: the actor refuses, and the command ends in one line and exit 2."""
    data = tmp_path / "data"
    shutil.copytree(tiny_benchmark, data)
    run = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", ACTOR_WITHOUT_CUDA, "fit", "--round", "0", "--data", str(data),
                           "--run", str(run), "--device", "cuda", "--batch-size", "32"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a fit actor planned for a GPU sees none: torch.cuda.is_available() is false"), last
    assert "Ray's GPU ids ['0']" in last
    assert not rundir.is_done(run, 0, "fits")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_gpu_fit_stage_benchmark_refuses_a_machine_without_one():
    """bench/fit_stage.py --device cuda: one line and exit 2, before it makes any data."""
    done = subprocess.run([sys.executable, "bench/fit_stage.py", "--device", "cuda", "--rows", "64"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "error: --device cuda: no CUDA device is visible to torch"
