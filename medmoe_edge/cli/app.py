"""Root `medmoe-edge` Typer application: registers the commands, nothing else."""

from __future__ import annotations

import typer

from . import data_cmd, eval_cmd, export_cmd, info_cmd, init_random_cmd, run_cmd, runtimes_cmd, trace_cmd, train_cmd, verify_cmd

app = typer.Typer(
    name="medmoe-edge",
    help="Med-MoE medical vision-language model: export, quantize, run and compare on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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


def main() -> None:
    app()
