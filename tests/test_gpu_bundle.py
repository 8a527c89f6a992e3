"""The bundle that takes the pipeline to a bare GPU machine (bench/gpu_bundle.py) and its runner
(bench/gpu_run.sh): the lock covers every package the code imports that the GPU image lacks, and
the runner runs each step under its budget, on after a failure."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_bundle = load_bench("gpu_bundle")


def test_the_lock_covers_every_import_that_the_image_lacks():
    bundled, image = set(gpu_bundle.read_lock()), set(gpu_bundle.read_image())
    assert gpu_bundle.uncovered_imports(bundled, image) == []


def test_the_check_catches_a_package_missing_from_the_lock():
    bundled, image = set(gpu_bundle.read_lock()) - {"roma"}, set(gpu_bundle.read_image())
    problems = gpu_bundle.uncovered_imports(bundled, image)
    assert len(problems) == 1 and problems[0].startswith("roma (roma; imported by fitting/")


def test_the_check_catches_an_import_that_nothing_here_provides(tmp_path):
    for package in gpu_bundle.CODE:
        (tmp_path / package).mkdir()
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    (tmp_path / "trainer" / "a.py").write_text(
        "import json\nimport roma\nfrom trainer import b\nimport anny\nimport no_such_module.part\n")
    assert gpu_bundle.uncovered_imports({"roma"}, set(), tmp_path) == [
        "no_such_module (imported by trainer/a.py) is not installed here, so its distribution is unknown"]


def test_the_lock_pins_the_ray_installed_here_with_ray_data():
    ray = gpu_bundle.read_lock()["ray"]
    assert ray.version == metadata.version("ray")
    assert ray.extras == {"data"}


def test_the_bundle_holds_no_image_package_and_fallbacks_only_image_packages():
    image = set(gpu_bundle.read_image())
    assert set(gpu_bundle.read_lock()) & image == set()
    assert set(gpu_bundle.read_lock(gpu_bundle.FALLBACK_LOCK)) <= image


def fake_bundle(tmp_path: Path) -> Path:
    """A bundle whose site holds one module, `hello`."""
    site = tmp_path / "build" / "site"
    (site / "hello").mkdir(parents=True)
    (site / "hello" / "__init__.py").write_text("WORD = 'hi'\n")
    (tmp_path / "build" / "site-fallback").mkdir()
    bundle = tmp_path / "bundle.tar.xz"
    with tarfile.open(bundle, "w:xz") as tar:
        tar.add(site, "site")
        tar.add(tmp_path / "build" / "site-fallback", "site-fallback")
    return bundle


def test_the_runner_runs_each_step_under_its_budget_and_goes_on_after_a_failure(tmp_path):
    steps = tmp_path / "steps.txt"
    steps.write_text("# a comment\n\n"
                     "ok 30 python3 -c 'import hello; print(hello.WORD)' && command -v spin-pipeline\n"
                     "fails 30 exit 3\n"
                     "not-a-step x echo\n"
                     + "".join(f"quick{i} 30 true\n" for i in range(4))
                     + "slow 60 sleep 60\n"
                     "after 30 echo never\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "GPU_BUNDLE": str(fake_bundle(tmp_path)),
           "GPU_UNPACK_TO": str(tmp_path / "unpacked"), "GPU_RUN_BUDGET": "12",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), str(steps)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((out / "steps.json").read_text())
    rcs = {name: step["rc"] for name, step in result["steps"].items()}
    assert rcs == {"unpack": 0, "ok": 0, "fails": 3, "not-a-step": "bad-line", **{f"quick{i}": 0 for i in range(4)},
                   "slow": 124, "after": "skipped"}
    slow = result["steps"]["slow"]
    assert slow["budget_s"] <= 12 and slow["budget_s"] - 1 < slow["seconds"] < slow["budget_s"] + 5  # cut to what was left
    # 9 logs and steps.json are more than the 8 files that come back: the logs travel packed
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "steps.json"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        log = tar.extractfile("./ok.log").read().decode()
    assert log.splitlines() == ["hi", str(tmp_path / "work" / "bin" / "spin-pipeline")]
