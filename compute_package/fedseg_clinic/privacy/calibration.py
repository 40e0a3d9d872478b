"""The noise a clinic trains with: set, or calibrated to a target epsilon.

Kept apart from the trainer (no TensorFlow), so the operator's budget planning
(:func:`fedseg_clinic.privacy.budget.plan_rounds`) and the clinic use the same answer.
"""

from __future__ import annotations

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.accounting import calibrate_noise, default_delta
from fedseg_clinic.settings import ClinicSettings

_CALIBRATED: dict[tuple[int, int, int, float, float], float] = {}


def resolve_noise(n_patients: int, settings: ClinicSettings) -> tuple[float, float | None]:
    """The noise multiplier and epsilon budget a clinic trains with.

    With ``privacy.target_epsilon`` the noise is calibrated (dp_accounting, tighter of
    RDP and PLD) so that ``planned_rounds`` rounds of this clinic's schedule end at or
    below the target, and the target becomes the budget unless a smaller one is set; the
    ledger then enforces it. Otherwise ``noise_multiplier`` and ``epsilon_budget`` as set.
    Neither frozen weights nor K patches per patient change the analysis: one patient
    still contributes one clipped gradient per step.
    """
    t, p = settings.training, settings.privacy
    if p.target_epsilon is None:
        return p.noise_multiplier, p.epsilon_budget
    if p.planned_rounds is None:
        raise FedsegError("privacy.target_epsilon needs privacy.planned_rounds")
    delta = p.delta if p.delta is not None else default_delta(n_patients)
    key = (n_patients, t.batch_size, p.planned_rounds * t.local_steps, p.target_epsilon, delta)
    if key not in _CALIBRATED:  # a few seconds of PLD work: once per schedule
        _CALIBRATED[key] = calibrate_noise(n_patients, t.batch_size, key[2],
                                           p.target_epsilon, delta)
    budget = p.target_epsilon if p.epsilon_budget is None else min(p.epsilon_budget,
                                                                   p.target_epsilon)
    return _CALIBRATED[key], budget
