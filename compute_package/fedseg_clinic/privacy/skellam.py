"""Distributed DP under secure aggregation: the Skellam mechanism on integer gradient sums.

With ``privacy.distributed`` a federated round is one DP gradient step of the whole
federation (DP-FedSGD, full batch): each clinic j computes the sum over *all* its
training patients of their clipped gradients as integers, adds its *share* of Skellam
noise and masks the result (secure aggregation); the server only learns

    Z = sum_j (S_j + noise_j),   S_j = sum_i trunc(s * clip_C(g_i)),

and takes the step ``w -= lr * Z / (s * N_total)``.

Why Skellam (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning"): the sum of independent Skellam variables is exactly
Skellam, so m clinics adding variance mu / m each put Skellam noise of variance mu in
the sum, integers go through the uint64 ring of secure aggregation without rounding,
and its RDP has a closed form (their Theorem 3.5 / Corollary 3.6, integer orders
alpha > 1, integer-valued query with l2 / l1 sensitivity D2 / D1, variance mu):

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),
                                            3 D1 / (2 mu)).

The first term is the Gaussian mechanism's with noise multiplier sqrt(mu) / D2; the
second is the price of discreteness and vanishes as mu grows (a test checks that the
epsilon converges to dp_accounting's GaussianDpEvent at the same multiplier).

Sensitivity without the dimension. Each patient's clipped gradient (TF Privacy's clip
to C) is scaled by s = CLIP_UNITS / C and truncated toward zero, coordinate by
coordinate: every |coordinate| shrinks, so the patient's integer vector has l2 norm
<= CLIP_UNITS exactly (float error is checked and corrected in integers). Adding or
removing one patient therefore moves S_j by D2 <= CLIP_UNITS, and, the vector being
integer (|x| <= x^2), by D1 <= D2^2. Both are independent of the number of trained
parameters, so the budget plan (which never builds the model) predicts exactly what
the clinic records. (Rounding the *sum* instead would add sqrt(d) to D2.)

Trust. The noise is shared: a clinic adds variance mu / m, where m (``honest_shares``,
default the secure-aggregation threshold, a strict majority of the round's clinics) is
the number of honest shares the reported epsilon assumes. The server never unmasks a sum
of fewer than the threshold of clinics, so dropouts alone cannot take the noise below
mu; clinics that collude with the server know (and can subtract) their own shares, so
with h honest shares in the sum the noise is mu * h / m. :func:`trust_statement` says
this next to the number, with the epsilon if this clinic's share were the only honest
one (all others colluding with the server). m = 1 is local DP (trust nobody); m = n
needs every clinic honest and present.

Noise source: TF Privacy's ``DistributedSkellamSumQuery`` draws its Poissons with a
seed from ``tf.timestamp()`` (guessable to the microsecond) and treats each record as a
whole client; fedseg draws the same construction (difference of two Poissons of mean
variance / 2) from numpy's Philox keyed with 128 bits and a 256-bit counter from the
OS's secret randomness (:func:`noise_rng`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from fedseg_clinic.errors import FedsegError

# The clip norm in integer units: s * C. 2^20 keeps truncation error (< 1 unit per
# coordinate) far below a coordinate of a clipped gradient for models up to millions of
# trained parameters, while N * 2^20 + noise stays far inside the 2^56 the ring allows.
CLIP_UNITS = 2 ** 20
# Integer RDP orders: the Skellam bound holds for integer alpha > 1.
ORDERS: tuple[int, ...] = (*range(2, 64), 64, 80, 96, 128, 160, 192, 256, 384, 512, 1024)
MECHANISM = "skellam"


class SkellamSegment(NamedTuple):
    """Identical Skellam releases (one per federated round): the unit of composition.

    Attributes:
        variance: mu, the Skellam variance per coordinate in the aggregate that the
            guarantee assumes (integer units).
        l2_sensitivity: D2 (integer units).
        l1_sensitivity: D1 (integer units).
        steps: Number of releases.
    """

    variance: float
    l2_sensitivity: float
    l1_sensitivity: float
    steps: int


def sensitivities(clip_units: int = CLIP_UNITS) -> tuple[float, float]:
    """(D2, D1) of one patient's truncated integer gradient (module doc)."""
    return float(clip_units), float(clip_units) ** 2


