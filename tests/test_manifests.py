"""Cluster jobs: RayJob manifests against KubeRay's CRD schema, their entrypoints against the real
CLI, and the image's Dockerfile against the pinned Ray version."""
from __future__ import annotations

import configparser
import copy
import fnmatch
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from pipeline import manifests as m
from pipeline.cli import cli, main

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayjobs.yaml"
EXAMPLES = sorted((ROOT / "manifests").glob("*.yaml"))
S3 = dict(data="s3://spin/samples", run="s3://spin/runs/exp1", mlflow_uri="http://mlflow.mlflow:5000")
PVC = dict(data="/mnt/spin/samples", run="/mnt/spin/runs/exp1", mlflow_uri="http://mlflow:5000",
           volumes=["spin-data:/mnt/spin", "smpl-models:/models:ro"], config="/mnt/spin/runs/exp1/config.yaml")


# --- a RayJob validator: the CRD's v1 schema, as strict as `kubectl apply` -------------------------

def _strict(schema: dict) -> dict:
    """Unknown fields become errors (kubectl's default strict field validation), except where the
    schema keeps them (x-kubernetes-preserve-unknown-fields) or gives no properties at all."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: items of a `set` are unique; items of a `map` are unique by their keys."""
    import jsonschema

    if not isinstance(instance, list):
        return
    if list_type == "set":
        keys = [repr(item) for item in instance]
    elif list_type == "map":
        keys = [tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])) for item in instance]
    else:
        return
    dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dupes:
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {list_type}: {dupes}")


@pytest.fixture(scope="module")
def rayjob_validator():
    if not CRD.exists():
        pytest.skip(f"KubeRay's RayJob CRD is not beside the repository ({CRD}); it comes with shared/")
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    checker = jsonschema.FormatChecker()
    checker.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
    checker.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-type": _list_type})
    validator = cls(_strict(schema), format_checker=checker)

    def errors(manifest: dict) -> list[str]:
        found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
        meta = manifest.get("metadata", {})
        if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayJob":
            found.append("not a ray.io/v1 RayJob")
        name = meta.get("name", "")
        if len(name) > m.MAX_NAME_LENGTH or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            found.append(f"metadata.name {name!r}: not a DNS-1035 label of <= {m.MAX_NAME_LENGTH} characters")
        for key, value in meta.get("labels", {}).items():
            if len(value) > 63 or not re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]?", value):
                found.append(f"label {key}={value!r}: not a label value")
        return found

    return errors


def spec_of(kind: str, where: dict, **kw) -> m.JobSpec:
    steps = {"round": 2} if kind != "run" else {"rounds": 3}
    return m.JobSpec.from_dict({"kind": kind, "image": "ghcr.io/example/spin-pipeline:0.1.0",
                                **where, **steps, **kw})


