"""`spin-pipeline prior build|convert`: fit the built-in GMM pose prior on sampled poses; turn
SMPLify's gmm_08.pkl into the .npz that runs read."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from fitting.errors import BadInput
from fitting.pose_sampler import sample_body_poses
from fitting.priors import GMMPrior, builtin_prior_path, fit_gmm, read_prior_arrays


@click.group()
def prior() -> None:
    """Build the GMM pose prior, or convert SMPLify's gmm_08.pkl (gmm_08's format, as an .npz)."""


@prior.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .npz [default: the built-in fitting/assets/gmm_prior.npz].")
@click.option("--num-poses", type=int, default=20000, show_default=True, help="Poses to fit on.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the pose sampler and of the GMM (benchmarks use other seeds).")
@click.option("--components", type=int, default=8, show_default=True, help="Mixture components.")
@click.option("--variety", type=float, default=1.0, show_default=True, help="Pose sampler spread.")
def build(out: Path | None, num_poses: int, seed: int, components: int, variety: float) -> None:
    """Fit the GMM prior on sampled poses and save it.

    Poses come from the built-in pose sampler; scikit-learn fits a full-covariance mixture,
    saved in gmm_08's layout (means, covars, weights)."""
    if num_poses <= 0 or components <= 0:
        raise BadInput("--num-poses and --components must be positive")
    out = builtin_prior_path() if out is None else out
    poses = sample_body_poses(num_poses, np.random.default_rng(seed), variety=variety)
    arrays = fit_gmm(poses, num_components=components, seed=seed)
    prior_model = GMMPrior.from_arrays(**arrays)  # validates before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    energy = prior_model(torch.as_tensor(poses[:2000]))
    click.echo(json.dumps({
        "out": str(out), "num_poses": num_poses, "seed": seed, "components": components,
        "weights": [round(float(w), 4) for w in arrays["weights"]],
        "train_energy_median": round(float(energy.median()), 3),
    }))


@prior.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling SRC (SMPLify's gmm_08.pkl). Only numpy arrays are rebuilt; only for files you trust.")
def convert(src: Path, dst: Path, allow_pickle: bool) -> None:
    """Convert a GMM pose prior (SMPLify's gmm_08.pkl, with --allow-pickle) into an .npz DST with
    float64 means (K, 69), covars (K, 69, 69) and weights (K,), for `prior:` in a run config.
    The prior is validated before anything is written; an existing DST is never replaced."""
    if dst.suffix != ".npz":
        raise BadInput(f"{dst}: the converted prior is an .npz file")
    if dst.exists():
        raise BadInput(f"{dst} exists; nothing was written (remove it or choose another name)")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in read_prior_arrays(src, allow_pickle=allow_pickle).items()}
    GMMPrior.from_arrays(**arrays, source=str(src))  # validates: shapes, symmetric positive-definite covariances
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(dst)
    click.echo(json.dumps({"out": str(dst), "components": int(arrays["weights"].shape[0]),
                           "dim": int(arrays["means"].shape[1]), "weights_sum": round(float(arrays["weights"].sum()), 6)}))