def segment_for(noise_multiplier: float, rounds: int = 1, clip_units: int = CLIP_UNITS
                ) -> SkellamSegment:
    """The segment of ``rounds`` releases with aggregate std = noise_multiplier * clip."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise FedsegError(f"distributed DP: noise multiplier {noise_multiplier} must be > 0")
    d2, d1 = sensitivities(clip_units)
    return SkellamSegment((noise_multiplier * clip_units) ** 2, d2, d1, int(rounds))


def rdp(segment: SkellamSegment, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of the segment at each (integer) order: Agarwal et al.'s bound, composed."""
    mu, d2, d1, steps = segment
    if not mu > 0:
        return np.full(len(orders), math.inf)
    out = []
    for a in orders:
        gauss = a * d2 ** 2 / (2.0 * mu)
        extra = min(((2 * a - 1) * d2 ** 2 + 6 * d1) / (4.0 * mu ** 2), 3 * d1 / (2.0 * mu))
        out.append(steps * (gauss + extra))
    return np.asarray(out, dtype=np.float64)


def epsilon(segments: Sequence[SkellamSegment], delta: float,
            extra_rdp: np.ndarray | None = None) -> float:
    """Epsilon at ``delta`` of composed Skellam segments (plus other RDP on ORDERS).

    The conversion is dp_accounting's (``rdp_privacy_accountant.compute_epsilon``).
    """
    total = np.zeros(len(ORDERS)) if extra_rdp is None else np.asarray(extra_rdp, float)
    for segment in segments:
        if segment.steps > 0:
            total = total + rdp(segment)
    if not np.any(total):
        return 0.0
    eps, _ = rdp_privacy_accountant.compute_epsilon(ORDERS, total, delta)
    return float(eps)


def calibrate(rounds: int, target_epsilon: float, delta: float,
              clip_units: int = CLIP_UNITS, tol: float = 1e-4) -> float:
    """Smallest noise multiplier z whose ``rounds`` Skellam releases stay within target.

    Raises:
        FedsegError: A value out of range.
    """
    if rounds < 1:
        raise FedsegError(f"distributed DP: rounds={rounds} must be >= 1")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise FedsegError(f"target epsilon={target_epsilon} must be a finite number > 0")
    if not 0 < delta < 1:
        raise FedsegError(f"delta={delta} must be in (0, 1)")

    def excess(z: float) -> float:
        return epsilon([segment_for(z, rounds, clip_units)], delta) - target_epsilon

    high = 1.0
    while excess(high) > 0:
        high *= 2.0
    low = high / 2.0
    while low > tol and excess(low) <= 0:
        high, low = low, low / 2.0
    if low <= tol:
        return high
    z = optimize.brentq(excess, low, high, xtol=tol / 2)
    while excess(z) > 0:  # brentq's root may sit on either side: step inside
        z += tol / 2
    return float(z)


# ------------------------------------------------------------------- trust
def honest_shares(n_clinics: int, setting: int | None = None) -> int:
    """m: the honest shares the guarantee assumes in a round of ``n_clinics``.

    Default: the secure-aggregation threshold (the fewest clinics the server unmasks),
    so a round that loses clinics to dropouts still carries at least mu. A setting may
    only lower it (more noise per clinic); it is capped at the threshold for the same
    reason.
    """
    from fedseg_clinic.privacy.secagg import threshold_for

    threshold = threshold_for(n_clinics)
    if setting is None:
        return threshold
    if setting < 1:
        raise FedsegError(f"privacy.distributed_honest={setting} must be >= 1")
    return min(int(setting), threshold)


def trust_statement(eps: float, eps_alone: float, m: int, n_clinics: int, delta: float
                    ) -> str:
    """One line written next to the epsilon: what it assumes and what is left without."""
    return (f"epsilon {eps:.3g} (delta {delta:.3g}) assumes at least {m} honest noise shares "
            f"in each round's sum of {n_clinics} clinics (clinics that added their share and "
            f"do not collude with the server; the server unmasks no fewer than the threshold);"
            f" with this clinic's share the only honest one (all others colluding with the "
            f"server): epsilon {eps_alone:.3g}")


# ------------------------------------------------------------------ sampling
def noise_rng(seed: int | None = None) -> np.random.Generator:
    """Philox keyed from the OS's secret randomness (128-bit key, 256-bit counter).

    Args:
        seed: An int makes the noise reproducible (tests, synthetic experiments only:
            whoever knows it can subtract the noise).
    """
    if seed is not None:
        return np.random.Generator(np.random.Philox(seed))
    return np.random.Generator(np.random.Philox(key=secrets.randbits(128),
                                                counter=secrets.randbits(256)))


