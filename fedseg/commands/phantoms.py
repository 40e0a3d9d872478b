"""``fedseg data phantoms``: synthetic multi-clinic thoracic CT benchmark."""

from __future__ import annotations

import click


@click.command()
def phantoms() -> None:
    """Generate synthetic thoracic CT clinics (work in progress)."""
    raise click.ClickException("not implemented yet")
