"""``fedseg privacy ...``: epsilon of a schedule, the noise a budget needs, the ledgers.

``show`` and ``reset`` act on a clinic data set's privacy ledgers
(``<DATA_DIR>/.fedseg-privacy``, or ``--privacy-dir``); ``reset`` is the only way to start
a data set's accounting over, and it is logged (docs/privacy-model.md).

``epsilon`` and ``calibrate`` assume patient-level Poisson sampling (q = batch / patients)
per step, as the DP trainer does (``--full-batch``: q = 1); ``steps`` counts every local
step of every round. ``calibrate --distributed`` covers distributed DP under secure
aggregation (privacy/skellam.py): one Skellam release per round.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _batch(batch_size: int | None, n_patients: int, full_batch: bool) -> int:
    """--batch, or N with --full-batch (exactly one of the two)."""
    if full_batch:
        if batch_size is not None:
            raise FedsegError("give --batch or --full-batch, not both")
        return n_patients
    if batch_size is None:
        raise FedsegError("give --batch (or --full-batch)")
    return batch_size


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
    click.option("--batch", "batch_size", type=int, default=None,
                 help="Expected batch size B (Poisson sampling, q = B/N); required "
                      "unless --full-batch or --distributed."),
    click.option("--full-batch", is_flag=True,
                 help="Full-batch DP-GD (training.full_batch): B = N, q = 1."),
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
    """Differential privacy: epsilon of a schedule, noise for a budget, the ledgers."""


@privacy.command()
@_with_schedule
@click.option("--noise", "noise_multiplier", type=float, required=True,
              help="Noise multiplier sigma (noise std / clip norm).")
def epsilon(n_patients: int, batch_size: int | None, full_batch: bool, steps: int | None,
            rounds: int | None, local_steps: int | None, delta: float, as_json: bool,
            noise_multiplier: float) -> None:
    """Epsilon (RDP and PLD) spent by a DP-SGD schedule."""
    from fedseg_clinic.privacy.accounting import compute_epsilon

    total = _total_steps(steps, rounds, local_steps)
    report = compute_epsilon(n_patients, _batch(batch_size, n_patients, full_batch), total,
                             noise_multiplier, delta)
    _echo(report.to_dict(), as_json)


@privacy.command()
@_with_schedule
@click.option("--epsilon", "target_epsilon", type=float, required=True,
              help="Privacy budget for the whole planned training.")
@click.option("--distributed", is_flag=True,
              help="Distributed DP under secure aggregation (privacy.distributed): one "
                   "Skellam release per round (--rounds), noise shared among --clinics.")
@click.option("--clinics", type=int, default=3, show_default=True,
              help="With --distributed: clinics per round (n).")
@click.option("--honest", type=int, default=None,
              help="With --distributed: honest shares assumed (m; default the secure-"
                   "aggregation threshold).")
def calibrate(n_patients: int, batch_size: int | None, full_batch: bool, steps: int | None,
              rounds: int | None, local_steps: int | None, delta: float, as_json: bool,
              target_epsilon: float, distributed: bool, clinics: int,
              honest: int | None) -> None:
    """The smallest noise multiplier that keeps the whole training within --epsilon."""
    from fedseg_clinic.privacy.accounting import calibrate_noise, compute_epsilon

    if distributed:
        _calibrate_distributed(n_patients, steps, rounds, local_steps, delta, as_json,
                               target_epsilon, clinics, honest)
        return
    batch = _batch(batch_size, n_patients, full_batch)
    total = _total_steps(steps, rounds, local_steps)
    sigma = calibrate_noise(n_patients, batch, total, target_epsilon, delta)
    report = compute_epsilon(n_patients, batch, total, sigma, delta)
    _echo(report.to_dict(), as_json)


def _calibrate_distributed(n_patients: int, steps: int | None, rounds: int | None,
                           local_steps: int | None, delta: float, as_json: bool,
                           target_epsilon: float, clinics: int, honest: int | None) -> None:
    """``calibrate --distributed``: the aggregate's Skellam multiplier and the trust line."""
    from fedseg_clinic.privacy import skellam
    from fedseg_clinic.privacy.accounting import _check_delta

    if local_steps not in (None, 1):
        raise FedsegError("--distributed: one step per round (--local-steps 1 or none)")
    total = steps if steps is not None else rounds
    if total is None or (steps is not None and rounds is not None) or total < 1:
        raise FedsegError("--distributed: give --rounds (the training rounds), >= 1")
    if clinics < 1:
        raise FedsegError(f"--clinics={clinics} must be >= 1")
    _check_delta(delta, n_patients)
    report = skellam.compare_with_local(total, target_epsilon, delta, clinics, honest)
    report["trust"] = skellam.trust_statement(report["epsilon"], report["epsilon_if_alone"],
                                              report["honest_shares"], clinics, delta)
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    click.echo(f"{total} distributed-DP rounds (Skellam, full batch), delta {delta:g}, "
               f"{clinics} clinics, {report['honest_shares']} honest shares assumed")
    click.echo(f"noise multiplier of the aggregate {report['distributed_noise_multiplier']:.6g}"
               f" (each clinic adds std {report['distributed_share_std']:.4g} x C)")
    click.echo(f"epsilon (RDP) {report['epsilon']:.4f}")
    click.echo(report["trust"])
    click.echo(f"aggregate noise std (x C): {report['distributed_aggregate_std']:.4g} "
               f"(at least {report['distributed_aggregate_std_min']:.4g}) vs "
               f"{report['local_aggregate_std']:.4g} with local DP-GD at the same epsilon")