def sample(shape: tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of the given variance: Poisson(v/2) - Poisson(v/2), int64."""
    if not (math.isfinite(variance) and variance >= 0):
        raise FedsegError(f"Skellam variance {variance} must be a finite number >= 0")
    if variance == 0:
        return np.zeros(shape, dtype=np.int64)
    lam = variance / 2.0
    return rng.poisson(lam, shape).astype(np.int64) - rng.poisson(lam, shape).astype(np.int64)


def truncate_to_units(clipped: np.ndarray, l2_norm_clip: float,
                      clip_units: int = CLIP_UNITS) -> np.ndarray:
    """One patient's clipped gradient (flat) as integers of l2 norm <= clip_units.

    Scaled by clip_units / C and truncated toward zero. The clip itself is float32 and
    may exceed C by an ulp; the integer norm is then checked exactly and, if needed,
    the vector is scaled down again (toward zero) until it fits.
    """
    scale = clip_units / float(l2_norm_clip)
    values = np.asarray(clipped, dtype=np.float64) * scale
    out = np.trunc(values).astype(np.int64)
    limit = int(clip_units) ** 2
    while _norm_sq(out) > limit:
        norm = math.sqrt(_norm_sq(out))
        out = np.trunc(out * (clip_units / norm) * (1.0 - 1e-9)).astype(np.int64)
    return out


def _norm_sq(values: np.ndarray) -> int:
    """Exact squared l2 norm of an int64 vector.

    The int64 dot product cannot wrap for fewer than 2^22 terms of magnitude <= 2^20.
    """
    if values.size < 2 ** 22 and (values.size == 0 or int(np.max(np.abs(values))) <= 2 ** 20):
        return int(np.dot(values, values))
    return sum(int(x) * int(x) for x in values.tolist())


def epsilon_for(noise_multiplier: float, rounds: int, delta: float, honest: float = 1.0,
                clip_units: int = CLIP_UNITS) -> float:
    """Epsilon of ``rounds`` releases whose noise is ``honest`` times the guaranteed one.

    ``honest`` = h / m: h honest shares in the sum where the guarantee assumes m (1/m:
    this clinic alone; n/m: every clinic of the round honest and present).
    """
    seg = segment_for(noise_multiplier, rounds, clip_units)
    return epsilon([seg._replace(variance=seg.variance * honest)], delta)


def compare_with_local(rounds: int, target_epsilon: float, delta: float, clinics: int,
                       honest: int | None = None) -> dict[str, float]:
    """Noise in the aggregate at equal epsilon per clinic: distributed vs local DP-GD.

    Both run ``rounds`` full-batch steps (q = 1). Local DP: each clinic adds Gaussian
    noise of multiplier z_local (calibrated by dp_accounting, tighter of RDP and PLD)
    to its own sum, so the sum over n clinics carries std z_local * sqrt(n) (in units of
    the clip C). Distributed: each adds z^2 / m of Skellam variance; all n present and
    honest, the sum carries z * sqrt(n / m); at worst (m honest shares) z.

    Returns:
        The multipliers and aggregate stds (units of C) and the epsilons.
    """
    from fedseg_clinic.privacy.accounting import calibrate_noise

    m = honest_shares(clinics, honest)
    z = calibrate(rounds, target_epsilon, delta)
    z_local = calibrate_noise(1, 1, rounds, target_epsilon, delta)
    return {
        "clinics": clinics, "honest_shares": m, "rounds": rounds,
        "target_epsilon": target_epsilon, "delta": delta,
        "local_noise_multiplier": z_local,
        "local_aggregate_std": z_local * math.sqrt(clinics),
        "distributed_noise_multiplier": z,
        "distributed_share_std": z / math.sqrt(m),
        "distributed_aggregate_std": z * math.sqrt(clinics / m),
        "distributed_aggregate_std_min": z,
        "epsilon": epsilon_for(z, rounds, delta),
        "epsilon_all_honest": epsilon_for(z, rounds, delta, clinics / m),
        "epsilon_if_alone": epsilon_for(z, rounds, delta, 1.0 / m),
    }
