"""Probes for the keypoint regressor (see bench/kp_probe.py). Each prints one JSON line per
result and appends it to --log.

    python bench/kp_experiments.py speed [--set KEY=VALUE ...]
    python bench/kp_experiments.py fits --data DIR --num N --out FITS.npz [--init-from MODEL.pt]
    python bench/kp_experiments.py train --data DIR --test DIR --labels gt|2d|FITS.npz [--num N] [--set ...]
    python bench/kp_experiments.py loop --data DIR --test DIR --fits0 FITS.npz --rounds 3 [--seed S] [--set ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kp_probe as kp  # noqa: E402


def settings(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        target = out
        *path, last = key.split(".")
        for p in path:
            target = target.setdefault(p, {})
        target[last] = yaml.safe_load(value)
    return out


def emit(record: dict, log: Path | None) -> None:
    record = {"time": time.strftime("%H:%M:%S"), "load": [round(x, 2) for x in os.getloadavg()], **record}
    line = json.dumps(record, default=float)
    print(line, flush=True)
    if log:
        with open(log, "a") as fh:
            fh.write(line + "\n")


def make_config(args) -> kp.KpTrainConfig:
    return kp.KpTrainConfig(**{**settings(args.set), **({"seed": args.seed} if args.seed is not None else {})})


def speed(args) -> None:
    body = kp.KpBody()
    config = make_config(args)
    n = max(config.batch_size * 4, 4096)
    rng = np.random.default_rng(0)
    keypoints = np.concatenate([rng.uniform(-0.8, 0.8, (n, 49, 2)), (rng.uniform(size=(n, 49, 1)) > 0.1)], -1).astype(np.float32)
    pose = (rng.normal(scale=0.2, size=(n, 72))).astype(np.float32)
    pose[:, 0] += np.pi
    labels = kp.labels_from_fits(pose, rng.normal(size=(n, 10)).astype(np.float32), np.ones(n, bool), np.ones(n, bool))
    config.steps = args.steps
    kp.train(kp.KpTrainConfig(**{**kp.config_dict(config), "steps": 3}), keypoints, labels, body)  # warm-up
    _, info = kp.train(config, keypoints, labels, body)
    params = sum(p.numel() for p in kp.KeypointRegressor(config.width, config.depth, config.hidden, config.n_iter).parameters())
    emit({"probe": "speed", "config": kp.config_dict(config), "params": params, "threads": torch.get_num_threads(),
          "samples_per_s": info["samples_per_s"], "samples_per_cpu_s": info["samples_per_cpu_s"],
          "seconds": info["seconds"]}, args.log)


def fits(args) -> None:
    data = kp.load_train(args.data, args.num)
    init = None
    if args.init_from:
        model = load_model(args.init_from)
        pred = kp.predict(model, data["keypoints"])
        init = {k: pred[k] for k in ("pose", "betas", "cam_t")}
    start = time.perf_counter()
    out = kp.run_fits(data["keypoints"], init, batch=args.batch)
    seconds = time.perf_counter() - start
    np.savez(args.out, **out)
    body = kp.KpBody()
    gt = kp.truth_lsp(body, data)
    quality = kp.pa_mpjpe_of(body, out["pose"], out["betas"], gt)
    init_quality = kp.pa_mpjpe_of(body, init["pose"], init["betas"], gt) if init else None
    emit({"probe": "fits", "num": len(data["keypoints"]), "init": args.init_from or "mean", "batch": args.batch,
          "threads": torch.get_num_threads(), "seconds": round(seconds, 1), "fits_per_s": round(len(data["keypoints"]) / seconds, 1),
          "fits": quality, "init_quality": init_quality, "valid": float(out["valid"].mean()),
          "betas_ok": float(out["betas_ok"].mean()), "mean_loss": float(np.mean(out["loss"][np.isfinite(out["loss"])]))}, args.log)


def load_model(path: str) -> kp.KeypointRegressor:
    payload = torch.load(path, weights_only=True)
    c = payload["config"]
    model = kp.KeypointRegressor(c["width"], c["depth"], c["hidden"], c["n_iter"], c["dropout"], encoder_norm=c["encoder_norm"])
    model.load_state_dict(payload["model"])
    return model.eval()


def save_model(model, config, path) -> None:
    torch.save({"model": model.state_dict(), "config": kp.config_dict(config)}, path)


def label_source(name: str, data: dict) -> tuple[str, dict | None]:
    if name == "gt":
        n = len(data["pose"])
        return "fits", kp.labels_from_fits(data["pose"], data["betas"], np.ones(n, bool), np.ones(n, bool))
    if name == "2d":
        return "2d", None
    f = np.load(name)
    n = len(data["pose"])
    return "fits", kp.labels_from_fits(f["pose"][:n], f["betas"][:n], f["valid"][:n], f["betas_ok"][:n])


def train_cmd(args) -> None:
    data = kp.load_train(args.data, args.num)
    test = kp.load_test(args.test)
    body = kp.KpBody()
    config = make_config(args)
    mode, labels = label_source(args.labels, data)
    config.mode = mode
    model, info = kp.train(config, data["keypoints"], labels, body, log_every=args.log_every)
    result = kp.evaluate(model, test, body)
    sub = slice(0, min(2000, len(data["keypoints"])))
    pred = kp.predict(model, data["keypoints"][sub])
    train_fit = kp.pa_mpjpe_of(body, pred["rotmat"], pred["betas"], kp.truth_lsp(body, {k: v[sub] for k, v in data.items() if k != "ids"}))
    if args.save:
        save_model(model, config, args.save)
    emit({"probe": "train", "labels": args.labels, "num": len(data["keypoints"]), "config": kp.config_dict(config),
          "test": result, "train_first2000": train_fit, "seconds": info["seconds"], "samples_per_s": info["samples_per_s"],
          "grad_norm": info["grad_norm"], "log": info["log"] if info["log"] else None}, args.log)


def loop(args) -> None:
    """Round 0 on the given round-0 fits, then rounds 1.. each fitting from the previous
    regressor, keeping the better fit, and training warm-started on the merged fits."""
    data = kp.load_train(args.data, args.num)
    test = kp.load_test(args.test)
    body = kp.KpBody()
    gt = kp.truth_lsp(body, data)
    config = make_config(args)
    config.mode = "fits"
    steps = [int(s) for s in args.round_steps.split(",")] if args.round_steps else [config.steps] * args.rounds
    f0 = np.load(args.fits0)
    n = len(data["keypoints"])
    best = {k: f0[k][:n] for k in ("pose", "betas", "cam_t", "loss", "valid", "betas_ok")}
    state = None
    rows = []
    for r in range(args.rounds):
        row = {"round": r}
        if r > 0:
            pred = kp.predict(model, data["keypoints"])
            row["pred_train"] = kp.pa_mpjpe_of(body, pred["rotmat"], pred["betas"], gt)
            start = time.perf_counter()
            new = kp.run_fits(data["keypoints"], {k: pred[k] for k in ("pose", "betas", "cam_t")}, batch=args.batch)
            row["fit_seconds"] = round(time.perf_counter() - start, 1)
            row["new_fits"] = kp.pa_mpjpe_of(body, new["pose"], new["betas"], gt)
            best = kp.merge_best(best, new)
            row["replaced"] = round(best.pop("_replaced"), 3)
        row["fits"] = kp.pa_mpjpe_of(body, best["pose"], best["betas"], gt)
        row["valid"] = round(float(best["valid"].mean()), 4)
        labels = kp.labels_from_fits(best["pose"], best["betas"], best["valid"], best["betas_ok"])
        rc = kp.KpTrainConfig(**{**kp.config_dict(config), "steps": steps[r]})
        if r > 0 and args.lr_later:
            rc.lr = args.lr_later
        model, info = kp.train(rc, data["keypoints"], labels, body, init_state=state if args.warm else None)
        state = model.state_dict()
        if args.save:
            np.savez(f"{args.save}_fits{r}.npz", **best)
            save_model(model, rc, f"{args.save}_model{r}.pt")
        row["train_seconds"] = info["seconds"]
        row["grad_norm"] = info["grad_norm"]
        row["test"] = kp.evaluate(model, test, body)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    emit({"probe": "loop", "num": n, "config": kp.config_dict(config), "steps": steps, "warm": args.warm,
          "lr_later": args.lr_later, "rounds": rows}, args.log)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["speed", "fits", "train", "loop"])
    parser.add_argument("--data")
    parser.add_argument("--test")
    parser.add_argument("--num", type=int)
    parser.add_argument("--labels", default="gt")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out")
    parser.add_argument("--save")
    parser.add_argument("--init-from")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--fits0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps")
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--lr-later", type=float, default=0.0)
    parser.add_argument("--log-every", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("/work/kpdata/results.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"speed": speed, "fits": fits, "train": train_cmd, "loop": loop}[args.command](args)


if __name__ == "__main__":
    main()
