import numpy as np
import pytest

from fitting.errors import BadInput
from pipeline.best_fit import keep_new
from pipeline.config import RunConfig, apply_overrides, load_config, save_config
from pipeline.rundir import finished_rounds, is_done, mark_done, read_success


def test_config_round_trip_and_overrides(tmp_path):
    config = apply_overrides(RunConfig(), {"fit.batch_size": 32, "rounds": 5, "train.steps": 7, "seed": None})
    assert config.fit.batch_size == 32 and config.rounds == 5 and config.train == {"steps": 7}
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("text, message", [
    ("fit: {batch_sise: 3}\n", "unknown key"),
    ("rounds: three\n", "cannot read"),
    ("fit: [1, 2]\n", "expected a mapping"),
    ("rounds: [\n", "not valid YAML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(BadInput, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInput, match="config not found"):
        load_config(tmp_path / "nope.yaml")


def test_keep_new_never_makes_a_best_fit_worse():
    new = np.array([1.0, 5.0, np.nan, 3.0, np.inf, 2.0])
    old = np.array([2.0, 4.0, 1.0, np.nan, 1.0, 2.0])
    assert keep_new(new, old).tolist() == [True, False, False, True, False, False]


def test_success_markers(tmp_path):
    assert not is_done(tmp_path, 0, "fits")
    mark_done(tmp_path, 0, "fits", {"rows": 3})
    mark_done(tmp_path, 2, "fits", {"rows": 4})
    (tmp_path / "round=1" / "fits").mkdir(parents=True)  # unfinished: ignored by readers
    assert finished_rounds(tmp_path, "fits") == [0, 2]
    assert read_success(tmp_path, 2, "fits")["rows"] == 4
    with pytest.raises(BadInput, match="no finished fits"):
        read_success(tmp_path, 1, "fits")


def test_previous_fits_of_a_batch_spanning_two_shards():
    from pipeline.best_fit import gather_previous

    previous = {
        "part-0.parquet": ({"a": 0, "b": 1}, {"loss": np.array([1.0, 2.0])}),
        "part-1.parquet": ({"c": 0, "d": 1}, {"loss": np.array([3.0, 4.0])}),
    }
    ids = ["b", "x", "d", "a", "c"]
    shards = ["part-0.parquet", "part-0.parquet", "part-1.parquet", "part-0.parquet", "part-1.parquet"]
    has_old, old = gather_previous(ids, shards, previous.__getitem__)
    assert has_old.tolist() == [True, False, True, True, True]
    assert old["loss"].tolist() == [2.0, 4.0, 1.0, 3.0]


def test_a_runs_own_loss_weight_keeps_the_presets_others():
    from pipeline.config import train_config_for

    base = RunConfig.from_dict({"train_preset": "small"})
    assert train_config_for(base).weights.keypoints == 0.5
    own = train_config_for(apply_overrides(base, {"train.weights": {"pose": 2.0}, "train.steps": 7}))
    assert (own.weights.keypoints, own.weights.pose, own.steps) == (0.5, 2.0, 7)
    assert train_config_for(apply_overrides(base, {"train.weights": {"keypoints": 5.0}})).weights.keypoints == 5.0
    with pytest.raises(BadInput, match="unknown loss weights"):
        train_config_for(apply_overrides(base, {"train.weights": {"keypoint": 1.0}}))
