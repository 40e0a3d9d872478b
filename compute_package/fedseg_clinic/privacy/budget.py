"""How many rounds of a planned session fit a clinic's privacy budget, before it starts.

A round that a clinic refuses for its budget leaves the combiner waiting for an update
that never comes (up to the round timeout). So the orchestrator asks first: from the
data set's ledger (every run so far, read under its lock) and the session's per-round
settings, :func:`plan_rounds` computes how many of the planned rounds, in order, keep
epsilon within the budget. A clinic that cannot afford the first round is dropped (or
the session refused); a session is shortened to what every remaining clinic affords.

The plan reads the clinic's files only (manifest, case sidecars, ledger): no TensorFlow,
no model. It predicts exactly what :meth:`fedseg_clinic.app.ClinicApp.train` will
reserve, unless another training of the same data spends in between (the clinic's
reservation then still refuses: the plan is advice, the ledger is the guard).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg_clinic.cases import read_case_meta, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy import skellam
from fedseg_clinic.privacy.accounting import (
    calibrate_noise,
    compute_epsilon_history,
    default_delta,
)
from fedseg_clinic.privacy.ledger import (
    LedgerSegment,
    PrivacyLedger,
    data_identity,
    default_anchor_path,
    default_privacy_dir,
    ledger_path,
    ledgers_in,
)
from fedseg_clinic.settings import ClinicSettings, with_local_steps, with_server_overrides


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """One clinic's outlook for a planned session.

    Attributes:
        client: The clinic's name.
        data_id: Its data set's identity (the ledger's key).
        privacy_dir: Where its ledgers are kept.
        budget: Its epsilon budget in force (a target epsilon is one; None: no limit).
        delta: The delta the budget is held at.
        spent: Epsilon already spent on this data (all runs so far).
        planned_rounds: Rounds the session plans.
        affordable_rounds: How many of them, in order, fit the budget.
        epsilon_after: Epsilon after the affordable rounds.
        reason: Why not all rounds fit ("" when they do).
    """

    client: str
    data_id: str
    privacy_dir: Path
    budget: float | None
    delta: float
    spent: float
    planned_rounds: int
    affordable_rounds: int
    epsilon_after: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        """For run.json (paths as strings, inf as a string)."""
        data = dataclasses.asdict(self)
        data["privacy_dir"] = str(self.privacy_dir)
        for key in ("spent", "epsilon_after"):
            if not math.isfinite(data[key]):
                data[key] = str(data[key])
        return data


_CALIBRATED: dict[tuple[Any, ...], float] = {}


def resolve_noise(n_patients: int, settings: ClinicSettings) -> tuple[float, float | None]:
    """The noise multiplier and epsilon budget a clinic trains with.

    With ``privacy.target_epsilon`` the noise is calibrated (dp_accounting, tighter of
    RDP and PLD) so that ``planned_rounds`` rounds of this clinic's schedule end at or
    below the target, and the target becomes the budget unless a smaller one is set; the
    ledger then enforces it. Otherwise ``noise_multiplier`` and ``epsilon_budget`` as set.
    Neither frozen weights nor K patches per patient change the analysis: one patient
    still contributes one clipped gradient per step. With ``privacy.distributed`` the
    noise multiplier is the aggregate's Skellam one (privacy/skellam.py), calibrated for
    ``planned_rounds`` full-batch releases; it does not depend on N.
    """
    t, p = settings.training, settings.privacy
    if p.target_epsilon is None:
        return p.noise_multiplier, p.epsilon_budget
    if p.planned_rounds is None:
        raise FedsegError("privacy.target_epsilon needs privacy.planned_rounds")
    delta = p.delta if p.delta is not None else default_delta(n_patients)
    if p.distributed:
        key: tuple[Any, ...] = (skellam.MECHANISM, p.planned_rounds, p.target_epsilon, delta)
        if key not in _CALIBRATED:
            _CALIBRATED[key] = skellam.calibrate(p.planned_rounds, p.target_epsilon, delta)
    else:
        key = (n_patients, t.batch_size, p.planned_rounds * t.local_steps, p.target_epsilon,
               delta)
        if key not in _CALIBRATED:  # a few seconds of PLD work: once per schedule
            _CALIBRATED[key] = calibrate_noise(n_patients, t.batch_size, key[2],
                                               p.target_epsilon, delta)
    budget = p.target_epsilon if p.epsilon_budget is None else min(p.epsilon_budget,
                                                                   p.target_epsilon)
    return _CALIBRATED[key], budget


def check_privacy_floor(n_patients: int, clinic: ClinicSettings, merged: ClinicSettings
                        ) -> None:
    """Refuse server settings that would weaken the clinic's own privacy settings.

    The server may send per-round settings (SERVER_KEYS), but a clinic's privacy settings
    are a floor it alone can lower: the server may switch DP on, add noise, lower the
    budget or delta, never the reverse. Compared on what training would use (the noise a
    target epsilon calibrates, the budget it implies, the default delta 1/(10 N)).

    Args:
        n_patients: the clinic's training patients.
        clinic: the clinic's own settings.
        merged: the same with the server's settings applied.

    Raises:
        FedsegError: one line naming the setting, both values and the rule.
    """
    own, asked = clinic.privacy, merged.privacy

    def refuse(what: str) -> FedsegError:
        return FedsegError(f"server settings would weaken {clinic.client_name}'s privacy: "
                           f"{what} (the clinic's privacy settings are a floor)")

    if not own.enabled:
        return
    if not asked.enabled:
        raise refuse("dp off")
    own_sigma, own_budget = resolve_noise(n_patients, clinic)
    sigma, budget = resolve_noise(n_patients, merged)
    if sigma < own_sigma:
        raise refuse(f"noise_multiplier {sigma:.4g} < {own_sigma:.4g}")
    if own_budget is not None and (budget is None or budget > own_budget):
        raise refuse(f"epsilon budget {budget} > {own_budget:g}")
    own_delta = own.delta if own.delta is not None else default_delta(n_patients)
    delta = asked.delta if asked.delta is not None else default_delta(n_patients)
    if delta > own_delta:
        raise refuse(f"delta {delta:g} > {own_delta:g}")


def training_patients(data_dir: Path) -> list[str]:
    """Pseudonyms of the training cases a clinic trains on (as ``load_cases`` picks them)."""
    manifest = read_manifest(data_dir)
    out = []
    for entry in manifest.split("train"):
        meta = read_case_meta(data_dir / entry.case_id)
        if meta.labelled_organs:  # load_cases skips the others: they are never trained on
            out.append(meta.patient_pseudonym)
    if not out:
        raise FedsegError(f"{data_dir}: no training case with a labelled organ")
    return out


def plan_rounds(settings: ClinicSettings, round_settings: Sequence[Mapping[str, Any]]
                ) -> BudgetPlan:
    """How many of the planned rounds fit this clinic's budget (see module doc).

    Args:
        settings: The clinic's resolved settings (data_dir, privacy_dir, privacy, training).
        round_settings: The server's settings of each planned round (one mapping per
            round; empty mappings for a session without per-round settings).

    Returns:
        The plan. A round without DP (privacy off) spends nothing on the ledger and
        always "fits" (its epsilon is infinite; that is the experiment's choice).

    Raises:
        FedsegError: Unreadable data, a broken ledger, or bad settings.
    """
    if settings.data_dir is None:
        raise FedsegError(f"{settings.client_name}: no data folder")
    patients = training_patients(settings.data_dir)
    n = len(patients)
    data_id = data_identity(patients)
    privacy_dir = settings.privacy_dir or default_privacy_dir(settings.data_dir)
    p = settings.privacy
    delta = p.delta if p.delta is not None else default_delta(n)
    planned = len(round_settings)
    if not p.enabled:
        return BudgetPlan(settings.client_name, data_id, privacy_dir, p.epsilon_budget, delta,
                          math.inf, planned, planned, math.inf, "")
    path = ledger_path(privacy_dir, data_id)
    history = []
    if path.exists() or default_anchor_path(path).exists() or ledgers_in(privacy_dir):
        # Verifies every ledger of the folder (a broken one refuses here already).
        ledger = PrivacyLedger(path, data_id, delta, None)
        history = [s.privacy_segment() for s in ledger.history()]
    spent = compute_epsilon_history(history, delta).epsilon
    affordable, epsilon_after, reason = 0, spent, ""
    # The budget in force: a target epsilon is one too (what the ledger will hold).
    _, in_force = resolve_noise(n, with_local_steps(settings, n))
    for k, server in enumerate(round_settings, start=1):
        s = with_local_steps(with_server_overrides(settings, server), n)
        check_privacy_floor(n, with_local_steps(settings, n), s)
        if not s.privacy.enabled:
            affordable += 1
            continue
        t, rp = s.training, s.privacy
        if t.batch_size > n:
            raise FedsegError(f"{settings.client_name}: batch_size {t.batch_size} is larger "
                              f"than the {n} training patients of {settings.data_dir}")
        # The same noise and budget the clinic's training will use (target_epsilon
        # calibrates them), so the plan predicts what ClinicApp.train reserves.
        sigma, budget = resolve_noise(n, s)
        if rp.distributed:
            # The recorded variance does not depend on the round's clinics or m (only the
            # share does), so one clinic and one share predict the ledger exactly.
            segment = LedgerSegment.for_distributed(f"planned-{k}", n, sigma,
                                                    rp.l2_norm_clip, 1, 1)
        else:
            segment = LedgerSegment.for_schedule(f"planned-{k}", n, t.batch_size,
                                                 t.local_steps, sigma, rp.l2_norm_clip)
        trial = [*history, segment.privacy_segment()]
        epsilon = compute_epsilon_history(trial, delta, n_patients=n).epsilon
        if budget is not None and epsilon > budget:
            reason = (f"round {k} would bring epsilon of data set {data_id} from "
                      f"{epsilon_after:.4g} to {epsilon:.4g} > budget {budget:g} at "
                      f"delta={delta:g} (spent before this run: {spent:.4g}; ledgers in "
                      f"{privacy_dir})")
            break
        history, affordable, epsilon_after = trial, affordable + 1, epsilon
    return BudgetPlan(settings.client_name, data_id, privacy_dir, in_force, delta,
                      spent, planned, affordable, epsilon_after, reason)
