"""A clinic's distributed-DP round: reserve it in the ledger, build the noised integer sum.

Shared by :class:`fedseg_clinic.app.ClinicApp` and any other clinic app (the tests' toy
app): the mechanism and its accounting are in :mod:`fedseg_clinic.privacy.skellam`;
this module ties them to the clinic's settings, ledger and metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy import skellam
from fedseg_clinic.privacy.accounting import default_delta
from fedseg_clinic.privacy.budget import resolve_noise
from fedseg_clinic.privacy.ledger import LedgerSegment, PrivacyLedger
from fedseg_clinic.settings import ClinicSettings


@dataclasses.dataclass(frozen=True)
class DistributedRound:
    """One reserved distributed-DP round of one clinic.

    Attributes:
        segment: What the ledger recorded.
        epsilon: The clinic's epsilon with this round, under the trust assumption.
        epsilon_if_alone: The same if this clinic's share were the only honest one.
        honest_shares: m.
        clinics: n, the clinics keyed for the round.
        share_variance: The Skellam variance this clinic adds (mu / m).
        delta: The delta of both epsilons.
        scale: s = CLIP_UNITS / C.
    """

    segment: LedgerSegment
    epsilon: float
    epsilon_if_alone: float
    honest_shares: int
    clinics: int
    share_variance: float
    delta: float
    scale: float

    @property
    def trust(self) -> str:
        """The trust line written next to the epsilon."""
        return skellam.trust_statement(self.epsilon, self.epsilon_if_alone,
                                       self.honest_shares, self.clinics, self.delta)

    def metadata(self) -> dict[str, Any]:
        """The round's privacy metadata (numbers go to rounds.csv)."""
        return {"epsilon": self.epsilon, "epsilon_if_alone": self.epsilon_if_alone,
                "delta": self.delta, "noise_multiplier": self.segment.noise_multiplier,
                "dp_distributed": 1, "dp_mode": "distributed",
                "dp_mechanism": skellam.MECHANISM, "honest_shares": self.honest_shares,
                "secagg_clinics": self.clinics, "ddp_scale": self.scale,
                "l2_norm_clip": self.segment.l2_norm_clip, "trust": self.trust}


def reserve_round(settings: ClinicSettings, ledger_for: Any, n_patients: int, clinics: int,
                  round_id: str, client: str = "", run: str = "") -> DistributedRound:
    """Reserve one distributed-DP round in the clinic's ledger (before computing it).

    Args:
        settings: The clinic's settings, server overrides and local steps resolved.
        ledger_for: ``(delta, budget) -> PrivacyLedger`` (the clinic's ledger).
        n_patients: N, every one of whom contributes.
        clinics: n, the clinics keyed for the round.
        round_id: The round's id.
        client: Who trains (for the record).
        run: Which run (for the record).

    Raises:
        BudgetExceededError: The round would exceed the budget (nothing recorded).
        FedsegError: Settings not in distributed mode.
    """
    p = settings.privacy
    if not (p.enabled and p.distributed):
        raise FedsegError(f"{settings.client_name}: not in privacy.distributed mode")
    delta = p.delta if p.delta is not None else default_delta(n_patients)
    sigma, budget = resolve_noise(n_patients, settings)
    m = skellam.honest_shares(clinics, p.distributed_honest)
    ledger: PrivacyLedger = ledger_for(delta, budget)
    segment = LedgerSegment.for_distributed(round_id, n_patients, sigma, p.l2_norm_clip, m,
                                            clinics)
    reserved = ledger.reserve(segment, client=client, run=run)
    alone = ledger.spent_alone().epsilon
    assert segment.skellam is not None
    return DistributedRound(segment, reserved.epsilon, alone, m, clinics,
                            segment.skellam["share_variance"], delta,
                            skellam.CLIP_UNITS / p.l2_norm_clip)


def noised_sum(clipped_gradients: Iterable[np.ndarray], size: int, l2_norm_clip: float,
               share_variance: float, rng: np.random.Generator) -> np.ndarray:
    """sum_i trunc(s * g_i) + Skellam(share_variance), flat int64.

    Args:
        clipped_gradients: Each patient's clipped gradient, flat, of ``size`` values.
        size: d, the trained coordinates.
        l2_norm_clip: C.
        share_variance: This clinic's noise share.
        rng: The noise source (:func:`skellam.noise_rng`).
    """
    total = np.zeros(size, dtype=np.int64)
    for flat in clipped_gradients:
        if np.shape(flat) != (size,):
            raise FedsegError(f"patient gradient of shape {np.shape(flat)}, expected ({size},)")
        total += skellam.truncate_to_units(flat, l2_norm_clip)
    return total + skellam.sample((size,), share_variance, rng)
