"""Empirical privacy audit from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy auditing with one (1) training run": ``m`` canary records are each included in
the training set independently with probability 1/2. After training, the auditor scores
every canary, guesses "in" for the ``k_plus`` highest scores and "out" for the ``k_minus``
lowest, and abstains on the rest. If training is (epsilon, delta)-DP, the number ``v`` of
correct guesses among the ``r = k_plus + k_minus`` is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) plus a delta term (their Theorem 3, computed as in their
Appendix D). The largest epsilon whose p-value for ``v`` stays below ``1 - confidence``
is an empirical *lower* bound: with that confidence the run is not (eps', delta)-DP for
any eps' below it. It never exceeds the accountant's epsilon except with probability
``1 - confidence`` (the tests check it on DP runs).

TF Privacy 0.9.0 has no such utility (its ``privacy_tests`` package with
``epsilon_lower_bound`` came later and targets multi-run audits) and dp_accounting has none,
so the p-value is computed here with scipy.stats.binom.

Our records are patients: a canary is one phantom patient whose training patch carries
unique noise and a random label map, so that including it changes what the model predicts
for exactly that patch. Training is the project's own DP-SGD
(:class:`fedseg_clinic.privacy.dp_sgd.DPTrainer`) with Poisson sampling of patients
(:func:`fedseg_clinic.privacy.dp_sgd.poisson_sample`), as in ClinicApp. The score is the canary's
loss drop (loss under the initial model minus loss under the trained model).

Choosing the best (k_plus, k_minus) after looking at the scores would inflate the bound,
so the bound is the maximum over a fixed small set of guess counts with a Bonferroni
correction (the p-value threshold is divided by the size of the set).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

from fedseg.analysis.leakage.membership import roc_metrics
from fedseg.analysis.leakage.victim import VictimSettings, build_victim, phantom_patches
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.unet import N_CLASSES
from fedseg_clinic.privacy.accounting import compute_epsilon

logger = logging.getLogger(__name__)

EPS_SEARCH_MAX: float = 50.0


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (epsilon, delta)-DP (Steinke et al., App. D).

    Args:
        m: number of canaries (each included with probability 1/2).
        r: number of guesses (abstentions excluded).
        v: number of correct guesses.
        epsilon: epsilon of the null hypothesis, >= 0.
        delta: delta of the null hypothesis, in [0, 1].

    Returns:
        The p-value, capped at 1.
    """
    if not 0 <= v <= r <= m:
        raise FedsegError(f"canary audit: need 0 <= v={v} <= r={r} <= m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise FedsegError(f"canary audit: epsilon={epsilon} must be >= 0, delta={delta} "
                          "in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i over i = 1..v (the delta term).
    if v > 0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # v-1, v-2, ..., 0
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    else:
        alpha = 0.0
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest epsilon rejected at ``confidence``: the run is not (eps, delta)-DP below it.

    Returns:
        0.0 when even epsilon = 0 cannot be rejected.
    """
    if not 0.0 < confidence < 1.0:
        raise FedsegError(f"confidence={confidence} must be in (0, 1)")
    threshold = 1.0 - confidence

    def excess(eps: float) -> float:
        return p_value(m, r, v, eps, delta) - threshold

    if excess(0.0) >= 0:
        return 0.0
    if excess(EPS_SEARCH_MAX) < 0:
        return EPS_SEARCH_MAX
    # p-value grows with epsilon: the root is the boundary; take its rejected side.
    root = optimize.brentq(excess, 0.0, EPS_SEARCH_MAX, xtol=1e-6)
    while root > 0 and excess(root) >= 0:
        root -= 1e-6
    return max(root, 0.0)


def guess_counts(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
                 ) -> tuple[int, int]:
    """(r, v): guess "in" for the k_plus top scores and "out" for the k_minus lowest."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if k_plus + k_minus > len(order):
        raise FedsegError(f"k_plus + k_minus = {k_plus + k_minus} exceeds the "
                          f"{len(order)} canaries")
    top = order[:k_plus]
    bottom = order[len(order) - k_minus:] if k_minus else order[:0]
    correct = int(np.sum(included[top])) + int(np.sum(~included[bottom]))
    return k_plus + k_minus, correct


def audit_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
                guess_fractions: Sequence[float] = (0.125, 0.25, 0.5)) -> dict[str, Any]:
    """Best Bonferroni-corrected lower bound over symmetric guess counts.

    Args:
        scores: per-canary score, higher = more likely included.
        included: bool per canary (the secret coin flips).
        delta: delta of the null hypothesis (the run's delta).
        confidence: e.g. 0.95.
        guess_fractions: k_plus = k_minus = fraction * m / 2 candidates.

    Returns:
        epsilon_lower_bound, and the r, v, k of the best candidate.
    """
    m = len(scores)
    included = np.asarray(included, bool)
    corrected = 1.0 - (1.0 - confidence) / len(guess_fractions)
    best: dict[str, Any] = {"epsilon_lower_bound": 0.0, "r": 0, "v": 0, "k": 0}
    for fraction in guess_fractions:
        k = max(1, round(fraction * m / 2))
        if 2 * k > m:
            continue
        r, v = guess_counts(scores, included, k, k)
        eps = epsilon_lower_bound(m, r, v, delta, corrected)
        if eps > best["epsilon_lower_bound"] or best["r"] == 0:
            best = {"epsilon_lower_bound": eps, "r": r, "v": v, "k": k}
    best["confidence"] = confidence
    return best


