"""``fedseg clinic add|revoke|list``: per-clinic tokens and the kit a clinic's IT gets."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.group()
def clinic() -> None:
    """Issue and revoke the credentials of the clinics of a network."""


@clinic.command("add")
@click.argument("name")
@click.option("--network", "root", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Network folder (the network must be up, auth on).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Kit folder to create (empty or new).")
@click.option("--days", type=click.FloatRange(0.001, 366), default=90.0, show_default=True,
              help="Days until the clinic's token expires.")
def add(name: str, root: Path, out: Path, days: float) -> None:
    """Mint a token for clinic NAME and write its kit (the token only to files)."""
    from fedseg.orchestration.network.clinics import add_clinic

    kit = add_clinic(root, name, out, lifetime_s=days * 24 * 3600)
    click.echo(f"kit for {name} in {kit} (token in fedn-client.yaml, mode 0600; "
               f"give the folder to the clinic's IT over a private channel)")


@clinic.command("revoke")
@click.argument("name")
@click.option("--network", "root", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Network folder.")
def revoke(name: str, root: Path) -> None:
    """Stop clinic NAME's token working (API server and combiners refuse it)."""
    from fedseg.orchestration.network.clinics import revoke_clinic

    revoke_clinic(root, name)
    click.echo(f"revoked {name}: its token is refused from the next request on")


@clinic.command("list")
@click.option("--network", "root", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Network folder.")
def list_clinics(root: Path) -> None:
    """Show each clinic: created, expires, revoked."""
    from fedseg.orchestration.network.clinics import load_clinics

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"

    for name, record in sorted(load_clinics(root).items()):
        click.echo(f"{name:<20} created {when(record['created_at'])}  expires "
                   f"{when(record['expires_at'])}  revoked {when(record.get('revoked_at'))}")


COMMANDS: list[click.Command] = [clinic]
