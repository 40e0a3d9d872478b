"""TF Privacy's stock DP Keras optimizers as a selectable reference implementation.

fedseg trains with its own per-example loop (:mod:`fedseg_clinic.privacy.dp_sgd`), which
uses TF Privacy's ``GaussianSumQuery`` for clipping and noise but not its optimizers,
because their jacobian-based per-example gradients cost 1.5-4.5x the time and up to 2.5x
the memory on a 3D U-Net. ``privacy.dp_optimizer: tf_privacy`` trains the same schedule
with ``DPKerasSGDOptimizer`` / ``DPKerasAdamOptimizer`` instead, so any result can be
cross-checked on the reference implementation (tests show both give the same update).

Same semantics as fedseg's trainer: one microbatch per sampled patient (its K patches'
mean loss, which is how TF Privacy's microbatches reduce a loss vector), clipped once;
only ``variables`` are trained. Two differences of TF Privacy's design, for a reference
run only: the stock optimizers divide the noised sum by the *realised* batch size (for
SGD we rescale the learning rate by realised / expected, which makes the update exactly
fedseg's; for Adam the normaliser stays TF Privacy's), and they cannot take an empty
batch, so a step that samples nobody is skipped (counted in ``skipped_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.dp_sgd import DPConfig, PerExampleLoss
from fedseg_clinic.tf_env import keras, tf

DP_OPTIMIZERS: tuple[str, ...] = ("fedseg", "tf_privacy")


class TFPrivacyTrainer:
    """DP steps through TF Privacy's stock DP Keras optimizers (same interface as DPTrainer).

    Args:
        model: The Keras 2 model.
        loss_fn: Per-example loss (labels, probs, known) -> (b,).
        config: The DP settings; must be private (noise_multiplier not None).
        seed: Seed of TensorFlow's global generator (TF Privacy draws its noise there).
        variables: Variables to train; None trains all.
        augmentations: K consecutive rows per patient in a batch.
    """

    def __init__(self, model: keras.Model, loss_fn: PerExampleLoss, config: DPConfig,
                 seed: int, variables: Sequence[tf.Variable] | None = None,
                 augmentations: int = 1) -> None:
        from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import (
            DPKerasAdamOptimizer,
            DPKerasSGDOptimizer,
        )

        if not config.private:
            raise FedsegError("dp_optimizer tf_privacy needs privacy on (a noise multiplier)")
        if config.proximal_mu > 0:
            raise FedsegError("dp_optimizer tf_privacy has no FedProx term: set "
                              "training.proximal_mu 0 or dp_optimizer fedseg")
        if isinstance(augmentations, bool) or int(augmentations) != augmentations \
                or augmentations < 1:
            raise FedsegError(f"augmentations={augmentations!r} must be an integer >= 1")
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.variables = list(model.trainable_variables if variables is None else variables)
        self.augmentations = int(augmentations)
        cls = DPKerasAdamOptimizer if config.optimizer == "adam" else DPKerasSGDOptimizer
        # num_microbatches None: one microbatch per entry of the (per-patient) loss vector.
        self.optimizer = cls(l2_norm_clip=config.l2_norm_clip,
                             noise_multiplier=float(config.noise_multiplier or 0.0),
                             num_microbatches=None, learning_rate=config.learning_rate)
        tf.random.set_seed(seed)
        self.steps_taken = 0
        self.skipped_steps = 0

    def step(self, images: np.ndarray, labels: np.ndarray, known: np.ndarray) -> float:
        """One DP update; returns the batch's mean per-patient loss (NaN if skipped)."""
        k = self.augmentations
        rows = int(np.shape(images)[0])
        if rows % k:
            raise FedsegError(f"DP step: batch of {rows} rows is not a multiple of "
                              f"augmentations K={k}")
        patients = rows // k
        self.steps_taken += 1
        if patients == 0:
            self.skipped_steps += 1
            return math.nan
        if self.config.optimizer == "sgd":
            # Realised -> expected normaliser: the same update as fedseg's trainer.
            keras.backend.set_value(
                self.optimizer.learning_rate,
                self.config.learning_rate * patients / self.config.expected_batch_size)
        images = tf.constant(images, tf.float32)
        labels = tf.constant(labels, tf.int32)
        known = tf.constant(known, tf.float32)
        losses: list[tf.Tensor] = []

        def patient_losses() -> tf.Tensor:
            per_row = self.loss_fn(labels, self.model(images, training=True), known)
            loss = tf.reduce_mean(tf.reshape(per_row, [patients, k]), axis=1)
            losses.append(loss)
            return loss

        self.optimizer.minimize(patient_losses, self.variables, tape=tf.GradientTape())
        return float(tf.reduce_mean(losses[-1]))
