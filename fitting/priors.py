"""SMPLify's priors as pure, per-sample functions: the max-mixture GMM pose prior (gmm_08's
format), the elbow/knee angle prior and the shape prior.

Each prior also has a residual form r with prior = sum(r**2), so that a least-squares solver
(Gauss-Newton, Levenberg-Marquardt) minimizes exactly the energy that Adam does.
"""
from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fitting.capture_safe import constant, take
from fitting.errors import BadInput
from fitting.identity import check_identity, file_identity
from fitting.npz import read_npz

BODY_POSE_DIM = 69
# Axis-angle entries of the 69-d body pose that the angle prior watches (SMPLify's choice):
# left elbow y, right elbow y, left knee x, right knee x. A sign of +1 penalizes a positive
# angle: the elbows bend at -y (left) / +y (right) and the knees at +x, so the prior only
# punishes bending the wrong way.
ANGLE_PRIOR_INDICES: tuple[int, ...] = (52, 55, 9, 12)
ANGLE_PRIOR_SIGNS: tuple[float, ...] = (1.0, -1.0, -1.0, -1.0)


def builtin_prior_path() -> Path:
    return Path(str(resources.files("fitting") / "assets" / "gmm_prior.npz"))


def angle_prior_residuals(body_pose: torch.Tensor) -> torch.Tensor:
    """(B, 69) body pose -> (B, 4) exp(sign * angle); the angle prior is their squared sum."""
    return torch.exp(take(body_pose, ANGLE_PRIOR_INDICES, 1) * constant(ANGLE_PRIOR_SIGNS, body_pose))


def angle_prior(body_pose: torch.Tensor) -> torch.Tensor:
    """(B, 69) body pose -> (B,) unweighted sum over elbows and knees of exp(sign * angle)**2."""
    return angle_prior_residuals(body_pose).square().sum(dim=-1)


def shape_prior(betas: torch.Tensor) -> torch.Tensor:
    """(B, 10) -> (B,) unweighted ||betas||^2."""
    return betas.square().sum(dim=-1)


def validate_gmm(means: np.ndarray, covars: np.ndarray, weights: np.ndarray, source: str = "prior",
                 dim: int | None = BODY_POSE_DIM) -> None:
    """BadInput unless means (K, D), covars (K, D, D) symmetric positive definite, weights (K,)
    positive; D must equal `dim` when given."""
    means, covars, weights = np.asarray(means), np.asarray(covars), np.asarray(weights)
    if means.ndim != 2:
        raise BadInput(f"{source}: 'means' has shape {means.shape}, expected KxD")
    K, D = means.shape
    if dim is not None and D != dim:
        raise BadInput(f"{source}: 'means' has {D} dimensions, expected {dim} (the SMPL body pose)")
    if covars.shape != (K, D, D):
        raise BadInput(f"{source}: 'covars' has shape {covars.shape}, expected {K}x{D}x{D}")
    if weights.shape != (K,):
        raise BadInput(f"{source}: 'weights' has shape {weights.shape}, expected ({K},)")
    for name, arr in (("means", means), ("covars", covars), ("weights", weights)):
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise BadInput(f"{source}: '{name}' contains NaN, Inf or non-numbers")
    if np.any(weights <= 0):
        raise BadInput(f"{source}: 'weights' must be positive")
    covars = covars.astype(np.float64)
    if not np.allclose(covars, covars.transpose(0, 2, 1), rtol=1e-5, atol=1e-8):
        raise BadInput(f"{source}: 'covars' are not symmetric")
    try:
        np.linalg.cholesky(covars)
    except np.linalg.LinAlgError as exc:
        raise BadInput(f"{source}: 'covars' are not positive definite") from exc


