"""``fedseg privacy ...``: epsilon of a DP-SGD schedule, and the noise a budget needs.

Both commands assume patient-level Poisson sampling (q = batch / patients) per step, as
the DP trainer does; ``steps`` counts every local step of every round.
"""

from __future__ import annotations

import json

import click

from fedseg_clinic.errors import FedsegError


def _total_steps(steps: int | None, rounds: int | None, local_steps: int | None) -> int:
    """--steps, or --rounds x --local-steps (exactly one of the two forms)."""
    if steps is not None:
        if rounds is not None or local_steps is not None:
            raise FedsegError("give either --steps or --rounds with --local-steps, not both")
        return steps
    if rounds is None or local_steps is None:
        raise FedsegError("give --steps, or both --rounds and --local-steps")
    if rounds < 0 or local_steps < 0:
        raise FedsegError(f"--rounds={rounds} and --local-steps={local_steps} must be >= 0")
    return rounds * local_steps


def _echo(report: dict[str, float | int | None], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    q = report["sampling_probability"]
    click.echo(f"steps {report['steps']}, sampling probability q = {q:.6g}, "
               f"noise multiplier {report['noise_multiplier']:.6g}, delta {report['delta']:g}")
    click.echo(f"epsilon (RDP) {report['epsilon_rdp']:.4f}")
    click.echo(f"epsilon (PLD) {report['epsilon_pld']:.4f}")
    click.echo(f"epsilon       {report['epsilon']:.4f}  (the tighter of the two)")


_schedule_options = [
    click.option("--patients", "n_patients", type=int, required=True,
                 help="Number of patients N at the clinic (the unit of privacy)."),
    click.option("--batch", "batch_size", type=int, required=True,
                 help="Expected batch size B (Poisson sampling, q = B/N)."),
    click.option("--steps", type=int, default=None,
                 help="Total DP-SGD steps (all rounds)."),
    click.option("--rounds", type=int, default=None, help="Rounds (with --local-steps)."),
    click.option("--local-steps", type=int, default=None, help="Local steps per round."),
    click.option("--delta", type=float, required=True, help="Target delta (< 1/N)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
]


def _with_schedule(func: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_schedule_options):
        func = option(func)
    return func


@click.group()
def privacy() -> None:
    """Differential privacy: epsilon of a schedule, noise for a budget."""


@privacy.command()
@_with_schedule
@click.option("--noise", "noise_multiplier", type=float, required=True,
              help="Noise multiplier sigma (noise std / clip norm).")
def epsilon(n_patients: int, batch_size: int, steps: int | None, rounds: int | None,
            local_steps: int | None, delta: float, as_json: bool,
            noise_multiplier: float) -> None:
    """Epsilon (RDP and PLD) spent by a DP-SGD schedule."""
    from fedseg_clinic.privacy.accounting import compute_epsilon

    total = _total_steps(steps, rounds, local_steps)
    report = compute_epsilon(n_patients, batch_size, total, noise_multiplier, delta)
    _echo(report.to_dict(), as_json)


@privacy.command()
@_with_schedule
@click.option("--epsilon", "target_epsilon", type=float, required=True,
              help="Privacy budget for the whole planned training.")
def calibrate(n_patients: int, batch_size: int, steps: int | None, rounds: int | None,
              local_steps: int | None, delta: float, as_json: bool,
              target_epsilon: float) -> None:
    """The smallest noise multiplier that keeps the whole training within --epsilon."""
    from fedseg_clinic.privacy.accounting import calibrate_noise, compute_epsilon

    total = _total_steps(steps, rounds, local_steps)
    sigma = calibrate_noise(n_patients, batch_size, total, target_epsilon, delta)
    report = compute_epsilon(n_patients, batch_size, total, sigma, delta)
    _echo(report.to_dict(), as_json)


COMMANDS: list[click.Command] = [privacy]
