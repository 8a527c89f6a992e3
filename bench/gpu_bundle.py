#!/usr/bin/env python3
"""Pack what the GPU machine's image lacks, so that spin-pipeline runs there with no network.

The image (bench/gpu_image_packages.txt) has PyTorch, pyarrow, pandas, numpy, OpenCV,
scikit-learn, click, PyYAML, ... but no Ray, smplx, roma or MLflow, and a call to the machine
carries at most 64 MiB (Ray's wheel alone is 79 MB). This script downloads the wheels pinned in
bench/gpu_bundle.lock (CPython 3.12, manylinux x86-64), checks that they and the image together
meet every run-time requirement, installs them into one site directory, drops the parts no run
reads (STRIP), and writes .gpu/bundle.tar.xz with its manifest inside and beside it. Only the
bundle and its manifest go to .gpu/, the folder that travels (`carry: [".gpu"]`); the wheels and
the unpacked site stay in .gpu-build/.

The image's list gives few versions, so a bundled package may need a newer version of an image
package than the image has (pydantic needs typing-extensions>=4.16, for one). For each image
package that a bundled one needs at a given version, a pure-Python fallback (bench/gpu_fallback.lock)
travels in its own folder; the runner puts a fallback on the path only where the image's own
version falls short (gpu_smoke.py fallbacks), so the image's packages stay in charge elsewhere.

Build, here, in the repo root (the project's venv active; needs pip and a package registry):
    bench/gpu_bundle.sh               # .gpu/bundle.tar.xz from the lock (wheels cached in .gpu-build/)
    bench/gpu_bundle.sh --relock      # resolve bench/gpu_bundle.lock again from ROOTS first
Run it there: bench/gpu_run.sh's header.
"""
from __future__ import annotations

import argparse
import ast
import configparser
import email.parser
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "bench" / "gpu_bundle.lock"
FALLBACK_LOCK = ROOT / "bench" / "gpu_fallback.lock"
IMAGE = ROOT / "bench" / "gpu_image_packages.txt"
OUT = ROOT / ".gpu"  # what travels to the device: the bundle and its manifest, nothing else
BUILD = ROOT / ".gpu-build"  # downloaded wheels and the unpacked site
MANIFEST = "BUNDLE_MANIFEST.txt"
LIMIT_MB = 60.0

# What the pipeline needs at run time that the image lacks, with the extras it uses. MLflow's
# client is mlflow-skinny (the full `mlflow` adds its server and UI); its SQLite tracking store,
# the pipeline's default, needs SQLAlchemy and Alembic, which mlflow-skinny does not require.
ROOTS = ("ray[data]", "smplx", "roma", "mlflow-skinny", "sqlalchemy", "alembic")
CODE = ("fitting", "trainer", "pipeline")  # the project's packages, scanned for what they import

# The device's interpreter, for requirement markers and wheel tags.
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Tried only for a package with no wheel above: pip matches manylinux_2_N tags exactly.
MORE_PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35))

# Parts of the installed site that no run of the pipeline reads. Each was removed and the smoke
# steps (bench/gpu_steps.txt) run again without it; sizes are printed by every build.
# Console scripts (bin/, whose #! names this machine's interpreter) and byte-code go too.
STRIP = (
    "ray/dashboard/client/build",  # the dashboard's web UI: runs start Ray without the dashboard
    "ray/jars",  # Java workers; Ray starts none when its jars are absent (services.start_raylet)
)


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    extras: frozenset[str] = field(default_factory=frozenset)

    def spec(self) -> str:
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        return f"{self.name}{extras}=={self.version}"


def read_lines(path: Path) -> list[str]:
    """Non-blank lines without `#` comments."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def read_image(path: Path = IMAGE) -> dict[str, str]:
    """Canonical name -> version ('' where the list gives none) of the image's packages."""
    image = {}
    for line in read_lines(path):
        name, _, version = line.partition("==")
        image[canonicalize_name(name)] = version
    return image


def read_lock(path: Path = LOCK) -> dict[str, Pin]:
    pins = {}
    for line in read_lines(path):
        req = Requirement(line)
        (spec,) = req.specifier  # one `==` pin per line
        pins[canonicalize_name(req.name)] = Pin(canonicalize_name(req.name), spec.version, frozenset(req.extras))
    return pins