def parse_entrypoint(entrypoint: str):
    """Resolve the job's command through `spin-pipeline` and parse its arguments without running it."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "spin-pipeline"
    with click.Context(cli, info_name="spin-pipeline") as root:
        command = cli.get_command(root, argv[1])
        assert command is not None, f"no spin-pipeline command {argv[1]!r}"
        return command.make_context(argv[1], argv[2:], parent=root)


# --- committed examples ---------------------------------------------------------------------------

def test_examples_cover_every_kind():
    kinds = {yaml.safe_load(p.read_text())["metadata"]["labels"]["app.kubernetes.io/component"] for p in EXAMPLES}
    assert kinds == set(m.KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_crd(path, rayjob_validator):
    assert rayjob_validator(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_exactly_what_its_header_command_renders(path, tmp_path):
    header = path.read_text().splitlines()[0]
    argv = shlex.split(header.removeprefix("# "))
    assert argv[:3] == ["spin-pipeline", "manifests", "render"]
    out = tmp_path / "out.yaml"
    result = CliRunner().invoke(cli, [*argv[1:3], "--out", str(out), *argv[3:]])
    assert result.exit_code == 0, result.output
    assert out.read_text() == path.read_text(), f"{path.name} was edited by hand; rerun its first line"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_entrypoint_parses_as_a_spin_pipeline_command(path):
    manifest = yaml.safe_load(path.read_text())
    ctx = parse_entrypoint(manifest["spec"]["entrypoint"])
    env = {e["name"]: e["value"] for e in manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
           ["spec"]["containers"][0]["env"]}
    assert {env["SPIN_DATA"], env["SPIN_RUN"]} <= set(ctx.params.values())


# --- the template ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", m.KINDS)
@pytest.mark.parametrize("where", [S3, PVC], ids=["s3", "pvc"])
@pytest.mark.parametrize("gpus", [0, 2])
def test_rendered_manifest_validates_and_its_entrypoint_parses(kind, where, gpus, rayjob_validator):
    spec = spec_of(kind, where, gpus_per_worker=gpus, workers=3, env={"MLFLOW_S3_ENDPOINT_URL": "http://minio:9000"},
                   env_secrets=["s3-credentials"], service_account="spin", namespace="research",
                   deadline_seconds=7200, extra_args=["--force"])
    text = m.render_yaml(spec)
    manifest = yaml.safe_load(text)
    assert rayjob_validator(manifest) == []
    job = manifest["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 900
    cluster = job["rayClusterSpec"]
    assert cluster["rayVersion"] == m.RAY_VERSION
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"].get(m.GPU_RESOURCE, 0) == gpus
    for pod in (cluster["headGroupSpec"]["template"], group["template"]):
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == where["mlflow_uri"]
        assert (env["SPIN_DATA"], env["SPIN_RUN"]) == (where["data"], where["run"])
        mounts = {v["mountPath"] for v in container["volumeMounts"]}
        assert {m.Volume.parse(v).mount for v in where.get("volumes", [])} <= mounts
    # the driver of train and run leaves the work-free head for a worker
    if kind != "fit":
        assert job.get("entrypointNumGpus", 0) == (1 if gpus else 0)
        assert gpus or job["entrypointNumCpus"] == 1
    ctx = parse_entrypoint(job["entrypoint"])
    assert (2 if kind != "run" else 3) in ctx.params.values()
    assert ctx.params.get("force") is True
    # the header reproduces the manifest
    argv = shlex.split(text.splitlines()[0].removeprefix("# "))
    again = CliRunner().invoke(cli, argv[1:])
    assert again.exit_code == 0, again.output
    assert again.output == text


def test_spec_round_trips_through_dict_and_rejects_unknown_keys():
    spec = spec_of("run", PVC, env={"A": "1"}, env_secrets=["s"], extra_args=["--solver", "adam"])
    assert m.JobSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(m.BadInput, match="unknown key"):
        m.JobSpec.from_dict({**spec.to_dict(), "gpus": 2})


def test_round_is_the_only_difference_between_rounds():
    one, two = (m.rayjob_manifest(spec_of("fit", S3, round=r)) for r in (1, 7))
    assert one["metadata"]["name"] == "spin-exp1-fit-r1" and two["metadata"]["name"] == "spin-exp1-fit-r7"
    flat = lambda d: yaml.safe_dump(d).replace("r1", "r7").replace("--round 1", "--round 7")  # noqa: E731
    assert flat(one) == yaml.safe_dump(two)


@pytest.mark.parametrize("run", ["s3://b/" + "Very_Long.Experiment Name " * 4, "/mnt/spin/runs/2024-01-01",
                                 "s3://b/---/", "gs://b/ÜBER"])
def test_job_names_are_valid_kubernetes_names(run):
    for kind in m.KINDS:
        spec = spec_of(kind, {**PVC, "run": run} if run.startswith("/") else {**S3, "run": run})
        name = m.job_name(spec)
        assert len(name) <= m.MAX_NAME_LENGTH and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_the_validator_rejects_what_the_api_server_would(rayjob_validator):
    good = m.rayjob_manifest(spec_of("fit", S3))
    assert rayjob_validator(good) == []
    broken = []
    for edit in (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={}),   # typo
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"),
        lambda j: j["spec"].update(ttlSecondsAfterFinished=2**31),                          # int32
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        .append({"name": "SPIN_RUN", "value": "x"}),                                        # duplicate
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        ["resources"]["limits"].update(memory="32GB"),
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda j: j["metadata"].update(name="Spin_Fit"),
    ):
        manifest = copy.deepcopy(good)
        edit(manifest)
        broken.append(rayjob_validator(manifest))
    assert all(broken), broken


@pytest.mark.parametrize("args, message", [
    (["--kind", "fit", "--round", "0", "--data", "/data/samples"], "pods do not share a local disk"),
    (["--kind", "fit", "--round", "0", "--data", "s3://b/s", "--mlflow-uri", "sqlite:///mlflow.db"], "--mlflow-uri"),
    (["--kind", "fit"], "needs --round N"),
    (["--kind", "run", "--round", "1", "--rounds", "2"], "--round applies to fit and train"),
    (["--kind", "train", "--round", "0", "--worker-memory", "32GB"], "not a Kubernetes quantity"),
    (["--kind", "train", "--round", "0", "--name", "Spin_Train"], "--name"),
    (["--kind", "train", "--round", "0", "--name", "x" * 48], "--name"),
    (["--kind", "train", "--round", "0", "--run", "/models/run", "--volume", "m:/models:ro"], "read-only"),
    (["--kind", "train", "--round", "0", "--env", "SPIN_RUN=x"], "--env SPIN_RUN"),
    (["--kind", "train", "--round", "0", "--volume", "nocolon"], "CLAIM:/mount/path"),
    (["--kind", "fit", "--round", "0", "--", "--no-such-option"], "does not parse"),
    (["--kind", "fit", "--round", "0", "--", "--solver", "newton"], "does not parse"),
])
@pytest.mark.fault("a cluster manifest with a local path, a SQLite tracking URI off a volume, options that do not parse",
                   "one-line error, exit 2")
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    base = {"--image": "img:1", "--data": "s3://b/samples", "--run": "s3://b/runs/x", "--mlflow-uri": "http://mlflow:5000"}
    missing = [a for key, value in base.items() if key not in args for a in (key, value)]
    with pytest.raises(SystemExit) as exit_:
        main(["manifests", "render", *missing, *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


# --- the image ------------------------------------------------------------------------------------

def _dockerfile() -> tuple[dict[str, str], list[str]]:
    """ARG defaults and instructions (continuation lines joined) of docker/Dockerfile."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), re.M))
    return args, lines


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], text)


