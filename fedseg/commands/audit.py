"""``fedseg audit``: empirical privacy audit beside the accountant's epsilon.

Per noise multiplier (``none`` = non-private baseline) it trains the tiny U-Net once with
canaries (Steinke et al. 2023 one-run audit) and, unless ``--no-membership``, runs the
loss-threshold and offline LiRA membership attacks; it writes audit.json, audit.png and
report.html under ``--out`` (``fedseg analyze --audit`` puts them into the run report).
The model and optimiser options default to the tiny audit model; the demo's is
``--levels 3 --base-filters 8 --groups 4 --patch 32 --optimizer adam --lr 0.01``.
"""

from __future__ import annotations

from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError


def _noises(text: str) -> list[float | None]:
    values: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "none":
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise FedsegError(f"--noise {text!r}: {part!r} is neither a number nor "
                              "'none'") from None
        if not value >= 0:
            raise FedsegError(f"--noise {text!r}: {value} must be >= 0")
        values.append(value)
    if not values:
        raise FedsegError("--noise: give at least one value")
    return values


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder (audit.json, audit.png, report.html).")
@click.option("--noise", "noise_text", default="none,2.0", show_default=True,
              help="Comma-separated noise multipliers; 'none' = non-private.")
@click.option("--canaries", type=int, default=32, show_default=True,
              help="Canary patients m (each included with probability 1/2).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--batch", "batch_size", type=int, default=8, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1.0, show_default=True)
@click.option("--clip", "l2_norm_clip", type=float, default=1.0, show_default=True)
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--confidence", type=float, default=0.95, show_default=True)
@click.option("--shadow", "n_shadow", type=int, default=3, show_default=True,
              help="Shadow models for offline LiRA.")
@click.option("--no-membership", is_flag=True, help="Skip the membership attacks.")
@click.option("--membership-batch", type=int, default=None,
              help="Expected batch of the membership target and shadows (8 members each); "
                   "default min(--batch, 8).")
@click.option("--patients", "n_patients", type=int, default=4, show_default=True,
              help="Ordinary (always included) patients beside the canaries.")
@click.option("--levels", type=int, default=2, show_default=True, help="U-Net levels.")
@click.option("--base-filters", type=int, default=4, show_default=True,
              help="U-Net channels at the first level.")
@click.option("--groups", type=int, default=8, show_default=True,
              help="U-Net GroupNormalization groups.")
@click.option("--patch", type=int, default=8, show_default=True, help="Cubic patch side.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def audit(out: Path, noise_text: str, canaries: int, steps: int, batch_size: int,
          learning_rate: float, l2_norm_clip: float, delta: float, confidence: float,
          n_shadow: int, no_membership: bool, membership_batch: int | None,
          n_patients: int, levels: int,
          base_filters: int, groups: int, patch: int, optimizer: str, seed: int) -> None:
    """Empirical epsilon lower bound (one-run canary audit) and membership AUC."""
    from fedseg.analysis.leakage import reports
    from fedseg.analysis.leakage.audit import bound_violations, run_audit
    from fedseg.analysis.leakage.canary import CanaryAuditConfig
    from fedseg.analysis.leakage.membership import MembershipConfig

    noises = _noises(noise_text)
    model = {"levels": levels, "base_filters": base_filters, "groups": groups,
             "patch": patch, "optimizer": optimizer}
    canary = CanaryAuditConfig(
        n_canaries=canaries, n_patients=n_patients, l2_norm_clip=l2_norm_clip,
        batch_size=batch_size, steps=steps, learning_rate=learning_rate, delta=delta,
        confidence=confidence, seed=seed, **model)
    member = None if no_membership else MembershipConfig(
        n_shadow=n_shadow, steps=steps, batch_size=membership_batch or min(batch_size, 8),
        learning_rate=learning_rate, l2_norm_clip=l2_norm_clip, delta=delta, seed=seed,
        **model)
    result = run_audit(noises, canary, member,
                       on_row=lambda row: click.echo(reports.format_row(row, digits=4)))
    files = reports.write_audit(out, result)
    violated = bound_violations(result["rows"])
    if violated:
        click.echo("WARNING: empirical lower bound above the accountant's epsilon for "
                   f"noise {violated}: check the DP code", err=True)
    click.echo(f"wrote {files.summary}, {files.figures[0]}, {files.html}")


COMMANDS: list[click.Command] = [audit]