LOCK_HEADER = ("# The packages bench/gpu_bundle.py packs for the GPU machine: what the pipeline needs at run\n"
               "# time (gpu_bundle.ROOTS) and the image (bench/gpu_image_packages.txt) lacks, with every\n"
               "# dependency that the image lacks too. Resolved by `bench/gpu_bundle.sh --relock`.\n")
FALLBACK_HEADER = ("# Pure-Python fallbacks for image packages that a bundled package needs at a given version\n"
                   "# (bench/gpu_bundle.py's docstring); the runner uses one only where the image's falls short.\n"
                   "# Resolved by `bench/gpu_bundle.sh --relock`.\n")


def write_lock(pins: dict[str, Pin], path: Path, header: str) -> None:
    path.write_text(header + "".join(pin.spec() + "\n" for pin in sorted(pins.values(), key=lambda p: p.name)))


def applicable(requires: list[str], extras: frozenset[str]) -> list[Requirement]:
    """The requirements that hold on the device for a distribution installed with `extras`."""
    out = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**TARGET_ENV, "extra": extra})
                                     for extra in extras | {""}):
            out.append(req)
    return out


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(name).decode())
    return message.get_all("Requires-Dist") or []


def pip_download(spec: str, wheels: Path) -> Path:
    """One wheel for the device (no dependencies) into `wheels`; the path pip reports for it."""
    wheels.mkdir(parents=True, exist_ok=True)
    for platforms in (PLATFORMS, PLATFORMS + MORE_PLATFORMS):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(wheels), spec]
        for platform in platforms:
            cmd[-1:-1] = ["--platform", platform]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                for prefix in ("Saved ", "File was already downloaded "):
                    if line.strip().startswith(prefix):
                        return Path(line.strip()[len(prefix):]).resolve()
            raise RuntimeError(f"pip download {spec}: no wheel named in its output:\n{done.stdout}")
    raise RuntimeError(f"pip download {spec} found no wheel for CPython 3.12 manylinux x86-64:\n{done.stderr[-2000:]}")


