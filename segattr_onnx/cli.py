"""The ``segattr`` command: a thin layer over the Python API.

Every failure caused by the user's input is a ``SegattrError``; it is printed as one line on
stderr and the command exits with code 2, with no traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from functools import wraps

import click

from segattr_onnx import __version__
from segattr_onnx.errors import SegattrError
from segattr_onnx.inspect import inspect_model
from segattr_onnx.runtime.providers import PROVIDER_CHOICES

EXIT_BAD_INPUT = 2


def _user_errors_exit_2(command: Callable) -> Callable:
    @wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = command(*args, **kwargs)
            except SegattrError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_BAD_INPUT)
            finally:
                for warning in {str(w.message) for w in caught}:
                    click.echo(f"warning: {warning}", err=True)
        return result

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segattr")
def main() -> None:
    """Explain exported ONNX segmentation models: which input regions made the mask."""


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--input-shape",
    default=None,
    help="Input size to analyse, e.g. 1x1x128x128 (needed when the model has free dims).",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDER_CHOICES),
    default="auto",
    show_default=True,
    help="ONNX Runtime provider to report (auto = CUDA when it really works).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_user_errors_exit_2
def inspect_command(model: str, input_shape: str | None, provider: str, as_json: bool) -> None:
    """List MODEL's kernel layers, its bottleneck and decoder, input layout and outputs."""
    report = inspect_model(model, input_shape=input_shape, provider=provider)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())