def test_image_ray_version_agrees_everywhere():
    args, lines = _dockerfile()
    assert args["RAY_VERSION"] == m.RAY_VERSION
    (base,) = [_expand(ln.split()[1], args) for ln in lines if ln.startswith("FROM ")]
    assert base == f"rayproject/ray:{m.RAY_VERSION}-py311-{args['CUDA_TAG']}"
    assert re.fullmatch(r"cu\d{3}", args["CUDA_TAG"])
    body = _expand("\n".join(lines), args)
    assert f"https://download.pytorch.org/whl/{args['CUDA_TAG']}" in body  # CUDA wheels of the same CUDA
    assert f"ray[data]=={m.RAY_VERSION}" in body  # pip keeps the base image's Ray
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    (ray,) = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip().startswith("ray")]
    assert "data" in ray.extras and ray.specifier.contains(m.RAY_VERSION)
    for path in EXAMPLES:
        assert yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"]["rayVersion"] == m.RAY_VERSION


def test_image_installs_the_project_and_runs_as_ray():
    args, lines = _dockerfile()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] == f"{m.RAY_UID}:{m.RAY_GID}"  # `ray`:`users`, as the pods run
    assert all(f"--chown={m.RAY_UID}:{m.RAY_GID}" in ln for ln in lines if ln.startswith("COPY "))
    assert any(re.search(r"pip install .* \.( |$)", ln) for ln in lines if ln.startswith("RUN "))
    assert not any(re.search(r"\.pkl|SMPL_", ln) for ln in lines), "licensed models are mounted, never baked in"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a pattern also covers what is under it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_the_package_and_nothing_else():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    _, lines = _dockerfile()
    sources = [s for ln in lines if ln.startswith("COPY ") for s in ln.split()[1:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        assert not _ignored(source.strip("./") or ".", patterns), source
    for kept in ("fitting/assets/body_model.npz", "fitting/body_model.py", "trainer/assets/x.npz", "setup.cfg"):
        assert not _ignored(kept, patterns), kept
    for dropped in (".git/HEAD", ".venv/bin/python", "runs/x/round=0/fits/part-00000.parquet",
                    "fitting/__pycache__/x.pyc", "SMPL_NEUTRAL.pkl", "fitting/assets/SMPL_NEUTRAL.pkl", "mlflow.db"):
        assert _ignored(dropped, patterns), dropped


def test_docs_commands_render(tmp_path):
    """Every `manifests render` command in the README and in docs/ renders."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = re.sub(r"\\\n\s*", " ", "\n".join(page.read_text() for page in pages))
    commands = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("spin-pipeline manifests render")]
    assert commands
    for command in commands:
        argv = shlex.split(command)[1:]
        at = argv.index("--") if "--" in argv else len(argv)
        result = CliRunner().invoke(cli, [*argv[:at], "--out", str(tmp_path / "m.yaml"), *argv[at:]])
        assert result.exit_code == 0, (command, result.output)
