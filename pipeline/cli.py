"""The `spin-pipeline` command.

Subcommands live next to the code they drive and are imported only when invoked, so that
`spin-pipeline --help` answers at once without importing torch or Ray.
"""
from __future__ import annotations

import importlib
import sys

import click

from fitting.errors import BadInput
from pipeline.console import set_verbose

# name -> ("module:attribute", one-line help shown by `spin-pipeline --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipeline.demo:demo", "The whole loop on the built-in benchmark, in minutes on a CPU."),
    "data": ("trainer.data.cli:data", "Make the synthetic benchmark, ingest datasets into a data root, show it."),
    "fit": ("pipeline.fit_stage:fit", "One SMPLify round over the sample shards on Ray."),
    "train": ("pipeline.rounds:train", "Train regressor N on round N's best-fit table."),
    "run": ("pipeline.rounds:run", "The alternating driver: fit 0, train 0, fit 1, ...; resumes."),
    "eval": ("pipeline.rounds:evaluate", "MPJPE, PA-MPJPE, PCK/AUC and segmentation on a test split."),
    "ablation": ("pipeline.ablation:ablation", "2D-only vs static fits vs in the loop (the paper's Table 1)."),
    "compare": ("pipeline.tracking:compare", "MLflow runs side by side."),
    "predict": ("pipeline.predict:predict_command", "A run's regressor (optionally refined by SMPLify) on new images."),
    "export": ("pipeline.export:export", "Fits out: SPIN's static-fits .npy per dataset, or an .npz."),
    "body-model": ("fitting.body_cli:body_model", "Build, convert, inspect and render body models."),
    "prior": ("fitting.prior_cli:prior", "Build the GMM pose prior; convert SMPLify's gmm_08.pkl."),
    "manifests": ("pipeline.manifests:manifests", "KubeRay RayJob manifests for a round or a run."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spin-pipeline")
@click.option("-v", "--verbose", is_flag=True,
              help="Show Ray's, Ray Data's and MLflow's own logs too (else Ray's go to RUN/logs/ray.log).")
def cli(verbose: bool) -> None:
    """spin-pipeline: SPIN's fitting-in-the-loop as an offline pipeline.

    Ray workers fit SMPL to 2D keypoints (SMPLify, initialized by the current regressor) and
    write best-fit tables; the regressor is retrained on them, round after round; MLflow tracks
    every step. Start with `spin-pipeline demo`.
    """
    set_verbose(verbose)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="spin-pipeline", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (BadInput, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(2)


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    main()
