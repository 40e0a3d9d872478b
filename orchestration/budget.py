"""A run's privacy budget, decided before its session starts.

Where the ledgers are (``ledgers`` in the experiment file):

- ``data`` (the default for existing clinic folders): each clinic's ledger lives with its
  data (``<data_dir>/.fedseg-privacy``), so every run, session and network that trains
  on those patients composes into it, and ``fedseg run --overwrite`` cannot delete it.
- ``run`` (the default for experiments that generate phantoms): ``<run>/privacy/<clinic>``,
  so that runs on shared *synthetic* data (a sweep's points) stay independent. Refused
  for data that is not phantom data: real patients' budgets are never per run.

Before any process starts, :func:`decide` asks every clinic's ledger how many of the
planned rounds fit its budget (:func:`fedseg_clinic.privacy.budget.plan_rounds`):

- a clinic that cannot afford round 1 is dropped from the session, with a log line;
- if fewer clinics than ``session.min_clients`` remain, the run is refused
  (:class:`BudgetRefusedError`, exit code 3);
- the session is shortened to the rounds every remaining clinic can afford, so that no
  round is refused mid-session (a refused round would wait out the round timeout).

A secure session's FEDn round 1 only exchanges keys (docs/secure-aggregation.md): the plan
covers its rounds 2..N and the session affords one round more than its training rounds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.orchestration.experiment import DEFAULT_APP, Experiment
from fedseg_clinic.cases import read_manifest
from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

PRIVACY_DIR = "privacy"
EXIT_BUDGET = 3  # as the compute package's entry points: a refusal, not an error


class BudgetRefusedError(FedsegError):
    """No session can run: too few clinics can afford its first round.

    Attributes:
        record: run.json's ``privacy_budget`` section (plans and dropped clinics).
    """

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record or {}


@dataclasses.dataclass(frozen=True)
class BudgetDecision:
    """What the run does about the clinics' budgets.

    Attributes:
        clinics: The clinics that take part, in order.
        dropped: Clinic -> why it was dropped (cannot afford round 1).
        rounds: The rounds the session will run (<= planned).
        planned_rounds: The rounds the experiment asked for.
        plans: Clinic -> its plan (run.json form).
    """

    clinics: list[str]
    dropped: dict[str, str]
    rounds: int
    planned_rounds: int
    plans: dict[str, dict[str, Any]]

    @property
    def limited(self) -> bool:
        """True when a clinic was dropped or the session shortened."""
        return bool(self.dropped) or self.rounds < self.planned_rounds

    def to_json(self) -> dict[str, Any]:
        """run.json's ``privacy_budget`` section."""
        return {"clinics": self.clinics, "dropped": self.dropped, "rounds": self.rounds,
                "planned_rounds": self.planned_rounds, "plans": self.plans}


def run_privacy_dir(run_dir: Path, clinic: str) -> Path:
    """``<run>/privacy/<clinic>``: a clinic's ledgers under ``ledgers: run``."""
    return run_dir / PRIVACY_DIR / clinic


def check_synthetic(exp: Experiment, data_dirs: dict[str, Path]) -> None:
    """``ledgers: run`` only for phantom data (manifest ``extra.source == "phantom"``).

    Raises:
        FedsegError: A clinic folder holds other data (named).
    """
    if exp.ledgers != "run":
        return
    for name, folder in data_dirs.items():
        if read_manifest(folder).extra.get("source") != "phantom":
            raise FedsegError(
                f"{exp.source or exp.name}: ledgers: run keeps a privacy ledger per run, "
                f"which is only allowed for synthetic data; {folder} ({name}) is not phantom "
                "data (use ledgers: data)")


def client_privacy_env(exp: Experiment, run_dir: Path, clinic: str) -> dict[str, str]:
    """The FEDSEG_* variables that place a client's ledger and name the run."""
    env = {"FEDSEG_RUN_NAME": exp.name}
    if exp.ledgers == "run":
        env["FEDSEG_PRIVACY_DIR"] = str(run_privacy_dir(run_dir, clinic))
    return env


