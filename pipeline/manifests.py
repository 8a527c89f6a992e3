"""KubeRay `RayJob` manifests for a fit round, a train round or a full run.

One template, `rayjob_manifest(spec)`, renders every manifest; the round, the image and the
locations are parameters. `spin-pipeline manifests render` writes it as YAML whose first line is
the exact command that reproduces it, so a committed example is never edited by hand.

The Ray cluster of each job lives only as long as the job (`shutdownAfterJobFinishes`). Its head
takes no work (`num-cpus: 0`, `num-gpus: 0`): fit actors run on the GPU worker group, and the train
and run drivers reserve a GPU for themselves (`entrypointNumGpus`), which places them on a worker.
Data, run directory and MLflow server must be reachable from every pod: object storage URIs, or
absolute paths on a mounted PersistentVolumeClaim.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from fitting.errors import BadInput
from fitting.settings import Settings, from_mapping, to_mapping
from pipeline.cli import cli
from pipeline.config import key_value_pairs

RAY_VERSION = "2.60.0"  # the Ray of docker/Dockerfile's base image; a test keeps the two equal
KINDS = ("fit", "train", "run")
MAX_NAME_LENGTH = 47    # KubeRay appends 6 characters to name the cluster, which must fit in 53
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
GPU_RESOURCE = "nvidia.com/gpu"

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")      # DNS-1035: RayJob names
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # claims, secrets, accounts
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_RESERVED_ENV = ("SPIN_DATA", "SPIN_RUN", "MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class Volume:
    """A PersistentVolumeClaim mounted at the same path in every pod of the job."""

    claim: str
    mount: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> "Volume":
        """'CLAIM:/mount/path' or 'CLAIM:/mount/path:ro'."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise BadInput(f"--volume {text!r}: expected CLAIM:/mount/path[:ro]")
        return cls(parts[0], parts[1], len(parts) == 3 and parts[2] == "ro")

    def __str__(self) -> str:
        return f"{self.claim}:{self.mount}{':ro' if self.read_only else ''}"


