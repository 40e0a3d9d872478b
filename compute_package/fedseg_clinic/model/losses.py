"""Per-example soft Dice + cross-entropy with a marginal loss for partial labels.

DP-SGD clips each example's gradient, so the loss is returned per example (shape
(batch,)), never reduced over the batch.

Partial labels (marginal loss, Shi et al. 2021, "Marginal loss and exclusion loss for
partially supervised multi-organ segmentation"): a clinic that does not contour, say,
the heart labels heart voxels as body (or background, when body is not contoured
either). Training such voxels as body would teach the model that hearts are not hearts.
So, per example, every *unknown* class is merged into the class that its voxels carry in
the label map - the merge class ``m`` is the organ set's container (body) when it is
known, else background (an organ set without a container, like head_neck, always merges
into background):

    p'_m = p_m + sum_{c unknown} p_c,   p'_c = p_c for the other known classes,

and the labels are mapped the same way (a label of an unknown class becomes ``m``). The
loss is then computed over known classes only:

    CE   = mean over voxels of -log p'_{label}
    Dice = mean over known foreground classes c >= 1 of
           1 - (2 sum p'_c g_c + smooth) / (sum p'_c + sum g_c + smooth)
    loss = CE + Dice   (Dice term 0 when no foreground class is known)

Predicting an unknown organ where the labels say body therefore costs nothing, while
predicting body where a *known* organ is labelled is penalised by both terms. A known
class absent from the patch and not predicted has Dice loss 0 (smooth / smooth); if it
is predicted its Dice loss is close to 1 - the usual behaviour of per-example soft Dice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fedseg_clinic.organs import OrganSet
from fedseg_clinic.tf_env import tf

# Probabilities are clipped below before the log so a confident wrong voxel costs
# -log(1e-7) ~ 16 instead of inf.
PROB_FLOOR: float = 1e-7
DICE_SMOOTH: float = 1e-5


def merge_unknown(
    labels: Any, probs: Any, known: Any, container_class: int | None = 1
) -> tuple[tf.Tensor, tf.Tensor]:
    """Merge unknown classes into each example's merge class (body if known, else bg).

    Args:
        labels: int (b, z, y, x) label maps.
        probs: float (b, z, y, x, C) softmax probabilities.
        known: float (b, C), 1 for classes the example's labels speak for.
        container_class: class index of the organ set's container (thorax: body = 1),
            or None when the set has none (unknown classes then merge into background).

    Returns:
        (one-hot merged labels, merged probabilities), both float32 (b, z, y, x, C);
        unknown classes have zero in both.
    """
    probs = tf.convert_to_tensor(probs, dtype=tf.float32)
    known = tf.convert_to_tensor(known, dtype=tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    n_classes = tf.shape(probs)[-1]
    known_v = known[:, None, None, None, :]  # broadcast over (z, y, x)
    # Merge class: the container (body) when known, else background (0).
    if container_class is None:
        merge = tf.zeros_like(known[:, 0], dtype=tf.int32)
    else:
        merge = tf.cast(known[:, container_class] > 0.5, tf.int32) * container_class
    merge_v = tf.one_hot(merge, n_classes, dtype=tf.float32)[:, None, None, None, :]

    unknown_mass = tf.reduce_sum(probs * (1.0 - known_v), axis=-1, keepdims=True)
    merged_probs = probs * known_v + unknown_mass * merge_v

    onehot = tf.one_hot(labels, n_classes, dtype=tf.float32)
    unknown_label = tf.reduce_sum(onehot * (1.0 - known_v), axis=-1, keepdims=True)
    merged_labels = onehot * known_v + unknown_label * merge_v
    return merged_labels, merged_probs


def per_example_loss(
    labels: Any,
    probs: Any,
    known: Any,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = DICE_SMOOTH,
    container_class: int | None = 1,
    dice_classes: str = "known",
) -> tf.Tensor:
    """Soft Dice + cross-entropy per example, with unknown classes marginalised.

    Args:
        labels: int (b, z, y, x) label maps (model.labels_from_masks).
        probs: float (b, z, y, x, C) softmax probabilities.
        known: float (b, C) known-class vectors (model.class_known).
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        smooth: Dice smoothing added to numerator and denominator.
        container_class: see :func:`merge_unknown` (None for sets without a container).
        dice_classes: "known" averages the Dice term over every known foreground class;
            "present" only over known classes with at least one labelled voxel in the
            example (a patch without any gets no Dice term, only cross-entropy).

    Returns:
        float32 tensor of shape (b,).
    """
    merged_labels, merged_probs = merge_unknown(labels, probs, known, container_class)
    known = tf.convert_to_tensor(known, dtype=tf.float32)

    log_p = tf.math.log(tf.clip_by_value(merged_probs, PROB_FLOOR, 1.0))
    ce = -tf.reduce_mean(tf.reduce_sum(merged_labels * log_p, axis=-1), axis=[1, 2, 3])

    spatial = [1, 2, 3]
    intersection = tf.reduce_sum(merged_probs * merged_labels, axis=spatial)  # (b, C)
    denominator = tf.reduce_sum(merged_probs, axis=spatial) + tf.reduce_sum(
        merged_labels, axis=spatial
    )
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    foreground = tf.concat([tf.zeros_like(known[:, :1]), known[:, 1:]], axis=1)
    if dice_classes == "present":
        # An absent class's soft Dice is smooth / (sum p + smooth): its gradient near
        # p = 0 is ~1 / smooth, so it pins every organ's probability to 0 in every patch
        # that lacks the organ - most patches, for small organs.
        foreground *= tf.cast(tf.reduce_sum(merged_labels, axis=spatial) > 0.0, tf.float32)
    elif dice_classes != "known":
        raise ValueError(f"dice_classes must be known or present, got {dice_classes!r}")
    dice_loss = tf.math.divide_no_nan(
        tf.reduce_sum(foreground * (1.0 - dice), axis=1), tf.reduce_sum(foreground, axis=1)
    )
    return ce_weight * ce + dice_weight * dice_loss


def loss_for(organs: OrganSet, dice_classes: str = "known"
             ) -> Callable[[Any, Any, Any], tf.Tensor]:
    """:func:`per_example_loss` with the organ set's container class (and options) bound."""
    container = organs.class_index(organs.container) if organs.container else None
    if container == 1 and dice_classes == "known":
        return per_example_loss  # the thorax default: keep the plain function
    return functools.partial(per_example_loss, container_class=container,
                             dice_classes=dice_classes)
