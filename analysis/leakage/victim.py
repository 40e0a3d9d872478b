"""The victim of the privacy attacks: a U-Net, its DP trainer and phantom patients' patches.

The inversion (:mod:`fedseg.analysis.leakage.inversion`), membership inference
(:mod:`fedseg.analysis.leakage.membership`) and the canary audit
(:mod:`fedseg.analysis.leakage.canary`) all attack the same kind of victim, built here
once: the project's own U-Net (:func:`fedseg_clinic.model.unet.build_unet`) trained by the
project's own DP-SGD (:class:`fedseg_clinic.privacy.dp_sgd.DPTrainer` with the clinic's
loss), on patches of phantom patients (:mod:`fedseg.orchestration.phantoms`), one patch per
patient, every organ labelled. Attacking the real trainer, not a copy, is the point: a
bug in the clinic's DP code shows up in the attacks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from fedseg_clinic.model.losses import per_example_loss
from fedseg_clinic.model.unet import N_CLASSES, UNetConfig, build_unet
from fedseg_clinic.privacy.dp_sgd import DPConfig, DPTrainer, poisson_sample
from fedseg_clinic.tf_env import keras, tf

# Patches per forward pass when scoring (bounds memory at 32^3 patches).
SCORE_CHUNK: int = 8

# alter(index, image, labels, rng) -> (image, labels): changes one patient's patch as it
# is drawn (the canary audit plants its canaries this way).
PatchAlteration = Callable[[int, np.ndarray, np.ndarray, np.random.Generator],
                           tuple[np.ndarray, np.ndarray]]


def phantom_patches(n: int, patch: int, seed: int, alter: PatchAlteration | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One organ-centred (patch)^3 patch of each of ``n`` phantom patients.

    Args:
        n: patients (one clinic of the "iid" preset, volumes of max(32, 2 * patch)^3).
        patch: cubic patch side.
        seed: phantoms and patch positions.
        alter: optional change applied to each patch as it is drawn, with the same
            generator (so a given seed always gives the same patches).

    Returns:
        images (n, p, p, p, 1) float32 in [-1, 1], labels (n, p, p, p) int32.
    """
    from fedseg.orchestration.phantoms import make_case, preset_spec
    from fedseg_clinic.patches import PatchSampler

    spec = preset_spec("iid", 1, n, max(32, 2 * patch), seed)
    sampler = PatchSampler((patch,) * 3, foreground_fraction=1.0, flip=False)
    rng = np.random.default_rng([seed, 1])
    images, labels = [], []
    for index in range(n):
        image, label = sampler.sample(make_case(spec, 0, index), rng)
        if alter is not None:
            image, label = alter(index, image, label, rng)
        images.append(np.asarray(image, np.float32))
        labels.append(np.asarray(label, np.int32))
    return np.stack(images), np.stack(labels)


def all_known(batch: int) -> np.ndarray:
    """Known-class vectors of ``batch`` patches: the phantoms contour every organ."""
    return np.ones((batch, N_CLASSES), np.float32)


@dataclasses.dataclass(frozen=True)
class VictimSettings:
    """The victim's training knobs, shared by the attacks' config dataclasses.

    The membership and canary configs inherit these fields (overriding the defaults of
    noise_multiplier, batch_size and steps) and add their own.

    Attributes:
        noise_multiplier: DP sigma; None = the non-private baseline (no clip, no noise).
        l2_norm_clip: per-patient clip norm.
        batch_size: expected batch size B (Poisson q = B / N).
        steps: DP-SGD steps.
        learning_rate: the optimiser's learning rate.
        delta: the run's delta (for the accountant's epsilon).
        patch: cubic patch side (one patch per patient).
        levels, base_filters, groups: the U-Net (tiny by default; the demo's is levels
            3, base 8, groups 4).
        optimizer: "sgd" or "adam" (the demo trains with Adam, lr 0.01).
        seed: everything random (phantoms, sampling, noise, initial weights).
    """

    noise_multiplier: float | None = None
    l2_norm_clip: float = 1.0
    batch_size: int = 4
    steps: int = 60
    learning_rate: float = 1.0
    delta: float = 1e-5
    patch: int = 8
    levels: int = 2
    base_filters: int = 4
    groups: int = 8
    optimizer: str = "sgd"
    seed: int = 0

    @property
    def unet(self) -> UNetConfig:
        """The victim's U-Net."""
        return UNetConfig(levels=self.levels, base_filters=self.base_filters,
                          groups=self.groups)

    @property
    def dp(self) -> DPConfig:
        """The victim's DP settings (batch_size is the expected batch size)."""
        return DPConfig(l2_norm_clip=self.l2_norm_clip,
                        noise_multiplier=self.noise_multiplier,
                        expected_batch_size=self.batch_size,
                        learning_rate=self.learning_rate, optimizer=self.optimizer)


@dataclasses.dataclass
class Victim:
    """A U-Net and the DP trainer that updates it in place.

    Attributes:
        model: the Keras U-Net.
        trainer: the project's DPTrainer on ``model`` with the clinic's per-example loss.
    """

    model: keras.Model
    trainer: DPTrainer

    def weights(self) -> list[np.ndarray]:
        """A copy of the current weights (get_weights() order)."""
        return [np.array(w) for w in self.model.get_weights()]

    def step(self, images: np.ndarray, labels: np.ndarray) -> float:
        """One DP step on a batch of patches (every class known); returns its loss."""
        return self.trainer.step(images, labels, all_known(len(images)))

    def train_poisson(self, images: np.ndarray, labels: np.ndarray, steps: int,
                      rng: np.random.Generator) -> list[float]:
        """``steps`` DP steps on Poisson-sampled patients, as ClinicApp samples them.

        Args:
            images: the training patients' patches (one per patient).
            labels: their label maps.
            steps: DP steps.
            rng: the sampling generator.

        Returns:
            Wall seconds of each step (the first one includes tracing).
        """
        seconds = []
        for _ in range(steps):
            mark = time.perf_counter()
            chosen = poisson_sample(len(images), self.trainer.config.expected_batch_size,
                                    rng)
            self.step(images[chosen], labels[chosen])
            seconds.append(time.perf_counter() - mark)
        return seconds

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax outputs of the model on patches, SCORE_CHUNK patches at a time."""
        return np.concatenate([
            self.model(tf.constant(images[first:first + SCORE_CHUNK]), training=False).numpy()
            for first in range(0, len(images), SCORE_CHUNK)])

    def losses(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-example training loss of each patch (every class known), (n,)."""
        losses = []
        for first in range(0, len(images), SCORE_CHUNK):
            chunk = slice(first, first + SCORE_CHUNK)
            probs = self.model(tf.constant(images[chunk]), training=False)
            losses.append(np.asarray(per_example_loss(labels[chunk], probs,
                                                      all_known(len(images[chunk])))))
        return np.concatenate(losses)


def build_victim(config: UNetConfig, dp: DPConfig, seed: int) -> Victim:
    """A fresh victim: Keras' global seeds and the initial weights come from ``seed``.

    Args:
        config: the U-Net architecture.
        dp: the DP settings (noise_multiplier None = the non-private baseline).
        seed: initial weights, and the DP noise of the trainer.
    """
    keras.utils.set_random_seed(seed)
    model = build_unet(config, seed=seed)
    return Victim(model, DPTrainer(model, per_example_loss, dp, seed=seed))
