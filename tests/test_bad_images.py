"""Images that cannot be read are found, recorded with their reason and counted, and `data ingest`
reads images only under --images."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import rundir
from pipeline.cli import main


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
@pytest.mark.fault("a sample whose image bytes cannot be decoded, at training",
                   "quarantined with its reason; counted in the model step's `_SUCCESS.json`")
def test_undecodable_image_is_quarantined_at_training(tiny_benchmark, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.fit_stage import fit_round
    from pipeline.rounds import train_round

    (tmp_path / "data" / "train").mkdir(parents=True)
    table = pq.read_table(sorted((tiny_benchmark / "train").glob("*.parquet"))).slice(0, 16)
    images = table.column("image").to_pylist()
    broken = table.column("sample_id")[5].as_py()
    images[5] = images[5][: len(images[5]) // 3]  # a truncated JPEG
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / "data" / "train" / "part-00000.parquet")
    config = RunConfig.from_dict({"data": str(tmp_path / "data"), "train_preset": "tiny",
                                  "train": {"steps": 2, "batch_size": 8},
                                  "fit": {"batch_size": 16, "smplify": {"stages": [{"name": "camera", "iterations": 2},
                                                                                   {"name": "body", "iterations": 2}]}}})
    run = tmp_path / "run"
    fit_round(run, 0, config, progress=False)
    train_round(run, 0, config)
    success = rundir.read_success(run, 0, "model")
    assert success["quarantined"] == 1, success
    reasons = " ".join(success.get("quarantine_reasons", {}))
    assert "image" in reasons, success
    quarantine = pq.read_table(next(rundir.step_dir(run, 0, "model").glob("quarantine*")))
    assert quarantine.column("sample_id").to_pylist() == [broken]


@pytest.mark.fault("a SPIN .npz whose `imgname` points outside `--images` (`../x.png`, `/abs/x.png`)",
                   "that row is quarantined with the reason; no file outside `--images` is read")
def test_ingest_reads_images_only_under_the_images_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    picture = np.full((120, 120, 3), 90, np.uint8)
    cv2.imwrite(str(images / "inside.png"), picture)
    cv2.imwrite(str(tmp_path / "outside.png"), picture)
    names = ["inside.png", "../outside.png", str(tmp_path / "outside.png")]
    n = len(names)
    part = np.zeros((n, 24, 3))
    part[:, :14, :2] = np.random.default_rng(0).uniform(30, 90, (n, 14, 2))
    part[:, :14, 2] = 1.0
    np.savez(tmp_path / "d.npz", imgname=np.array(names), center=np.full((n, 2), 60.0), scale=np.full(n, 0.5), part=part)
    code, out, err = run_cli(["data", "ingest", tmp_path / "d.npz", "--images", images, "--out", tmp_path / "out",
                              "--img-size", "64", "--min-visible", "4"], capsys)
    assert code == 0, err
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine" / "train" / "d.parquet")
    reasons = dict(zip(quarantine.column("source").to_pylist(), quarantine.column("reason").to_pylist()))
    assert set(reasons) == set(names[1:]), reasons
    assert all("outside" in reason for reason in reasons.values()), reasons
