"""``fedseg data ...``: import clinic DICOM, inspect cases, generate phantom clinics."""

from __future__ import annotations

import click

from fedseg.commands.phantoms import phantoms


@click.group()
def data() -> None:
    """Clinic data: DICOM import, inspection, synthetic phantom clinics."""


data.add_command(phantoms)

COMMANDS: list[click.Command] = [data]
