"""Shared CLI plumbing: consoles and the one-line error contract."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import MedmoeError
from ..runtime_contract import RuntimeOptions
from ..vocab import FLOAT_PRECISIONS, Precision

out = Console()  # results
err = Console(stderr=True)  # progress, status and errors

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a `MedmoeError` into one red line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedmoeError as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def runtime_options(*, device: str = "cpu", dtype: str | None = None, threads: int | None = None, vision_tower=None, provider: str | None = None) -> RuntimeOptions:
    """The runtime options of a command's flags, parsed in one place for every command that runs a model."""
    precision = Precision.parse(dtype, allowed=FLOAT_PRECISIONS, option="--dtype") if dtype is not None else None
    return RuntimeOptions(device=device, dtype=precision, num_threads=threads, vision_tower=vision_tower, provider=provider)


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