def cached_wheel(pin: Pin, wheels: Path) -> Path:
    for path in sorted(wheels.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name == pin.name and version == Version(pin.version):
            return path
    return pip_download(pin.spec(), wheels)


def installed_here(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def pure_here(name: str) -> bool:
    """Whether `name` is installed here from a pure-Python wheel (which fits any machine)."""
    try:
        wheel = metadata.distribution(name).read_text("WHEEL") or ""
    except metadata.PackageNotFoundError:
        return False
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return bool(tags) and all(tag.endswith("-none-any") for tag in tags)


def choose(name: str, specifier: SpecifierSet, wheels: Path) -> str:
    """The version installed here where it fits (so the bundle matches what the tests ran), else
    the newest that fits."""
    here = installed_here(name)
    if here and specifier.contains(here, prereleases=True):
        return here
    return str(parse_wheel_filename(pip_download(f"{name}{specifier}", wheels).name)[1])


def relock(image: dict[str, str], wheels: Path) -> tuple[dict[str, Pin], dict[str, Pin]]:
    """Resolve ROOTS and what they need that the image lacks; then the fallbacks."""
    pins: dict[str, Pin] = {}
    wanted_from_image: dict[str, SpecifierSet] = {}
    todo = [Requirement(root) for root in ROOTS]
    while todo:
        req = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in image:
            wanted_from_image[name] = wanted_from_image.get(name, SpecifierSet()) & req.specifier
            continue
        extras = frozenset(req.extras)
        if name in pins and extras <= pins[name].extras:
            continue
        version = pins[name].version if name in pins else choose(name, req.specifier, wheels)
        pins[name] = Pin(name, version, extras | (pins[name].extras if name in pins else frozenset()))
        todo += applicable(wheel_requires(cached_wheel(pins[name], wheels)), pins[name].extras)
    fallbacks = {}
    for name, specifier in sorted(wanted_from_image.items()):
        if str(specifier) and pure_here(name):
            fallbacks[name] = Pin(name, choose(name, specifier, wheels))
        elif str(specifier):
            print(f"no fallback for {name}{specifier}: not a pure-Python package installed here; "
                  "gpu_smoke.py deps checks it on the device", file=sys.stderr)
    return pins, fallbacks


def unmet(pins: dict[str, Pin], image: dict[str, str], fallbacks: dict[str, Pin],
          wheel_of: dict[str, Path]) -> list[str]:
    """Requirements of the bundled wheels that neither the bundle, the image nor a fallback meets.
    An image package whose version the list does not give is checked on the device (gpu_smoke.py)."""
    problems = []
    for pin in pins.values():
        for req in applicable(wheel_requires(wheel_of[pin.name]), pin.extras):
            name = canonicalize_name(req.name)
            have = pins[name].version if name in pins else image.get(name)
            fits = lambda version: req.specifier.contains(version, prereleases=True)  # noqa: E731
            if have is None:
                problems.append(f"{pin.name} needs {req}: neither bundled nor in the image")
            elif name in pins and not set(req.extras) <= pins[name].extras:
                problems.append(f"{pin.name} needs {req}: the lock lacks those extras")
            elif name in fallbacks and not fits(fallbacks[name].version):
                problems.append(f"{pin.name} needs {req}, but its fallback is {fallbacks[name].version}")
            elif have and not fits(have) and name not in fallbacks:
                problems.append(f"{pin.name} needs {req}, but {name} is {have}")
    return problems


def imported_modules(root: Path = ROOT) -> dict[str, str]:
    """Top-level module -> the first file (relative to `root`) of CODE that imports it absolutely."""
    first: dict[str, str] = {}
    for path in sorted(p for package in CODE for p in (root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                first.setdefault(module.split(".")[0], str(path.relative_to(root)))
    return first


def optional_distributions(root: Path = ROOT) -> set[str]:
    """Distributions of the project's optional extras (setup.cfg), apart from `dev`."""
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    extras = config["options.extras_require"]
    return {canonicalize_name(Requirement(line).name)
            for key in extras if key != "dev" for line in extras[key].splitlines() if line.strip()}


def uncovered_imports(bundled: set[str], image: set[str], root: Path = ROOT) -> list[str]:
    """Third-party modules that CODE imports and neither the bundle nor the image provides (module ->
    distribution as installed here; an optional extra's module is not needed on the GPU machine)."""
    distributions = metadata.packages_distributions()
    optional = optional_distributions(root)
    problems = []
    for module, where in sorted(imported_modules(root).items()):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        if module in sys.stdlib_module_names or module in CODE or (names or {canonicalize_name(module)}) & optional:
            continue
        if not names:
            problems.append(f"{module} (imported by {where}) is not installed here, so its distribution is unknown")
        elif not names & (bundled | image):
            problems.append(f"{module} ({', '.join(sorted(names))}; imported by {where}) is neither bundled nor in the image")
    return problems


def glibc_needed(wheels: list[Path]) -> str:
    """The newest glibc that one of `wheels` needs (each wheel: the oldest of its tags)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}

    def needs(platform: str) -> tuple[int, int]:
        if platform.startswith("manylinux_"):
            major, minor = platform.split("_")[1:3]
            return int(major), int(minor)
        return legacy.get(platform.rsplit("_x86_64", 1)[0], (0, 0))  # `any`: none

    newest = max(min(needs(tag.platform) for tag in parse_wheel_filename(w.name)[3]) for w in wheels)
    return f"{newest[0]}.{newest[1]}"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install(wheels: list[Path], site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--no-cache-dir",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--target", str(site)]
    for platform in PLATFORMS + MORE_PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [str(w) for w in wheels], check=True)


def strip(site: Path, paths: tuple[str, ...]) -> dict[str, int]:
    """Remove `paths` (each must exist), console scripts and byte-code from `site`; bytes removed by path."""
    removed = {}
    for rel in paths:
        path = site / rel
        if not path.exists():
            raise RuntimeError(f"nothing to strip at {rel}: update STRIP for this lock")
        removed[rel] = tree_bytes(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    generated = [("**/__pycache__", cache) for cache in site.rglob("__pycache__")]
    for key, path in generated + [("bin", site / "bin")] * (site / "bin").is_dir():
        removed[key] = removed.get(key, 0) + tree_bytes(path)
        shutil.rmtree(path)
    return removed


def site_manifest(site: Path) -> list[str]:
    """name==version of every distribution installed in `site`."""
    dists = metadata.distributions(path=[str(site)])
    return sorted(f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in dists)


def pack(folder: Path, members: list[str], out: Path, level: int) -> float:
    """`members` of `folder` as a .tar.xz; seconds taken."""
    start = time.perf_counter()
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(folder), "--sort=name", "--owner=0", "--group=0", "-cf", "-", *members],
                               stdout=subprocess.PIPE)
        subprocess.run(["xz", f"-{level}", "-T0", "-c"], stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait() != 0:
            raise RuntimeError("tar failed")
    tmp.replace(out)
    return time.perf_counter() - start


def mb(n: float) -> float:
    return round(n / 1e6, 2)


def build(args: argparse.Namespace) -> dict:
    image = read_image(args.image)
    wheels_dir = args.build / "wheels"
    if args.relock:
        pins, fallbacks = relock(image, wheels_dir)
        write_lock(pins, args.lock, LOCK_HEADER)
        write_lock(fallbacks, args.fallback_lock, FALLBACK_HEADER)
    pins, fallbacks = read_lock(args.lock), read_lock(args.fallback_lock)
    if set(pins) & set(image):
        raise RuntimeError(f"the lock bundles packages the image has: {sorted(set(pins) & set(image))}")
    if set(fallbacks) - set(image):
        raise RuntimeError(f"fallbacks for packages the image lacks: {sorted(set(fallbacks) - set(image))}")
    wheel_of = {name: cached_wheel(pin, wheels_dir) for name, pin in {**pins, **fallbacks}.items()}
    problems = uncovered_imports(set(pins), set(image)) + unmet(pins, image, fallbacks, wheel_of)
    if problems:
        raise RuntimeError("missing from the bundle:\n  " + "\n  ".join(problems))

    site, fallback_root = args.build / "site", args.build / "site-fallback"
    for folder in (site, fallback_root):
        shutil.rmtree(folder, ignore_errors=True)
    install([wheel_of[name] for name in pins], site)
    installed = tree_bytes(site)
    removed = strip(site, STRIP)
    for name in fallbacks:
        install([wheel_of[name]], fallback_root / name)
        strip(fallback_root / name, ())
    listed = site_manifest(site)
    expected = sorted(f"{pin.name}=={pin.version}" for pin in pins.values())
    if listed != expected:
        raise RuntimeError(f"installed {listed}, locked {expected}")
    glibc = glibc_needed(list(wheel_of.values()))
    manifest = (f"# spin-pipeline GPU bundle, built {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from bench/gpu_bundle.lock\n"
                f"# for CPython 3.12, x86-64 Linux with glibc >= {glibc}; stripped: {', '.join(STRIP)}, "
                "bin, __pycache__\n" + "".join(line + "\n" for line in listed)
                + "# fallbacks (site-fallback/NAME, used only where the image's version falls short):\n"
                + "".join(f"# {pin.name}=={pin.version}\n" for pin in sorted(fallbacks.values(), key=lambda p: p.name)))
    (site / MANIFEST).write_text(manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bundle.tar.xz"
    seconds = pack(args.build, [site.name, fallback_root.name], out, args.level)
    (args.out / "bundle.manifest.txt").write_text(manifest)
    largest = sorted(((tree_bytes(p), p.name) for p in site.iterdir()), reverse=True)[:12]
    report = {
        "bundle": str(out), "bundle_mb": mb(out.stat().st_size), "limit_mb": LIMIT_MB, "xz_level": args.level,
        "wheels_mb": mb(sum(wheel_of[name].stat().st_size for name in pins)),
        "installed_mb": mb(installed), "unpacked_mb": mb(tree_bytes(site)),
        "fallbacks_mb": mb(tree_bytes(fallback_root)), "stripped_mb": {k: mb(v) for k, v in removed.items()},
        "largest_unpacked_mb": {name: mb(size) for size, name in largest},
        "compress_s": round(seconds, 1), "packages": len(listed), "fallbacks": sorted(fallbacks), "glibc": glibc,
    }
    if report["bundle_mb"] > LIMIT_MB:
        raise RuntimeError(f"{out} is {report['bundle_mb']} MB, over {LIMIT_MB} MB: {json.dumps(report)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relock", action="store_true", help="resolve the locks from ROOTS first")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--fallback-lock", type=Path, default=FALLBACK_LOCK)
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--build", type=Path, default=BUILD, help="folder for wheels and the site (git-ignored)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the bundle and its manifest (git-ignored)")
    parser.add_argument("--level", type=int, default=9, choices=range(10), help="xz preset (9: smallest, slowest)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(build(args), indent=2))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    main()