def _privacy_dir(data_dir: Path, privacy_dir: Path | None) -> Path:
    from fedseg_clinic.privacy.ledger import default_privacy_dir

    if privacy_dir is not None:
        return privacy_dir.resolve()
    if not data_dir.is_dir():
        raise FedsegError(f"{data_dir}: data folder does not exist")
    return default_privacy_dir(data_dir)


def _delta_for(data_dir: Path, delta: float | None) -> float:
    """--delta, else the clinics' default 1 / (10 N) of the data's training patients."""
    if delta is not None:
        if not 0.0 < delta < 1.0:
            raise FedsegError(f"--delta={delta} must be in (0, 1)")
        return delta
    from fedseg_clinic.privacy.accounting import default_delta
    from fedseg_clinic.privacy.budget import training_patients

    return default_delta(len(training_patients(data_dir)))


_ledger_options = [
    click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path)),
    click.option("--privacy-dir", type=click.Path(file_okay=False, path_type=Path),
                 default=None, help="The privacy folder, if not DATA_DIR/.fedseg-privacy."),
    click.option("--delta", type=float, default=None,
                 help="Delta to report epsilon at (default 1/(10 N) of DATA_DIR)."),
]


def _with_ledger(func: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_ledger_options):
        func = option(func)
    return func


@privacy.command()
@_with_ledger
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(data_dir: Path, privacy_dir: Path | None, delta: float | None, as_json: bool) -> None:
    """What has been spent on DATA_DIR's patients: every ledger, its rounds and epsilon."""
    from fedseg_clinic.privacy.ledger import describe_privacy_dir

    folder = _privacy_dir(data_dir, privacy_dir)
    report = describe_privacy_dir(folder, _delta_for(data_dir, delta))
    if as_json:
        click.echo(json.dumps(report, sort_keys=True, default=str))
        return
    click.echo(f"privacy folder {report['privacy_dir']} (delta {report['delta']:g})")
    for led in report["ledgers"]:
        click.echo(f"  data set {led['data_id']}: {led['rounds']} rounds, {led['steps']} "
                   f"steps, epsilon {led['epsilon']:.4f}; clients "
                   f"{', '.join(led['clients']) or '-'}; runs {', '.join(led['runs']) or '-'}"
                   f"; {led['first'] or '-'} .. {led['last'] or '-'}")
    click.echo(f"epsilon of all of them together {report['epsilon_all']:.4f} "
               "(what budget checks use)")
    for reset in report["resets"]:
        click.echo(f"  reset {reset['time']} by {reset['user']}: {reset['reason']}")


@privacy.command()
@_with_ledger
@click.option("--reason", required=True, help="Why the accounting starts over (logged).")
@click.option("--yes", is_flag=True, help="Confirm: the spent epsilon stops counting.")
def reset(data_dir: Path, privacy_dir: Path | None, delta: float | None, reason: str,
          yes: bool) -> None:
    """Start DATA_DIR's privacy accounting over (archived and logged, never silent)."""
    from fedseg_clinic.privacy.ledger import RESET_LOG, reset_ledgers

    if not yes:
        raise FedsegError("privacy reset: the spent epsilon would stop counting; add --yes "
                          "to confirm")
    folder = _privacy_dir(data_dir, privacy_dir)
    record = reset_ledgers(folder, reason, _delta_for(data_dir, delta))
    for led in record["ledgers"]:
        spent = (f"epsilon {led['epsilon']:.4f} over {led['rounds']} rounds"
                 if "epsilon" in led else f"broken: {led['broken']}")
        click.echo(f"reset data set {led['data_id']} ({spent})")
    click.echo(f"archived in {record['archive']}; logged in {folder / RESET_LOG}")


COMMANDS: list[click.Command] = [privacy]