# ------------------------------------------------------------------------ the run


@dataclasses.dataclass(frozen=True)
class CanaryAuditConfig(VictimSettings):
    """One audited training run (the victim's knobs: :class:`VictimSettings`).

    Attributes:
        n_canaries: m canary patients (each included with probability 1/2).
        n_patients: ordinary training patients (always included).
        confidence: confidence of the lower bound.

    The patch side 8 lets the tiny model memorise canaries when it is not private.
    """

    n_canaries: int = 32
    n_patients: int = 4
    noise_multiplier: float | None = 1.0
    batch_size: int = 8
    steps: int = 100
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.n_canaries < 2:
            raise FedsegError(f"n_canaries={self.n_canaries} must be >= 2")
        if self.n_patients < 0 or self.steps < 1:
            raise FedsegError(f"n_patients={self.n_patients} must be >= 0 and "
                              f"steps={self.steps} >= 1")


def records(config: CanaryAuditConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phantom training patches (ordinary patients first, then canaries).

    Canaries get unique noise on the CT and random voxel labels.

    Returns:
        images (n, p, p, p, 1) float32, labels (n, p, p, p) int32, is_canary bool (n,).
    """
    total = config.n_patients + config.n_canaries

    def plant(index: int, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        if index < config.n_patients:
            return image, label
        # A canary: the patient's CT with unique noise texture and random labels, so its
        # gradient points its own way (shared structure would let one included canary
        # lower every canary's loss).
        return (np.clip(image + rng.normal(0.0, 0.5, image.shape), -1, 1),
                rng.integers(0, N_CLASSES, label.shape))

    images, labels = phantom_patches(total, config.patch, config.seed, alter=plant)
    return images, labels, np.arange(total) >= config.n_patients


def run_canary_audit(config: CanaryAuditConfig) -> dict[str, Any]:
    """Train once with canaries and compute the empirical lower bound beside the accountant.

    Returns:
        JSON-ready dict: config, epsilon (accountant), epsilon_lower_bound, r, v, k,
        canary scores and membership, seconds, and timings (seconds per phase: records,
        model = build and score before training, first_step = tracing included, steps =
        the other steps, score_and_bound).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    images, labels, is_canary = records(config)
    timings["records"] = time.perf_counter() - started
    rng = np.random.default_rng([config.seed, 2])
    included_canary = rng.random(config.n_canaries) < 0.5
    member = np.concatenate([np.ones(config.n_patients, bool), included_canary])
    train_idx = np.flatnonzero(member)
    n_train = len(train_idx)
    if config.batch_size > n_train:
        raise FedsegError(f"batch_size={config.batch_size} exceeds the {n_train} training "
                          "patients of this draw")
    mark = time.perf_counter()
    victim = build_victim(config.unet, config.dp, config.seed)
    canary_images, canary_labels = images[is_canary], labels[is_canary]
    before = victim.losses(canary_images, canary_labels)
    timings["model"] = time.perf_counter() - mark
    seconds = victim.train_poisson(images[train_idx], labels[train_idx], config.steps, rng)
    timings["first_step"] = seconds[0]
    if len(seconds) > 1:
        timings["steps"] = sum(seconds[1:])
    mark = time.perf_counter()
    after = victim.losses(canary_images, canary_labels)
    scores = before - after
    if config.noise_multiplier is None:
        accountant = math.inf
    else:
        accountant = compute_epsilon(n_train, config.batch_size, config.steps,
                                     config.noise_multiplier, config.delta).epsilon
    bound = audit_bound(scores, included_canary, config.delta, config.confidence)
    result = {
        "config": dataclasses.asdict(config),
        "n_train": n_train,
        "epsilon": accountant,
        **bound,
        "attack_auc": roc_metrics(scores, included_canary)["auc"],
        "scores": [float(s) for s in scores],
        "included": [bool(b) for b in included_canary],
        "seconds": time.perf_counter() - started,
        "timings": timings,
    }
    timings["score_and_bound"] = time.perf_counter() - mark
    logger.info("canary audit: eps accountant %.3f, empirical lower bound %.3f (v=%d/%d)",
                accountant, bound["epsilon_lower_bound"], bound["v"], bound["r"])
    return result
