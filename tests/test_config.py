import numpy as np
import pytest
import yaml

from fitting.errors import BadInput
from pipeline.best_fit import keep_new
from pipeline.config import RunConfig, apply_overrides, load_config, save_config
from pipeline.rundir import finished_rounds, is_done, mark_done, read_success


def test_config_round_trip_and_overrides(tmp_path):
    config = apply_overrides(RunConfig(), {"fit.batch_size": 32, "rounds": 5, "train.steps": 7, "seed": None})
    assert config.fit.batch_size == 32 and config.rounds == 5 and config.train == {"steps": 7}
    assert config.training.steps == 7
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("text, message", [
    ("fit: {batch_sise: 3}\n", "unknown key"),
    ("rounds: three\n", "cannot read"),
    ("fit: [1, 2]\n", "expected a mapping"),
    ("rounds: [\n", "not valid YAML"),
])
@pytest.mark.fault("a config with an unknown key, a wrong type, invalid YAML", "one-line error")
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(BadInput, match=message):
        load_config(path)


@pytest.mark.fault("a missing config file", "one-line error")
def test_missing_config_file(tmp_path):
    with pytest.raises(BadInput, match="config not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.fault("a new fit with a higher, NaN or infinite loss", "the old best fit stays")
def test_keep_new_never_makes_a_best_fit_worse():
    new = np.array([1.0, 5.0, np.nan, 3.0, np.inf, 2.0])
    old = np.array([2.0, 4.0, 1.0, np.nan, 1.0, 2.0])
    assert keep_new(new, old).tolist() == [True, False, False, True, False, False]


@pytest.mark.fault("a round with no `_SUCCESS.json`", "ignored by readers")
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


@pytest.mark.fault("an unknown loss weight", "one-line error")
def test_a_runs_own_loss_weight_keeps_the_presets_others():
    base = RunConfig.from_dict({"train_preset": "small"})
    assert base.training.weights.keypoints == 0.5 and base.training.seed == base.seed
    own = apply_overrides(base, {"train.weights": {"pose": 2.0}, "train.steps": 7}).training
    assert (own.weights.keypoints, own.weights.pose, own.steps) == (0.5, 2.0, 7)
    assert apply_overrides(base, {"train.weights": {"keypoints": 5.0}}).training.weights.keypoints == 5.0
    with pytest.raises(BadInput, match=r"^config\.train\.weights: unknown key 'keypoint' \(known: keypoints, "):
        apply_overrides(base, {"train.weights": {"keypoint": 1.0}})


@pytest.mark.parametrize("data, message", [
    ({"fit": {"smplify": {"stages": [{"name": "camera"}, {"name": "body", "iterations": "x"}]}}},
     r"^config\.fit\.smplify\.stages\[1\]\.iterations: cannot read 'x' as int$"),
    ({"fit": {"smplify": {"stages": [{"name": "body", "iterations": -1}]}}},
     r"^config\.fit\.smplify\.stages\[0\]: stage 'body': iterations must be >= 0"),
    ({"fit": {"solver": "magic"}}, r"^config\.fit: unknown solver 'magic' \(known: adam, lm\)$"),
    ({"train": {"bakbone": "small"}}, r"^config\.train: unknown key 'bakbone' \(known: backbone, "),
    ({"train": {"use_augmentation": "maybe"}}, r"^config\.train\.use_augmentation: cannot read 'maybe' as bool$"),
    ({"train": {"steps": 0}}, r"^config\.train: training setting 'steps' must be >= 1, got 0$"),
    ({"train_preset": "huge"}, r"^config: unknown train preset 'huge' \(known: tiny, small, keypoints, paper\)$"),
    ({"evaluate": "yes please"}, r"^config\.evaluate: cannot read 'yes please' as bool$"),
])
def test_the_whole_config_is_read_when_it_is_loaded(tmp_path, data, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match=message):
        load_config(path)


def test_the_resolved_sections_follow_the_saved_ones(tmp_path):
    config = RunConfig.from_dict({"seed": 3, "train_preset": "tiny", "train": {"steps": 5},
                                  "fit": {"solver": "adam", "smplify": {"sigma": 50}}})
    assert (config.training.steps, config.training.seed, config.training.backbone_weights) == (5, 3, "none")
    assert config.smplify.sigma == 50.0 and {s.solver for s in config.smplify.stages} == {"adam"}
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"] == {"steps": 5} and saved["fit"]["smplify"] == {"sigma": 50}
    assert "training" not in saved and "smplify" not in saved
    again = load_config(tmp_path / "config.yaml")
    assert again == config and again.training == config.training and again.smplify == config.smplify
