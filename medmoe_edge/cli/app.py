"""Root `medmoe-edge` Typer application: registers the commands, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

from . import data_cmd, eval_cmd, export_cmd, info_cmd, init_random_cmd, run_cmd, runtimes_cmd, trace_cmd, train_cmd, verify_cmd
from . import doctor_cmd, plan_cmd
from . import bench_cmd, compare_cmd
from . import calibrate_cmd, quantize_cmd
from .common import OneLineUsage

app = typer.Typer(
    name="medmoe-edge",
    cls=OneLineUsage,
    help="Med-MoE medical vision-language model: export, quantize, run and compare on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: rich markup would swallow the "[default: ...]" notes of our help texts
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medmoe-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False) -> None:
    """Med-MoE medical vision-language model: export, quantize, run and compare on edge devices."""


app.command("run")(run_cmd.run)
app.command("info")(info_cmd.info)
app.command("runtimes")(runtimes_cmd.runtimes)
app.command("init-random")(init_random_cmd.init_random)
app.command("make-data")(data_cmd.make_data)
app.command("train-demo")(train_cmd.train_demo)
app.command("eval")(eval_cmd.eval_model)
app.command("export")(export_cmd.export)
app.command("verify")(verify_cmd.verify_cmd)
app.command("trace")(trace_cmd.trace)
app.command("doctor")(doctor_cmd.doctor)
app.add_typer(plan_cmd.plan_app, name="plan")
app.command("compare")(compare_cmd.compare_cmd)
app.command("bench")(bench_cmd.bench_cmd)
app.command("calibrate")(calibrate_cmd.calibrate_cmd)
app.command("quantize")(quantize_cmd.quantize_cmd)


def main() -> None:
    app()