@dataclass
class JobSpec(Settings):
    """Everything one RayJob manifest depends on. Quantities are Kubernetes quantities."""
    SECTION = "job spec"

    kind: str
    image: str
    data: str
    run: str
    mlflow_uri: str
    round: int | None = None          # fit and train
    rounds: int | None = None         # run
    config: str | None = None         # a run YAML as seen from inside the pods
    workers: int = 1
    gpus_per_worker: int = 1          # 0: a CPU-only worker group (small test clusters)
    worker_cpus: str = "8"
    worker_memory: str = "32Gi"
    head_cpus: str = "2"
    head_memory: str = "8Gi"
    volumes: list[Volume] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_secrets: list[str] = field(default_factory=list)
    service_account: str | None = None
    namespace: str | None = None
    name: str | None = None           # None: derived from the run location, kind and round
    ttl_seconds: int = 900
    retries: int = 1
    deadline_seconds: int | None = None
    extra_args: list[str] = field(default_factory=list)  # appended to the entrypoint as given

    def to_dict(self) -> dict[str, Any]:
        return {**to_mapping(self), "volumes": [str(v) for v in self.volumes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> "JobSpec":
        """Volumes may be given as 'CLAIM:/mount[:ro]' text; the spec is validated."""
        volumes = [v if isinstance(v, Volume) else Volume.parse(v) for v in dict(data).get("volumes", [])]
        spec = from_mapping(cls, {**data, "volumes": volumes}, where or cls.SECTION)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise BadInput for anything the cluster would reject or run wrongly."""
        if self.kind not in KINDS:
            raise BadInput(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "run":
            if self.rounds is None or self.rounds < 1:
                raise BadInput("--kind run needs --rounds K (K >= 1)")
            if self.round is not None:
                raise BadInput("--round applies to fit and train; a run takes --rounds K")
        else:
            if self.round is None or self.round < 0:
                raise BadInput(f"--kind {self.kind} needs --round N (N >= 0)")
            if self.rounds is not None:
                raise BadInput(f"--rounds applies to run; {self.kind} takes --round N")
        if not self.image or any(c.isspace() for c in self.image):
            raise BadInput(f"--image {self.image!r}: expected an image reference like registry/spin-pipeline:tag")
        for option, value, low in (("--workers", self.workers, 1), ("--gpus-per-worker", self.gpus_per_worker, 0),
                                   ("--ttl", self.ttl_seconds, 0), ("--retries", self.retries, 0),
                                   ("--deadline", self.deadline_seconds or 1, 1)):
            if value < low:
                raise BadInput(f"{option} {value}: must be >= {low}")
        for option, value in (("--worker-cpus", self.worker_cpus), ("--head-cpus", self.head_cpus)):
            _check_quantity(option, value, memory=False)
        for option, value in (("--worker-memory", self.worker_memory), ("--head-memory", self.head_memory)):
            _check_quantity(option, value, memory=True)
        mounts = [v.mount for v in self.volumes]
        for v in self.volumes:
            _check_name("--volume claim", v.claim)
            if not v.mount.startswith("/") or v.mount in ("/", "/dev/shm") or mounts.count(v.mount) > 1:
                raise BadInput(f"--volume {v}: the mount path must be absolute, unique, not / or /dev/shm")
        _check_location("--data", self.data, self.volumes)
        _check_location("--run", self.run, self.volumes, writable=True)
        if self.config is not None:
            _check_location("--config", self.config, self.volumes)
        _check_tracking_uri(self.mlflow_uri, self.volumes)
        for key in self.env:
            if not _ENV_NAME.match(key) or key in _RESERVED_ENV:
                raise BadInput(f"--env {key}: expected NAME=VALUE with a shell-safe NAME other than "
                               f"{', '.join(_RESERVED_ENV)} (those come from --data, --run, --mlflow-uri)")
        for option, value in [("--env-secret", n) for n in self.env_secrets] + [
                ("--service-account", self.service_account), ("--namespace", self.namespace)]:
            if value is not None:
                _check_name(option, value)
        if self.name is not None and (len(self.name) > MAX_NAME_LENGTH or not _DNS_LABEL.match(self.name)):
            raise BadInput(f"--name {self.name!r}: lower-case letters, digits and '-', starting with a "
                           f"letter, at most {MAX_NAME_LENGTH} characters")


def _check_quantity(option: str, value: str, memory: bool) -> None:
    if not _QUANTITY.match(value) or (memory and value[-1].isdigit()):
        hint = " (memory takes a unit, e.g. 32Gi)" if memory else " (e.g. 8 or 7500m)"
        raise BadInput(f"{option} {value!r}: not a Kubernetes quantity{hint}")


def _check_name(option: str, value: str) -> None:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise BadInput(f"{option} {value!r}: not a Kubernetes object name (lower-case, digits, '-', '.')")


def _mounted(path: str, volumes: list[Volume]) -> Volume | None:
    return next((v for v in volumes if path == v.mount or path.startswith(v.mount.rstrip("/") + "/")), None)


def _check_location(option: str, value: str, volumes: list[Volume], writable: bool = False) -> None:
    """A location every pod sees alike: a URI (s3://, gs://, ...) or a path on a mounted claim."""
    if _URI.match(value) and not value.startswith("file://"):
        return
    volume = _mounted(value, volumes)
    if volume is None:
        raise BadInput(f"{option} {value}: pods do not share a local disk; use object storage "
                       f"(s3://bucket/...) or a path under a --volume CLAIM:/mount")
    if writable and volume.read_only:
        raise BadInput(f"{option} {value}: is on the read-only volume {volume}")


def _check_tracking_uri(uri: str, volumes: list[Volume]) -> None:
    if not uri:
        raise BadInput("--mlflow-uri is empty: give the team's tracking server, e.g. http://mlflow:5000")
    if uri.startswith("sqlite:///"):
        _check_location("--mlflow-uri", "/" + uri[len("sqlite:///"):].lstrip("/"), volumes, writable=True)
    elif uri.startswith("file:") or not _URI.match(uri):
        raise BadInput(f"--mlflow-uri {uri}: a local store is private to one pod; use a tracking server "
                       f"(http://...) or a database URI")


def entrypoint_argv(spec: JobSpec) -> list[str]:
    """The `spin-pipeline` command the job runs, as an argument list."""
    where = ["--data", spec.data, "--run", spec.run]
    config = ["--config", spec.config] if spec.config else []
    if spec.kind == "fit":
        # one SMPLify actor per GPU; on CPU workers the stage sizes its pool from the cluster
        actors = ["--num-actors", str(spec.workers * spec.gpus_per_worker)] if spec.gpus_per_worker else []
        argv = ["fit", "--round", str(spec.round), *where, "--ray-address", "auto", *actors]
    elif spec.kind == "train":
        argv = ["train", "--round", str(spec.round), *where,
                "--device", "cuda" if spec.gpus_per_worker > 0 else "cpu"]
    else:
        argv = ["run", "--rounds", str(spec.rounds), *where, "--ray-address", "auto"]
    return ["spin-pipeline", *argv, *config, *spec.extra_args]


def job_name(spec: JobSpec) -> str:
    """`spin-<run>-<kind>-r<N>`: the last part of the run location keeps teams' jobs apart."""
    if spec.name:
        return spec.name
    suffix = f"-{spec.kind}-r{spec.round}" if spec.kind != "run" else f"-run-k{spec.rounds}"
    tail = spec.run.rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-")
    slug = slug[: MAX_NAME_LENGTH - len("spin-") - len(suffix) - 1].strip("-")
    return f"spin-{slug}{suffix}" if slug else f"spin{suffix}"


def _labels(spec: JobSpec) -> dict[str, str]:
    step = f"r{spec.round}" if spec.kind != "run" else f"k{spec.rounds}"
    return {"app.kubernetes.io/name": "spin-pipeline", "app.kubernetes.io/component": spec.kind,
            "spin-pipeline/step": step}


def _container(spec: JobSpec, name: str, cpus: str, memory: str, gpus: int) -> dict[str, Any]:
    env = {"SPIN_DATA": spec.data, "SPIN_RUN": spec.run, "MLFLOW_TRACKING_URI": spec.mlflow_uri,
           "PYTHONUNBUFFERED": "1", **spec.env}
    resources: dict[str, Any] = {"cpu": cpus, "memory": memory}
    if gpus:
        resources[GPU_RESOURCE] = gpus
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": k, "value": v} for k, v in env.items()],
        # requests equal to limits: the Ray scheduler's view matches what the pod really has
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]
        + [{"name": f"vol-{i}", "mountPath": v.mount, "readOnly": v.read_only} for i, v in enumerate(spec.volumes)],
    }
    if spec.env_secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in spec.env_secrets]
    return container


