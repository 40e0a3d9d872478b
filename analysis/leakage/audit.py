"""What ``fedseg audit`` measures, per noise multiplier, beside the accountant's epsilon.

The empirical epsilon lower bound (one-run canary audit) and membership inference: each
configuration trains the victim once with canaries
(:func:`fedseg.analysis.leakage.canary.run_canary_audit`) and, optionally, a membership
target with shadows (:func:`fedseg.analysis.leakage.membership.run_membership`); the
result is audit.json's content (:func:`fedseg.analysis.leakage.results.audit_row` per
configuration). Writing it is :func:`fedseg.analysis.leakage.reports.write_audit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedseg.analysis.leakage.canary import CanaryAuditConfig, run_canary_audit
from fedseg.analysis.leakage.membership import MembershipConfig, run_membership
from fedseg.analysis.leakage.results import audit_row
from fedseg_clinic.errors import FedsegError


def run_audit(noises: Sequence[float | None], canary: CanaryAuditConfig,
              membership: MembershipConfig | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Audit each noise multiplier in turn.

    Args:
        noises: noise multipliers; None = the non-private baseline.
        canary: the canary audit's settings (its noise_multiplier is replaced).
        membership: the membership attack's settings (its noise_multiplier is replaced),
            or None to skip it.
        on_row: called with each configuration's row as soon as it is done.

    Returns:
        {"rows": one :func:`audit_row` per noise, "runs": the full results per noise
        ({"canary_audit": ..., "membership": ...})}.

    Raises:
        FedsegError: no noise multiplier given.
    """
    if not noises:
        raise FedsegError("audit: give at least one noise multiplier")
    rows, runs = [], []
    for noise in noises:
        entry: dict[str, Any] = {"canary_audit": run_canary_audit(
            dataclasses.replace(canary, noise_multiplier=noise))}
        if membership is not None:
            entry["membership"] = run_membership(
                dataclasses.replace(membership, noise_multiplier=noise))
        row = audit_row(noise, entry["canary_audit"], entry.get("membership"))
        rows.append(row)
        runs.append(entry)
        if on_row is not None:
            on_row(row)
    return {"rows": rows, "runs": runs}


def bound_violations(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Noise multipliers whose empirical lower bound exceeds the accountant's epsilon.

    Beyond the audit's 1 - confidence chance, such a row means the DP code spends more
    privacy than the accountant reports.
    """
    return [r["noise_multiplier"] for r in rows
            if isinstance(r["noise_multiplier"], float)
            and math.isfinite(r["epsilon_accountant"])
            and r["epsilon_lower_bound"] > r["epsilon_accountant"]]
