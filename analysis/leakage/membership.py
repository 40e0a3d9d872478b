"""Membership inference on a trained segmentation model: loss threshold and offline LiRA.

Loss threshold (Yeom et al. 2018): score = -loss; members tend to have lower loss.

LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"), offline
variant: the attacker trains ``n_shadow`` shadow models on phantom patients that exclude
the target patients, so every target has only "out" values; per target it fits a
Gaussian N(mu_out, sigma_out^2) to the shadow models' (logit-scaled) statistic and scores
the target model's value x by how far it sits in that Gaussian's upper tail:
score = -log P_out[X >= x]. Offline is justified here because the
online variant needs shadow models trained *with* each target, doubling the training
cost, and Carlini et al. report offline LiRA retains most of the power at low FPR.

The per-example statistic is the logit-scaled mean voxel confidence in the true class,
log(p / (1 - p)), which LiRA uses because it is close to Gaussian across models.

Metrics: ROC AUC and TPR at 0.1 % and 1 % FPR (computed here with numpy: a few lines,
and scikit-learn is not a declared dependency).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
from scipy import stats

from fedseg.analysis.leakage.victim import (
    Victim,
    VictimSettings,
    all_known,
    build_victim,
    phantom_patches,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.losses import per_example_loss
from fedseg_clinic.privacy.accounting import compute_epsilon

logger = logging.getLogger(__name__)

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01)


def roc_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC and TPR at fixed FPRs of a score (higher = more likely a member).

    Ties share rank (AUC by the Mann-Whitney statistic). TPR at FPR f is the largest TPR
    over thresholds whose FPR <= f.

    Raises:
        FedsegError: no members or no non-members.
    """
    scores = np.asarray(scores, np.float64)
    member = np.asarray(is_member, bool)
    n_pos, n_neg = int(member.sum()), int((~member).sum())
    if n_pos == 0 or n_neg == 0:
        raise FedsegError(f"membership scores need members and non-members, got {n_pos} "
                          f"and {n_neg}")
    ranks = stats.rankdata(scores)
    auc = (ranks[member].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    result = {"auc": float(auc)}
    thresholds = np.unique(scores)[::-1]
    tpr = np.array([(scores[member] >= t).mean() for t in thresholds])
    fpr = np.array([(scores[~member] >= t).mean() for t in thresholds])
    for level in FPR_LEVELS:
        ok = fpr <= level
        result[f"tpr_at_{level:g}_fpr"] = float(tpr[ok].max()) if ok.any() else 0.0
    return result


def confidence_statistic(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of each example's mean voxel probability of its true class, (b,)."""
    probs = np.asarray(probs, np.float64)
    onehot = np.eye(probs.shape[-1])[np.asarray(labels, np.int64)]
    p = np.clip((probs * onehot).sum(-1).mean(axis=(1, 2, 3)), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def lira_offline_scores(target_stat: np.ndarray, shadow_stats: np.ndarray) -> np.ndarray:
    """Offline LiRA score per example (higher = more likely a member).

    Args:
        target_stat: (n,) statistic under the target model.
        shadow_stats: (k, n) statistic under k shadow models that never saw the examples.

    Returns:
        (n,) -log P_out[stat >= target], from a per-example Gaussian fit (std floored).
    """
    mu = shadow_stats.mean(axis=0)
    sd = np.maximum(shadow_stats.std(axis=0, ddof=1 if len(shadow_stats) > 1 else 0), 1e-3)
    return -stats.norm.logsf(target_stat, loc=mu, scale=sd)


@dataclasses.dataclass(frozen=True)
class MembershipConfig(VictimSettings):
    """A membership-inference experiment on phantoms.

    The victim's knobs (:class:`VictimSettings`) hold for target and shadows alike.

    Attributes:
        n_targets: candidate patients; half (drawn) are trained on (members).
        n_shadow: shadow models for offline LiRA (trained on fresh phantom patients).
    """

    n_targets: int = 16
    n_shadow: int = 4


def _train(config: MembershipConfig, images: np.ndarray, labels: np.ndarray, seed: int,
           timings: dict[str, float]) -> Victim:
    """Train one model; add its first step (tracing) and other steps to ``timings``."""
    victim = build_victim(config.unet, config.dp, seed)
    seconds = victim.train_poisson(images, labels, config.steps,
                                   np.random.default_rng([seed, 3]))
    timings["first_steps"] = timings.get("first_steps", 0.0) + seconds[0]
    if len(seconds) > 1:
        timings["steps"] = timings.get("steps", 0.0) + sum(seconds[1:])
    return victim


def run_membership(config: MembershipConfig) -> dict[str, Any]:
    """Train a target on half of the candidates, shadows on others; attack both ways.

    Returns:
        JSON-ready dict with loss-threshold and LiRA metrics (auc, TPR at FPRs), the
        accountant's epsilon of the target's schedule, seconds and timings (seconds:
        target = phantoms, training and scoring of the target; shadows = all shadows;
        first_steps / steps = the models' first (tracing) and other training steps).
    """
    if config.n_targets < 4:
        raise FedsegError(f"n_targets={config.n_targets} must be >= 4")
    started = time.perf_counter()
    images, labels = phantom_patches(config.n_targets, config.patch, config.seed)
    rng = np.random.default_rng([config.seed, 4])
    member = np.zeros(config.n_targets, bool)
    member[rng.permutation(config.n_targets)[: config.n_targets // 2]] = True
    step_timings: dict[str, float] = {}
    target = _train(config, images[member], labels[member], config.seed, step_timings)
    probs = target.probabilities(images)
    loss = np.asarray(per_example_loss(labels, probs, all_known(config.n_targets)))
    target_stat = confidence_statistic(probs, labels)
    timings = {"target": time.perf_counter() - started}
    shadow_stats = []
    for k in range(config.n_shadow):
        shadow_seed = config.seed + 1000 * (k + 1)
        s_images, s_labels = phantom_patches(len(images) // 2, config.patch, shadow_seed)
        shadow = _train(config, s_images, s_labels, shadow_seed, step_timings)
        shadow_stats.append(confidence_statistic(shadow.probabilities(images), labels))
    timings["shadows"] = time.perf_counter() - started - timings["target"]
    timings.update(step_timings)
    lira = lira_offline_scores(target_stat, np.stack(shadow_stats))
    n_train = int(member.sum())
    epsilon = math.inf if config.noise_multiplier is None else compute_epsilon(
        n_train, config.batch_size, config.steps, config.noise_multiplier,
        config.delta).epsilon
    return {
        "config": dataclasses.asdict(config),
        "epsilon": epsilon,
        "loss_threshold": roc_metrics(-loss, member),
        "lira_offline": roc_metrics(lira, member),
        "seconds": time.perf_counter() - started,
        "timings": timings,
    }