def decide(exp: Experiment, run_dir: Path, data_dirs: dict[str, Path],
           settings_files: dict[str, Path], say: Callable[[str], None]) -> BudgetDecision:
    """Plan every clinic's budget for the session (see module doc).

    Experiments with their own client app or compute package are not planned (their
    clinics may keep no fedseg ledger); they get the session as written.

    Raises:
        BudgetRefusedError: Too few clinics can afford round 1.
        FedsegError: A broken ledger or unreadable data (named).
    """
    names = list(data_dirs)
    planned = exp.session.rounds
    if exp.clients.app != DEFAULT_APP or exp.package is not None:
        return BudgetDecision(names, {}, planned, planned, {})
    from fedseg_clinic.privacy.budget import plan_rounds
    from fedseg_clinic.settings import (
        ENV_CLIENT_NAME,
        ENV_DATA_DIR,
        ENV_PRIVACY_DIR,
        ENV_SETTINGS,
        load_settings,
    )

    # FEDn round 1 of a secure session only exchanges keys: it trains and spends nothing,
    # so the plan covers rounds 2..planned and every clinic affords one round more.
    key_rounds = 1 if exp.session.secure_aggregation else 0
    round_settings = [exp.settings_for_round(k) for k in range(1 + key_rounds, planned + 1)]
    plans = {}
    for name in names:
        environ = {ENV_SETTINGS: str(settings_files[name]), ENV_DATA_DIR: str(data_dirs[name]),
                   ENV_CLIENT_NAME: name}
        privacy_env = client_privacy_env(exp, run_dir, name)
        if "FEDSEG_PRIVACY_DIR" in privacy_env:
            environ[ENV_PRIVACY_DIR] = privacy_env["FEDSEG_PRIVACY_DIR"]
        keys = " after the key-exchange round" if key_rounds else ""
        say(f"privacy budget of {name}: planning {len(round_settings)} training rounds{keys} "
            "(calibrating noise to a target epsilon takes a few seconds per clinic)")
        plan = plans[name] = plan_rounds(load_settings(environ), round_settings)
        budget = "no budget" if plan.budget is None else f"budget {plan.budget:g}"
        say(f"privacy budget of {name}: {plan.affordable_rounds} of {len(round_settings)} "
            "training rounds fit, "
            f"epsilon {plan.spent:.3g} -> {plan.epsilon_after:.3g} ({budget}, "
            f"delta {plan.delta:.2g})")
    dropped = {}
    for name, plan in plans.items():
        if plan.affordable_rounds == 0 and round_settings:
            dropped[name] = plan.reason
            say(f"{name} dropped from the session: privacy budget: {plan.reason}")
            logger.warning("%s dropped: privacy budget: %s", name, plan.reason)
    kept = [n for n in names if n not in dropped]
    as_json = {n: p.to_json() for n, p in plans.items()}
    if len(kept) < exp.session.min_clients or not kept:
        record = BudgetDecision(kept, dropped, 0, planned, as_json).to_json()
        raise BudgetRefusedError(
            f"privacy budget: {len(kept)} of {len(names)} clinics can afford round 1, the "
            f"session needs {exp.session.min_clients}; "
            + "; ".join(f"{n}: {r}" for n, r in dropped.items()), record)
    rounds = min(plans[n].affordable_rounds for n in kept) + key_rounds
    if rounds < planned:
        short = [n for n in kept if plans[n].affordable_rounds + key_rounds == rounds]
        say(f"session shortened to {rounds} of {planned} rounds: privacy budget of "
            f"{', '.join(short)}: {plans[short[0]].reason}")
        logger.warning("session shortened to %d of %d rounds (privacy budget of %s)",
                       rounds, planned, ", ".join(short))
    return BudgetDecision(kept, dropped, rounds, planned, as_json)
