"""The ``fedseg`` console command: a thin click front door over the library.

Each area contributes one module under :mod:`fedseg.commands` that exposes
``COMMANDS`` (a list of click commands or groups); they are registered here. Library
code raises :class:`fedseg_clinic.errors.FedsegError` for bad input: the root group
turns it into one line on stderr and exit code 1, with no traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import metadata

import click

from fedseg import __version__
from fedseg_clinic.errors import FedsegError

# Modules under fedseg.commands, each exposing COMMANDS. Heavy imports (TensorFlow,
# fedn) happen inside the commands, so `fedseg --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("data", "analyze", "network", "run", "privacy", "baseline",
                                     "sweep", "attack", "audit", "predict", "clinic",
                                     "seed")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    """Our version and the versions of the stack we were verified with."""
    parts = [f"fedseg {__version__}"]
    for name in ("fedn", "tensorflow", "tf-keras", "tensorflow-privacy", "dp-accounting",
                 "pydicom"):
        parts.append(f"{name} {_package_version(name)}")
    parts.append(f"python {sys.version.split()[0]}")
    return "\n".join(parts)


class FedsegGroup(click.Group):
    """Root group that reports FedsegError as one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; a FedsegError becomes one line on stderr and exit 1."""
        try:
            return super().invoke(ctx)
        except FedsegError as exc:
            click.echo(f"fedseg: error: {exc}", err=True)
            ctx.exit(1)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit(0)


@click.group(cls=FedsegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show versions of fedseg and its stack.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Federated, differentially private CT organ segmentation on FEDn."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _module_name in COMMAND_MODULES:
    for _command in importlib.import_module(f"fedseg.commands.{_module_name}").COMMANDS:
        cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fedseg")
