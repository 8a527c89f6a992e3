#!/usr/bin/env python3
"""Checks that bench/gpu_run.sh runs on the GPU machine before the real work: the bundle's
requirements are met, its packages import, Ray starts and runs a task, a fit round finished.

    python3 bench/gpu_smoke.py deps          # every bundled requirement met by the bundle or the image
    python3 bench/gpu_smoke.py fallbacks     # (the runner) fallback folders to put first on sys.path
    python3 bench/gpu_smoke.py imports       # versions of what the pipeline imports; CUDA seen?
    python3 bench/gpu_smoke.py ray           # a local Ray: a task, a Dataset, a GPU task
    python3 bench/gpu_smoke.py gpu           # nvidia-smi
    python3 bench/gpu_smoke.py tracked RUN   # RUN's round 0 fitted and trained, and MLflow recorded it

EXPECT_GPU=0 (set by hand on a machine without one) lets the CUDA checks pass without a GPU;
by default a missing GPU fails them. Each prints JSON (or nvidia-smi's table); exit 1 on failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bundle  # noqa: E402  (beside this file)

SITE = Path(os.environ.get("SITE", "/tmp/site"))
FALLBACK = Path(os.environ.get("SITE_FALLBACK", "/tmp/site-fallback"))


def expect_gpu() -> bool:
    return os.environ.get("EXPECT_GPU", "1") != "0"


def unmet_here(site: Path = SITE) -> list[dict[str, str]]:
    """The requirements of the bundle (and of the fallbacks in use) that the packages this
    interpreter sees do not meet."""
    extras = {pin.name: pin.extras for pin in gpu_bundle.read_lock().values()}
    in_use = [p for p in sys.path if Path(p).parent == FALLBACK]
    out = []
    for dist in metadata.distributions(path=[str(site), *in_use]):
        name = canonicalize_name(dist.metadata["Name"])
        for req in gpu_bundle.applicable(dist.requires or [], extras.get(name, frozenset())):
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = ""
            if not have or not req.specifier.contains(have, prereleases=True):
                out.append({"by": name, "needs": str(req), "have": have or "missing",
                            "name": canonicalize_name(req.name)})
    return out


def deps() -> bool:
    lock = sorted(f"{pin.name}=={pin.version}" for pin in gpu_bundle.read_lock().values())
    bundled = gpu_bundle.site_manifest(SITE)
    unmet = unmet_here()
    print(json.dumps({"site": str(SITE), "bundled": len(bundled), "matches_lock": bundled == lock,
                      "fallbacks_in_use": [p for p in sys.path if Path(p).parent == FALLBACK],
                      "unmet": unmet}, indent=2))
    return bundled == lock and not unmet


def fallbacks() -> bool:
    """Print, colon-separated, the fallback folders that meet a requirement the image does not."""
    names = {item["name"] for item in unmet_here()}
    print(":".join(str(FALLBACK / name) for name in sorted(names) if (FALLBACK / name).is_dir()))
    return True


def cuda_report() -> dict:
    import torch

    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
              "cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name(0)
    return report


def imports() -> bool:
    import mlflow
    import numpy
    import pandas
    import pyarrow
    import ray
    import roma
    import smplx
    import sqlalchemy

    modules = {"ray": ray, "smplx": smplx, "roma": roma, "mlflow": mlflow, "sqlalchemy": sqlalchemy,
               "numpy": numpy, "pandas": pandas, "pyarrow": pyarrow}
    versions = {name: getattr(m, "__version__", "") or metadata.version(name) for name, m in modules.items()}
    outside = [name for name in ("ray", "smplx", "roma", "mlflow") if SITE not in Path(modules[name].__file__).parents]
    report = {"python": sys.version.split()[0], "versions": versions, "cuda": cuda_report(),
              "bundled_but_imported_from_elsewhere": outside}
    print(json.dumps(report, indent=2))
    return not outside and (report["cuda"]["cuda_available"] or not expect_gpu())


def ray_check() -> bool:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        @ray.remote
        def square(x: int) -> int:
            return x * x

        squares = ray.get([square.remote(i) for i in range(8)])
        rows = ray.data.range(1000).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
        report = {"ray": ray.__version__, "nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "squares": squares,
                  "dataset_sum": sum(r["id"] for r in rows), "resources": ray.cluster_resources()}
        ok = squares == [i * i for i in range(8)] and report["dataset_sum"] == 999_000
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # the runner keeps Ray on loopback
            ok = ok and report["nodes"] == ["127.0.0.1"]
        if report["resources"].get("GPU", 0) >= 1:
            @ray.remote(num_gpus=1)
            def on_gpu() -> dict:
                return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), **cuda_report()}

            report["gpu_task"] = ray.get(on_gpu.remote())
            ok = ok and report["gpu_task"]["cuda_available"]
        elif expect_gpu():
            ok = False
    finally:
        ray.shutdown()
    print(json.dumps(report, indent=2, default=str))
    return ok


def gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        print(json.dumps({"nvidia_smi": "not found", "expect_gpu": expect_gpu()}))
        return not expect_gpu()
    return subprocess.run(["nvidia-smi"]).returncode == 0


def tracked(run: str) -> bool:
    from mlflow.tracking import MlflowClient

    done = {step: Path(run) / "round=0" / step / "_SUCCESS.json" for step in ("fits", "model")}
    missing = [str(path) for path in done.values() if not path.is_file()]
    if missing:
        print(json.dumps({"missing": missing}))
        return False
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run).resolve() / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    report = {step: json.loads(path.read_text()) for step, path in done.items()}
    report["mlflow_runs"] = {r.info.run_name: {"status": r.info.status, "metrics": sorted(r.data.metrics)}
                             for r in runs}
    print(json.dumps(report, indent=2, default=str))
    return any(r.data.metrics for r in runs)


def main(argv: list[str]) -> int:
    checks = {"deps": deps, "fallbacks": fallbacks, "imports": imports, "ray": ray_check, "gpu": gpu, "tracked": tracked}
    if not argv or argv[0] not in checks:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if checks[argv[0]](*argv[1:]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
