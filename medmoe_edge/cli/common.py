"""Shared CLI plumbing: consoles and the one-line error contract."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from typer.core import TyperGroup

from ..errors import MedmoeError
from ..runtime_contract import RuntimeOptions
from ..vocab import FLOAT_PRECISIONS, KvType, Precision

out = Console()  # results
err = Console(stderr=True)  # progress, status and errors


def progress_bar(*columns: Any) -> Progress:
    """A transient progress bar on stderr, shown on a terminal only: in a log or a pipe a stopped
    bar would leave a blank line before the next message (an error's one line included)."""
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


F = TypeVar("F", bound=Callable[..., Any])


_OS_FIXES = {
    errno.EACCES: "choose a writable location or fix its permissions",
    errno.EPERM: "choose a writable location or fix its permissions",
    errno.EROFS: "the filesystem is read-only: choose a location on a writable one",
    errno.ENOSPC: "the disk is full: free space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another location",
    errno.ENOENT: "check the path: a parent directory does not exist",
    errno.ENOTDIR: "a file is in the way of a directory on that path: choose another path",
    errno.EEXIST: "something is already there: choose another path",
    errno.EISDIR: "that path is a directory: give a file path",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed, on which path, and how to fix it."""
    where = f" ({e.filename})" if e.filename else ""
    fix = _OS_FIXES.get(e.errno or -1, "check the path and try again")
    return f"{e.strerror or type(e).__name__}{where}: {fix}"


def print_error(message: str) -> None:
    """The one error line on stderr, never wrapped."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def fail(message: str, kind: str, code: int, as_json: bool) -> NoReturn:
    """Print one error line on stderr (and a JSON error object on stdout for --json) and exit."""
    print_error(message)
    if as_json:
        print_json({"error": message, "kind": kind})
    raise typer.Exit(code)


# the exceptions of the click that parses our options: recent typers vendor their own copy
# (`typer._click`), whose classes are not the `click` package's; earlier ones use that package
_clicks = (getattr(typer.core, "_click", None) or typer.core.click).exceptions  # type: ignore[attr-defined]
_NoArgsIsHelp = getattr(_clicks, "NoArgsIsHelpError", ())  # click < 8.2 has none
_COMMAND = "medmoe_edge.command"  # ctx.meta key: the subcommand being parsed


class _OneLineUsageError(_clicks.ClickException):
    """A click usage error (a missing or unknown option, a bad value) shown as one line."""

    exit_code = 2

    def __init__(self, e: Any, command: str) -> None:  # a UsageError; the command it was parsing
        where = e.ctx.command_path if e.ctx is not None else command
        what = e.format_message().rstrip(".")
        helps = getattr(getattr(e, "param", None), "help", None)
        if isinstance(e, _clicks.MissingParameter) and helps:  # what the missing option wants
            what += f": {helps.rstrip('.')}"
        super().__init__(f"{what} (see `{where} --help`)")

    def show(self, file: Any = None) -> None:
        print_error(self.message)


class OneLineUsage(TyperGroup):
    """The root command group: click's own usage errors become the CLI's one-line error naming
    the fix (exit 2), not click's three-line usage block. A subcommand's options are parsed in
    this group's `invoke`, so catching there covers every command, `plan show` included."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _NoArgsIsHelp:
            raise  # no arguments: click prints the help, as asked for
        except _clicks.UsageError as e:
            raise _OneLineUsageError(e, "medmoe-edge") from None

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[_COMMAND] = f"{ctx.command_path} {name}"  # some parse errors carry no context
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _NoArgsIsHelp:
            raise
        except _clicks.UsageError as e:
            raise _OneLineUsageError(e, ctx.meta.get(_COMMAND, ctx.command_path)) from None



def user_errors(fn: F) -> F:
    """The one place where a command's failures become a one-line error and a non-zero exit, never a
    traceback: `MedmoeError` (exit 2), any OSError (an output path that cannot be written, a full disk,
    a read-only filesystem; exit 2), Ctrl-C (exit 130). With `--json` the error is also printed on
    stdout as {"error": ..., "kind": ...}."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except MedmoeError as e:
            fail(str(e), type(e).__name__, e.exit_code, as_json)
        except OSError as e:
            fail(os_error_message(e), type(e).__name__, 2, as_json)
        except KeyboardInterrupt:
            fail("interrupted", "KeyboardInterrupt", 130, as_json)

    return wrapper  # type: ignore[return-value]


# The runtime options every command that runs a model takes, declared once.
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str | None, typer.Option("--dtype", help="Compute precision of the torch runtime: float32 (default), float16 or bfloat16; a bundle computes in its own.")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", help="CPU threads [default: the usable cores minus the other runnable tasks, at least 1].")]
ProviderOption = Annotated[str | None, typer.Option("--provider", help="onnxruntime execution provider: cpu, cuda or tensorrt (never a silent fallback).")]
KvTypeOption = Annotated[str | None, typer.Option("--kv-type", help="llamacpp KV cache type: f32, f16 or q8_0 [default: f16, docs/GGUF.md].")]
VisionTowerOption = Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")]


def runtime_options(*, device: str = "cpu", dtype: str | None = None, threads: int | None = None, vision_tower=None, provider: str | None = None, kv_type: str | None = None) -> RuntimeOptions:
    """The runtime options of a command's flags, parsed in one place for every command that runs a model."""
    precision = Precision.parse(dtype, allowed=FLOAT_PRECISIONS, option="--dtype") if dtype is not None else None
    kv = KvType.parse(kv_type) if kv_type is not None else None
    return RuntimeOptions(device=device, dtype=precision, num_threads=threads, vision_tower=vision_tower, provider=provider, kv_type=kv)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)