def _pod(spec: JobSpec, container: dict[str, Any], gpu_node: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
                            "fsGroup": RAY_GID},
        "containers": [container],
        # Ray's object store and torch's data loaders live in shared memory
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        + [{"name": f"vol-{i}", "persistentVolumeClaim": {"claimName": v.claim, "readOnly": v.read_only}}
           for i, v in enumerate(spec.volumes)],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if gpu_node:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": _labels(spec)}, "spec": pod}


def rayjob_manifest(spec: JobSpec) -> dict[str, Any]:
    """The RayJob (apiVersion ray.io/v1) for `spec`, as a plain dict ready for YAML."""
    spec.validate()
    metadata: dict[str, Any] = {"name": job_name(spec), "labels": _labels(spec)}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    head = _container(spec, "ray-head", spec.head_cpus, spec.head_memory, 0)  # KubeRay adds the ports
    worker = _container(spec, "ray-worker", spec.worker_cpus, spec.worker_memory, spec.gpus_per_worker)
    job: dict[str, Any] = {
        "entrypoint": shlex.join(entrypoint_argv(spec)),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": spec.ttl_seconds,
        # a retry starts a fresh cluster; finished shards and steps are skipped on the rerun
        "backoffLimit": spec.retries,
    }
    if spec.kind in ("train", "run"):
        # the driver trains: a reserved GPU (or CPU) places it on a worker, off the head
        job["entrypointNumGpus" if spec.gpus_per_worker else "entrypointNumCpus"] = 1
    if spec.deadline_seconds is not None:
        job["activeDeadlineSeconds"] = spec.deadline_seconds
    job["rayClusterSpec"] = {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
                          "template": _pod(spec, head, gpu_node=False)},
        "workerGroupSpecs": [{
            "groupName": "gpu" if spec.gpus_per_worker else "cpu",
            "replicas": spec.workers, "minReplicas": spec.workers, "maxReplicas": spec.workers,
            "rayStartParams": {},
            "template": _pod(spec, worker, gpu_node=spec.gpus_per_worker > 0),
        }],
    }
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": job}


def _option(field_name: str) -> str:
    """The render option of a JobSpec field."""
    renamed = {"ttl_seconds": "--ttl", "deadline_seconds": "--deadline", "volumes": "--volume",
               "env_secrets": "--env-secret"}
    return renamed.get(field_name, "--" + field_name.replace("_", "-"))


