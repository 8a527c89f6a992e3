"""Every command teaches its use with --help, and bad input ends in one line and exit code 2."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest

from pipeline.cli import COMMANDS, cli, main


def all_command_paths() -> list[list[str]]:
    paths = []
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        paths.append([name])
        if isinstance(command, click.Group):
            paths.extend([name, sub] for sub in command.list_commands(ctx))
    return paths


def exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.mark.parametrize("path", all_command_paths(), ids=" ".join)
def test_every_command_has_help(path, capsys):
    assert exit_code([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage:" in out and len(out.splitlines()) > 3


def test_top_level_help_lists_every_command(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["fit", "--round", "0", "--data", "/nonexistent/data", "--run", "{tmp}/run"], "data directory not found"),
    (["train", "--round", "0", "--run", "{tmp}/run2"], "no finished fits"),
    (["body-model", "info", "{tmp}/missing.npz"], "not found"),
    (["compare", "--run", "{tmp}/nothing"], "run directory not found"),
    (["ablation", "--out", "{tmp}/abl", "--train", "batch_size"], "expected KEY=VALUE"),
    (["ablation", "--out", "{tmp}/abl", "--train", "bach_size=64"], "config.train: unknown key 'bach_size'"),
    (["ablation", "--out", "{tmp}/abl", "--train", "augment=[0.5"], "not valid YAML"),
])
@pytest.mark.fault("a missing data folder, body model or run folder; no finished fits; a bad `--train` setting",
                   "one-line error, exit 2")
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "abl" / "data").exists()  # nothing rendered before the settings were checked


def test_run_reads_the_whole_config_before_any_work(tmp_path, tiny_benchmark):
    """A bad `train:` key stops `run` at once, not after fit round 0 (hours on a cluster)."""
    config = tmp_path / "config.yaml"
    config.write_text("rounds: 1\ntrain:\n  steps: 4\n  bakbone: small\n")
    run = tmp_path / "run"
    result = run_cli("run", "--run", str(run), "--data", str(tiny_benchmark), "--config", str(config))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config.train: unknown key 'bakbone' (known: "), result.stderr
    assert not (run / "round=0").exists() and not (run / "config.yaml").exists()
