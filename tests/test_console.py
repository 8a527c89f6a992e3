"""A quiet console: a bar per stage and one line per step; Ray's own output only in its log file
unless `spin-pipeline --verbose`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.console import VERBOSE, is_verbose, set_verbose

RAY_NOISE = (" INFO ", "logging_progress", "core_worker", "(raylet)", "Running Dataset", "Started a local Ray")


def test_the_verbose_flag_reaches_the_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert not is_verbose()
    set_verbose(True)
    assert is_verbose() and os.environ["MLFLOW_LOGGING_LEVEL"] == "INFO"
    set_verbose(False)
    assert not is_verbose() and os.environ["MLFLOW_LOGGING_LEVEL"] == "INFO"   # a level already set stays


def test_stderr_goes_to_the_log_for_the_block_only(tmp_path):
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from pipeline.console import stderr_to\n"
        "with stderr_to(Path(sys.argv[1])) as console:\n"
        "    os.write(2, b'from C\\n')\n"
        "    print('from python', file=sys.stderr, flush=True)\n"
        "    print('bar', file=console, flush=True)\n"
        "os.write(2, b'after\\n')\n"
    )
    log = tmp_path / "logs" / "ray.log"
    result = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["from C", "from python"]
    assert result.stderr.splitlines() == ["bar", "after"]


@pytest.mark.slow
def test_a_quiet_run_is_a_line_per_step(tiny_benchmark, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in (VERBOSE, "MLFLOW_LOGGING_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--run", str(run), "--data", str(tiny_benchmark),
         "--rounds", "1", "--preset", "tiny"], capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert [line for line in lines if any(noise in line for noise in RAY_NOISE)] == []
    assert [line.split(":")[0] for line in lines[:3]] == ["fit round 0", "train round 0", "eval round 0"], lines
    assert lines[3].split() == ["round", "fit", "acc.", "fit", "PA-MPJPE", "reg", "MPJPE", "reg", "PA-MPJPE", "s"]
    success = json.loads((run / "round=0" / "fits" / "_SUCCESS.json").read_text())
    assert success["ray_log"] == str(run / "logs" / "ray.log") and (run / "logs" / "ray.log").stat().st_size > 0