def render_args(spec: JobSpec) -> list[str]:
    """The shortest `manifests render` arguments that reproduce `spec` (without --out)."""
    args: list[str] = []
    # kind and round first, for a readable header; the rest in field order
    fields = sorted(dataclasses.fields(JobSpec), key=lambda f: f.name not in ("kind", "round", "rounds"))
    for f in fields:
        value = getattr(spec, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "extra_args" or value == default:
            continue
        if f.name == "env":
            args += [a for k, v in value.items() for a in ("--env", f"{k}={v}")]
        elif isinstance(value, list):
            args += [a for v in value for a in (_option(f.name), str(v))]
        elif value is not None:
            args += [_option(f.name), str(value)]
    return args + (["--", *spec.extra_args] if spec.extra_args else [])


def render_yaml(spec: JobSpec) -> str:
    """The manifest as YAML, headed by the command that renders it."""
    command = shlex.join(["spin-pipeline", "manifests", "render", *render_args(spec)])
    body = yaml.safe_dump(rayjob_manifest(spec), sort_keys=False, width=4096)
    return (f"# {command}\n"
            f"# Rendered by spin-pipeline; change the command above and rerun it rather than editing.\n"
            f"---\n{body}")


def check_entrypoint(argv: list[str]) -> None:
    """Parse the entrypoint with the real `spin-pipeline` CLI, without running it."""
    if len(argv) < 2 or argv[0] != "spin-pipeline":
        raise BadInput(f"entrypoint {shlex.join(argv)!r}: not a spin-pipeline command")
    with click.Context(cli, info_name="spin-pipeline") as root:
        command = cli.get_command(root, argv[1])
        if command is None:
            raise BadInput(f"entrypoint: no spin-pipeline command {argv[1]!r}")
        try:
            command.make_context(argv[1], list(argv[2:]), parent=root)
        except click.UsageError as exc:
            raise BadInput(f"entrypoint {shlex.join(argv)!r} does not parse: {exc.format_message()}") from None


@click.group("manifests")
def manifests() -> None:
    """KubeRay RayJob manifests for a fit round, a train round or a full run."""


@manifests.command("render")
@click.option("--kind", type=click.Choice(KINDS), required=True, help="fit, train or run.")
@click.option("--round", "round_", type=int, help="Round N (fit and train).")
@click.option("--rounds", type=int, help="Number of rounds K (run).")
@click.option("--image", required=True, help="The image built from docker/Dockerfile, e.g. ghcr.io/team/spin-pipeline:0.1.0.")
@click.option("--data", required=True, help="Samples location seen from the pods: s3://... or a path on a --volume.")
@click.option("--run", "run_", required=True, help="Run directory seen from the pods: s3://... or a path on a --volume.")
@click.option("--mlflow-uri", required=True, help="The team's MLflow tracking server, e.g. http://mlflow.mlflow:5000.")
@click.option("--config", help="Run YAML seen from the pods (default: RUN/config.yaml when present).")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker pods.")
@click.option("--gpus-per-worker", type=int, default=1, show_default=True, help="GPUs per worker pod (0: CPU only).")
@click.option("--worker-cpus", default="8", show_default=True, help="CPU per worker pod.")
@click.option("--worker-memory", default="32Gi", show_default=True, help="Memory per worker pod.")
@click.option("--head-cpus", default="2", show_default=True, help="CPU of the head pod.")
@click.option("--head-memory", default="8Gi", show_default=True, help="Memory of the head pod.")
@click.option("--volume", "volumes", multiple=True, help="CLAIM:/mount[:ro], a PersistentVolumeClaim in every pod; repeatable.")
@click.option("--env", "env", multiple=True, help="NAME=VALUE in every container; repeatable.")
@click.option("--env-secret", "env_secrets", multiple=True, help="A Secret whose keys become env (e.g. AWS credentials); repeatable.")
@click.option("--service-account", help="Pods' service account (e.g. one bound to a cloud IAM role).")
@click.option("--namespace", help="metadata.namespace (default: kubectl's current namespace).")
@click.option("--name", help=f"RayJob name, at most {MAX_NAME_LENGTH} characters [default: spin-<run>-<kind>-r<N>].")
@click.option("--ttl", "ttl_seconds", type=int, default=900, show_default=True, help="Seconds the finished cluster is kept for logs.")
@click.option("--retries", type=int, default=1, show_default=True, help="Resubmissions after a failure (steps resume).")
@click.option("--deadline", "deadline_seconds", type=int, help="Seconds after which the job is stopped.")
@click.option("--out", default="-", show_default=True, help="Output file, or - for stdout.")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED)
def render(out: str, round_: int | None, run_: str, volumes: tuple[str, ...], env: tuple[str, ...],
           env_secrets: tuple[str, ...], extra_args: tuple[str, ...], **options: Any) -> None:
    """Render one RayJob manifest. Arguments after `--` are appended to the job's command, e.g.

    \b
    spin-pipeline manifests render --kind fit --round 1 --image IMG \\
      --data s3://b/samples --run s3://b/runs/exp1 --mlflow-uri http://mlflow:5000 \\
      --workers 4 -- --solver adam
    """
    spec = JobSpec.from_dict({**options, "round": round_, "run": run_, "volumes": list(volumes),
                              "env": key_value_pairs(env, "--env", "NAME"), "env_secrets": list(env_secrets),
                              "extra_args": list(extra_args)})
    check_entrypoint(entrypoint_argv(spec))
    text = render_yaml(spec)
    if out == "-":
        click.echo(text, nl=False)
        return
    Path(out).write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}: RayJob {job_name(spec)}", err=True)
