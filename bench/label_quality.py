"""How much do better labels help the regressor at a given budget? Trains the static arm's
schedule of an ablation (same preset, steps and seed) on labels of rising quality: the round-0
fits (SMPLify from the mean pose, the baseline), the last loop round's fits, and the train split's
ground truth. Fitting in the loop can beat the static arm by at most what the ground truth does.

Prints JSON: per label source its PA-MPJPE against truth (mm; 0 for the ground truth), the
regressor's PA-MPJPE on the test split and on the first train images, and test_vs_baseline =
test PA-MPJPE / the round-0 fits' test PA-MPJPE.

    spin-pipeline ablation --preset small --steps 3000 --out ABL    # makes ABL/data and the fits
    python bench/label_quality.py --ablation ABL --steps 3000 [--labels fits0,fits_last,truth]
        [--train KEY=VALUE ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.body_model import load_body_model  # noqa: E402
from fitting.errors import BadInput  # noqa: E402
from pipeline import rundir  # noqa: E402
from pipeline.ablation import truth_table  # noqa: E402
from pipeline.config import yaml_settings  # noqa: E402
from pipeline.rundir import read_fits  # noqa: E402
from trainer.data.tables import SAMPLES_SCHEMA, read_split, write_shards  # noqa: E402
from trainer.evaluate import evaluate_fits, evaluate_regressor  # noqa: E402
from trainer.train import load_regressor, train_regressor  # noqa: E402
from trainer.train_config import TRAIN_PRESETS, train_config  # noqa: E402


def train_images_with_truth(data: Path, truth: pa.Table, out: Path, num: int) -> Path:
    """The first `num` train samples with their held-out truth joined in, as an evaluation split."""
    train = read_split(data, "train").slice(0, num)
    where = {sid: i for i, sid in enumerate(truth.column("sample_id").to_pylist())}
    take = pa.array([where[sid] for sid in train.column("sample_id").to_pylist()])
    for name in ("has_smpl", "pose", "betas", "joints3d"):
        train = train.set_column(train.schema.get_field_index(name), name,
                                 truth.column(name).take(take).cast(SAMPLES_SCHEMA.field(name).type))
    write_shards(train, out, shard_size=num)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", required=True, type=Path, help="an ablation's output folder")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per label source (default 3000)")
    parser.add_argument("--labels", default="fits0,fits_last,truth", help="label sources, comma-separated (default all three)")
    parser.add_argument("--preset", default="small", choices=sorted(TRAIN_PRESETS), help="training preset (default small)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--train-images", type=int, default=400, help="train images scored against their truth")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting on top of the preset, as the ablation's --train, e.g. "
                             "'augment={flip_prob: 0}'; repeatable")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data, loop = args.ablation / "data", args.ablation / "loop"
    finished = rundir.finished_rounds(loop, "fits") if loop.is_dir() else []
    if not finished or not (data / "train").is_dir():
        parser.error(f"{args.ablation} has no data/train or no finished loop/round=N/fits: run the ablation first")
    try:
        overrides = yaml_settings(tuple(args.train), "--train")
    except BadInput as exc:
        parser.error(str(exc))
    last = max(finished)
    sources = {"fits0": lambda: read_fits(loop, 0), "fits_last": lambda: read_fits(loop, last),
               "truth": lambda: truth_table(truth)}
    unknown = set(args.labels.split(",")) - set(sources)
    if unknown:
        parser.error(f"unknown label sources {sorted(unknown)} (choose from {', '.join(sources)})")
    body = load_body_model(None)
    truth = read_split(data, "truth")
    try:
        config = train_config(args.preset, {**overrides, "steps": args.steps, "seed": args.seed, "checkpoint_every": 10**9})
    except BadInput as exc:
        parser.error(str(exc))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_eval = train_images_with_truth(data, truth, Path(tmp) / "train-eval", args.train_images)
        for name in args.labels.split(","):
            labels = sources[name]()
            start = time.perf_counter()
            train_regressor(config, [data / "train"], labels, Path(tmp) / name, body)
            regressor = load_regressor(Path(tmp) / name / "checkpoint.pt")
            rows[name] = {
                "labels_pa_mpjpe": round(evaluate_fits(labels, truth, body)["pa_mpjpe"], 1),
                "train_pa_mpjpe": round(evaluate_regressor(regressor, [train_eval], body, segmentation=False)["pa_mpjpe"], 1),
                "test_pa_mpjpe": round(evaluate_regressor(regressor, [data / "test"], body, segmentation=False)["pa_mpjpe"], 1),
                "seconds": round(time.perf_counter() - start),
            }
            print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    baseline = rows.get("fits0", {}).get("test_pa_mpjpe")
    for row in rows.values():
        row["test_vs_baseline"] = round(row["test_pa_mpjpe"] / baseline, 3) if baseline else None
    result = {"ablation": str(args.ablation), "preset": args.preset, "train": overrides, "steps": args.steps, "seed": args.seed,
              "last_loop_round": last, "machine": platform.machine(), "labels": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