class GMMPrior(nn.Module):
    """Max-mixture Gaussian pose prior, SMPLify's merged log-likelihood:

        prior(x) = min_k [ 0.5 (x - mu_k)^T P_k (x - mu_k) + c_k ],
        c_k = -log( w_k / ((2 pi)^(D/2) * sqrt(det C_k) / min_j sqrt(det C_j)) )

    with P_k = C_k^-1. forward(body_pose (B, D)) -> (B,).
    """

    def __init__(self, means: torch.Tensor, covars: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        cov = covars.to(torch.float64)
        precision = torch.linalg.inv(cov)
        precision = 0.5 * (precision + precision.transpose(1, 2))
        # P = L L^T, so 0.5 d^T P d = ||sqrt(0.5) L^T d||^2: the prior as a residual.
        factor = torch.linalg.cholesky(precision).transpose(1, 2)
        logdet = torch.linalg.slogdet(cov)[1]
        dim = means.shape[1]
        constants = (-torch.log(weights.to(torch.float64)) + 0.5 * dim * np.log(2.0 * np.pi)
                     + 0.5 * (logdet - logdet.min()))
        dtype = torch.float32
        self.register_buffer("means", means.to(dtype))
        self.register_buffer("covars", covars.to(dtype))
        self.register_buffer("weights", weights.to(dtype))
        self.register_buffer("precisions", precision.to(dtype))
        self.register_buffer("factors", (np.sqrt(0.5) * factor).to(dtype))
        # Always positive: -log(w) >= 0 and the other two terms are >= 0.
        self.register_buffer("constants", constants.to(dtype))
        self.identity = {"path": "arrays", "sha256": ""}  # load_prior sets the file's

    @classmethod
    def from_arrays(cls, means, covars, weights, source: str = "prior",
                    dim: int | None = BODY_POSE_DIM) -> "GMMPrior":
        """means (K, D), covars (K, D, D), weights (K,) as numpy arrays or tensors."""
        arrays = [np.asarray(a.detach().cpu() if torch.is_tensor(a) else a) for a in (means, covars, weights)]
        validate_gmm(*arrays, source=source, dim=dim)
        return cls(*(torch.as_tensor(a.astype(np.float64)) for a in arrays))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """gmm_08's layout: means (K, D), covars (K, D, D), weights (K,)."""
        return {k: getattr(self, k).detach().cpu().numpy().astype(np.float64)
                for k in ("means", "covars", "weights")}

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def mean(self) -> torch.Tensor:
        """(D,) the mixture's mean pose."""
        return self.weights @ self.means / self.weights.sum()

    def _whitened(self, body_pose: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K, D) sqrt(0.5) L_k^T (x - mu_k) for every component."""
        diff = body_pose[:, None, :] - self.means.to(body_pose.dtype)
        return torch.einsum("kij,bkj->bki", self.factors.to(body_pose.dtype), diff)

    def component_energies(self, body_pose: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K) 0.5 (x - mu_k)^T P_k (x - mu_k) + c_k."""
        return self._whitened(body_pose).square().sum(-1) + self.constants.to(body_pose.dtype)

    def forward(self, body_pose: torch.Tensor) -> torch.Tensor:
        """(B, D) body pose -> (B,) the max-mixture negative log-likelihood."""
        return self.component_energies(body_pose).min(dim=1).values

    def residuals(self, body_pose: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D + 1) residuals of the best component; their squared sum is forward()."""
        whitened = self._whitened(body_pose)
        energies = whitened.square().sum(-1) + self.constants.to(body_pose.dtype)
        best = energies.argmin(dim=1)
        rows = torch.arange(body_pose.shape[0], device=body_pose.device)
        const = self.constants.to(body_pose.dtype)[best].clamp_min(0.0).sqrt()
        return torch.cat([whitened[rows, best], const[:, None]], dim=-1)


# ---------------------------------------------------------------- loading

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other class."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
        ("_codecs", "encode"),  # how Python 3 writes array bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            if module in ("copy_reg", "__builtin__"):
                module = {"copy_reg": "copyreg", "__builtin__": "builtins"}[module]
            return super().find_class(module, name)
        raise BadInput(f"refusing to unpickle {module}.{name}: a GMM prior holds only numpy arrays")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            raw = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except BadInput:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
            IndexError, KeyError) as exc:
        raise BadInput(f"{path}: not a readable GMM pickle ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a dict with means, covars and weights, found {type(raw).__name__}")
    return raw


def read_prior_arrays(path: str | Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """means, covars, weights from a .npz (never unpickled) or, with the opt-in, a gmm_08.pkl."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"pose prior not found: {path}")
    if path.suffix == ".pkl":
        if not allow_pickle:
            raise BadInput(f"{path}: reading a pickle needs an explicit opt-in (--allow-pickle)")
        raw = _read_pickle(path)
    else:
        raw = read_npz(path, ("means", "covars", "weights"), what="pose prior")
    missing = [k for k in ("means", "covars", "weights") if k not in raw]
    if missing:
        raise BadInput(f"{path}: missing key '{missing[0]}' (expected means, covars, weights)")
    return {k: np.asarray(raw[k]) for k in ("means", "covars", "weights")}


def load_prior(path: str | Path | None = None, allow_pickle: bool = False,
               device: str | torch.device = "cpu", sha256: str | None = None) -> GMMPrior:
    """The built-in prior (path None), a user's gmm_08-format .npz, or a user's gmm_08.pkl
    (only with allow_pickle=True; numpy arrays only); with `sha256`, only that file content.
    The prior carries its file's identity (`identity`: path and sha256)."""
    path = builtin_prior_path() if path is None else Path(path)
    arrays = read_prior_arrays(path, allow_pickle=allow_pickle)
    identity = file_identity(path, "pose prior")
    check_identity(identity, sha256, "pose prior")
    prior = GMMPrior.from_arrays(arrays["means"], arrays["covars"], arrays["weights"], source=str(path))
    prior.identity = identity
    return prior.to(device)


def fit_gmm(poses: np.ndarray, num_components: int = 8, seed: int = 0,
            reg_covar: float = 1e-4, max_iter: int = 200) -> dict[str, np.ndarray]:
    """Full-covariance GMM over (N, D) poses with scikit-learn, returned in gmm_08's layout."""
    from sklearn.mixture import GaussianMixture  # heavy import, only needed to build the prior

    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[0] < num_components * (poses.shape[1] + 1):
        need = num_components * (poses.shape[-1] + 1)
        raise BadInput(f"need at least {need} poses of shape (N, D), got {poses.shape}")
    gmm = GaussianMixture(n_components=num_components, covariance_type="full", reg_covar=reg_covar,
                          max_iter=max_iter, n_init=1, init_params="kmeans", random_state=seed)
    gmm.fit(poses)
    order = np.argsort(-gmm.weights_)  # heaviest component first, for readable files
    return {"means": gmm.means_[order], "covars": gmm.covariances_[order], "weights": gmm.weights_[order]}
