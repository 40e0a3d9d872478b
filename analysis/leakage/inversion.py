"""Update inversion: what an honest-but-curious server can see in one client update.

Geiping et al. 2020 ("Inverting Gradients - How easy is it to break privacy in federated
learning?"): the server knows the global weights ``w0`` it sent, the weights ``w1`` the
client returned and the client's training settings. It optimises dummy CT patches ``x``
and dummy soft organ masks ``softmax(l)`` so that the update a simulated client would
compute from them, ``simulate(w0, x, softmax(l)) - w0``, points the same way as the real
update ``w1 - w0``:

    minimise  1 - cos(simulated update, real update) + tv_weight * TV(x)

The simulated client repeats the real one: ``local_steps`` unrolled steps of SGD (or Adam),
each with per-example gradients clipped to ``l2_norm_clip`` and summed, divided by the
expected batch size, exactly as :class:`fedseg_clinic.privacy.dp_sgd.DPTrainer` does (the
attacker does not know the DP noise and leaves it out: the noise is the defence). The
gradient of the objective flows through the simulated steps (second order, nested
``tf.GradientTape``): the steps run the real Keras U-Net with the simulated weights
(tensors that depend on the dummy data) in place of its variables
(:func:`weights_substituted`), so attacker and client share one model definition.

Threat model (Geiping et al.'s multi-step setting): the attacker knows the number of
local steps T and the batch size B but not the data. Like the real ClinicApp, the client
draws a fresh batch at every local step, so the unknowns are T x B patches: the attacker
optimises one dummy batch per step and the simulated step t uses dummy batch t. The real
client's Poisson sampling makes its batch size vary around B; the simulation (victim and
attacker) uses exactly B patches per step. ``ClientSettings(fresh_batches=False)`` keeps
the older assumption that the same batch is used at every step: the attacker's best case
(B unknown patches, each seen T times). Labels are soft (logits -> softmax over the 7
classes) and all classes are assumed labelled (the phantoms contour every organ).

The first GroupNormalization removes each channel's offset and scale, so the update says
almost nothing about a patch's absolute intensity. The attacker therefore starts from its
prior (the mean patch and label frequencies of other patients' patches) and gives the
result the prior's mean and standard deviation.

Quality of a reconstruction: PSNR and 3D SSIM of the CT patch (data range 2: patches are
HU windows mapped to [-1, 1]), mean organ Dice of argmax(soft masks) vs the true label
map, after matching reconstructed to true patches by the best pairing (Hungarian
assignment on PSNR) when the batch has more than one patch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from fedseg.analysis.leakage.victim import build_victim, phantom_patches
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.losses import DICE_SMOOTH, PROB_FLOOR
from fedseg_clinic.model.metrics import dice
from fedseg_clinic.model.unet import N_CLASSES, UNetConfig, build_unet
from fedseg_clinic.privacy.dp_sgd import DPConfig, make_optimizer, sum_query
from fedseg_clinic.tf_env import keras, tf

logger = logging.getLogger(__name__)

DATA_RANGE: float = 2.0  # patches live in [-1, 1]
SSIM_SIGMA: float = 1.0  # Gaussian window sigma in voxels (16^3 patches: small window)


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """What the server knows about the client's local training.

    Attributes:
        learning_rate: client learning rate.
        local_steps: number of local steps T.
        batch_size: patches per step (the expected batch size B: the normaliser).
        patch_size: (z, y, x) patch size.
        l2_norm_clip: per-example clip norm; None = no clipping (non-DP client, mean over
            the batch).
        optimizer: "sgd" or "adam".
        fresh_batches: True (the real ClinicApp, the default): a new batch at every local
            step, so the client's data are local_steps x batch_size patches. False: the
            same batch at every step (the attacker's best case; batch_size patches).
    """

    learning_rate: float
    local_steps: int
    batch_size: int
    patch_size: tuple[int, int, int]
    l2_norm_clip: float | None = None
    optimizer: str = "sgd"
    fresh_batches: bool = True

    @property
    def n_patches(self) -> int:
        """Distinct patches behind one update: the attack's unknowns."""
        return self.local_steps * self.batch_size if self.fresh_batches else self.batch_size

    def dp_config(self, noise_multiplier: float) -> DPConfig:
        """The DPTrainer settings of this client with DP noise ``noise_multiplier``.

        Without a clip norm the client is the non-DP baseline (no clipping, no noise).
        """
        return DPConfig(
            l2_norm_clip=self.l2_norm_clip or 1.0,
            noise_multiplier=None if self.l2_norm_clip is None else noise_multiplier,
            expected_batch_size=self.batch_size, learning_rate=self.learning_rate,
            optimizer=self.optimizer)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise FedsegError(f"learning_rate={self.learning_rate} must be > 0")
        if self.local_steps < 1:
            raise FedsegError(f"local_steps={self.local_steps} must be >= 1")
        if self.batch_size < 1:
            raise FedsegError(f"batch_size={self.batch_size} must be >= 1")
        if len(self.patch_size) != 3 or any(s < 1 for s in self.patch_size):
            raise FedsegError(f"patch_size={self.patch_size} must be three positive sides")
        if self.l2_norm_clip is not None and not self.l2_norm_clip > 0:
            raise FedsegError(f"l2_norm_clip={self.l2_norm_clip} must be > 0 (or None)")
        if self.optimizer not in ("sgd", "adam"):
            raise FedsegError(f"optimizer={self.optimizer!r} must be sgd or adam")
        if not isinstance(self.fresh_batches, bool):
            raise FedsegError(f"fresh_batches={self.fresh_batches!r} must be true or false")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Settings of the reconstruction.

    Attributes:
        iterations: optimisation steps on the dummy data.
        step_size: Adam learning rate on the dummy data (decayed x0.1 at 3/8, 5/8, 7/8
            of the iterations, as Geiping et al.).
        tv_weight: weight of the total-variation prior on the CT patch.
        seed: seed of the dummy data's initialisation.
        signed: feed the sign of the gradient to Adam (Geiping et al.'s choice).
    """

    iterations: int = 300
    step_size: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0
    signed: bool = False


@dataclasses.dataclass
class Reconstruction:
    """Result of one inversion.

    Attributes:
        images: reconstructed patches (b, z, y, x) in [-1, 1], matched to the truth order.
        labels: reconstructed label maps (b, z, y, x) uint8 (argmax of the soft masks).
        loss_history: attack objective every 10 iterations.
        seconds: wall time of the optimisation.
    """

    images: np.ndarray
    labels: np.ndarray
    loss_history: list[float]
    seconds: float


# ------------------------------------------------- the real model at given weights


def _weight_slots(model: keras.Model) -> list[tuple[keras.layers.Layer, str]]:
    """(layer, attribute) holding each of ``model.weights``, in get_weights() order."""
    index = {id(v): i for i, v in enumerate(model.weights)}
    slots: list[tuple[keras.layers.Layer, str] | None] = [None] * len(index)
    for layer in model.layers:
        for attribute, value in vars(layer).items():
            if isinstance(value, tf.Variable) and id(value) in index:
                slots[index[id(value)]] = (layer, attribute)
    missing = [model.weights[i].name for i, slot in enumerate(slots) if slot is None]
    if missing:
        raise FedsegError(f"the inversion attack cannot substitute weights "
                          f"{', '.join(missing)} of model {model.name}")
    return [slot for slot in slots if slot is not None]


def check_weights(model: keras.Model, arrays: Sequence[Any]) -> None:
    """Check that get_weights()-ordered arrays fit the model's weights.

    Raises:
        FedsegError: another number of arrays or another shape (a different
            architecture?).
    """
    if len(arrays) != len(model.weights):
        raise FedsegError(f"{len(arrays)} weight arrays, the U-Net {model.name} has "
                          f"{len(model.weights)} (different architecture?)")
    for array, variable in zip(arrays, model.weights, strict=True):
        if tuple(array.shape) != tuple(variable.shape):
            raise FedsegError(f"weight {variable.name.split(':')[0]} has shape "
                              f"{tuple(array.shape)}, the U-Net's is {tuple(variable.shape)} "
                              "(different architecture?)")


def architecture_of(config: UNetConfig, weights: Sequence[Any]) -> UNetConfig:
    """``config`` with the base width the weights have (their first kernel's channels).

    A stored update fixes the U-Net's widths; the levels (and so the number of weights)
    and the group count still come from ``config``.
    """
    if not weights or len(np.shape(weights[0])) != 5:
        return config
    return dataclasses.replace(config, base_filters=int(np.shape(weights[0])[-1]))


@contextlib.contextmanager
def weights_substituted(model: keras.Model, weights: Sequence[tf.Tensor]
                        ) -> Iterator[keras.Model]:
    """The model computing with ``weights`` (tensors) in place of its variables.

    The simulated client's step t + 1 runs the U-Net at weights that are tensors
    depending on the dummy data, and the attack differentiates through them (second
    order). Keras 2 layers read their weights from attributes (``kernel``, ``bias``,
    ``gamma``, ``beta``) at call time, so pointing these at the tensors runs the real
    model, not a copy of it; ``object.__setattr__`` bypasses Keras' weight tracking, and
    the variables are put back on exit.

    Args:
        model: the Keras model (its variables are neither read nor changed).
        weights: one tensor per ``model.weights`` entry, same order and shapes.

    Raises:
        FedsegError: the weights do not fit the model.
    """
    check_weights(model, weights)
    slots = _weight_slots(model)
    try:
        for (layer, attribute), tensor in zip(slots, weights, strict=True):
            object.__setattr__(layer, attribute, tensor)
        yield model
    finally:
        for (layer, attribute), variable in zip(slots, model.weights, strict=True):
            object.__setattr__(layer, attribute, variable)


def forward(model: keras.Model, weights: Sequence[tf.Tensor], images: tf.Tensor
            ) -> tf.Tensor:
    """Softmax probabilities of ``model`` at ``weights`` on ``images``, as in training.

    Differentiable with respect to both weights and images.
    """
    with weights_substituted(model, weights):
        return model(images, training=True)


def soft_per_example_loss(soft_labels: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """losses.per_example_loss for soft labels with every class known: CE + soft Dice.

    Equals per_example_loss(labels, probs, all-known) when ``soft_labels`` is one-hot.
    """
    log_p = tf.math.log(tf.clip_by_value(probs, PROB_FLOOR, 1.0))
    ce = -tf.reduce_mean(tf.reduce_sum(soft_labels * log_p, axis=-1), axis=[1, 2, 3])
    inter = tf.reduce_sum(probs * soft_labels, axis=[1, 2, 3])
    denom = tf.reduce_sum(probs, axis=[1, 2, 3]) + tf.reduce_sum(soft_labels, axis=[1, 2, 3])
    dice_c = (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return ce + tf.reduce_mean(1.0 - dice_c[:, 1:], axis=1)


@functools.cache
def client_adam_hyperparameters() -> tuple[float, float, float]:
    """(beta_1, beta_2, epsilon) of the client's Adam (dp_sgd.make_optimizer).

    Read once and cached: building a Keras optimizer creates variables, which a
    tf.function tolerates on its first trace only (:func:`invert_update` reads them
    before tracing).
    """
    adam = make_optimizer(DPConfig(l2_norm_clip=1.0, noise_multiplier=None,
                                   expected_batch_size=1, learning_rate=1.0,
                                   optimizer="adam"))
    return float(adam.beta_1), float(adam.beta_2), float(adam.epsilon)


def simulate_update(
    model: keras.Model,
    settings: ClientSettings,
    global_weights: Sequence[Any],
    images: tf.Tensor,
    soft_labels: tf.Tensor,
) -> list[tf.Tensor]:
    """The weight change a noise-free client would make on (images, soft_labels).

    Differentiable with respect to images and soft_labels (call it under a tape). The
    steps run ``model`` itself at the simulated weights (:func:`weights_substituted`);
    each per-example gradient is clipped and summed by the client's own TF Privacy query
    (:func:`fedseg_clinic.privacy.dp_sgd.sum_query`, without noise) and the optimiser
    step uses the client's optimiser's hyperparameters
    (:func:`client_adam_hyperparameters`), unrolled here because a Keras optimiser
    assigns variables, which cuts the gradient.

    Args:
        model: a Keras U-Net of the attacked architecture (built outside any
            tf.function; its variables are not used).
        settings: the client's settings; with ``fresh_batches`` step t trains on
            images[t * B:(t + 1) * B], otherwise every step trains on all of ``images``.
        global_weights: the starting weights (get_weights() order).
        images: (settings.n_patches, z, y, x, 1), step by step.
        soft_labels: (settings.n_patches, z, y, x, C).

    Returns:
        Per-weight updates (w_T - w_0) in get_weights() order.

    Raises:
        FedsegError: the number of patches does not fit the settings.
    """
    if int(images.shape[0]) != settings.n_patches:
        raise FedsegError(f"simulate_update: {int(images.shape[0])} patches, the settings "
                          f"(T={settings.local_steps}, B={settings.batch_size}, fresh "
                          f"batches {settings.fresh_batches}) need {settings.n_patches}")
    dp = settings.dp_config(0.0)
    query = sum_query(dp)
    clip = query.derive_sample_params(query.initial_global_state())
    start = [tf.convert_to_tensor(w, tf.float32) for w in global_weights]
    current = list(start)
    m = [tf.zeros_like(w) for w in start]
    v = [tf.zeros_like(w) for w in start]
    b = settings.batch_size
    for step in range(settings.local_steps):
        first = step * b if settings.fresh_batches else 0
        batch_images = images[first:first + b]
        batch_labels = soft_labels[first:first + b]
        if settings.l2_norm_clip is None:
            # Non-DP client: the mean of the per-example gradients, in one pass.
            with tf.GradientTape() as inner:
                inner.watch(current)
                probs = forward(model, current, batch_images)
                loss = tf.reduce_mean(soft_per_example_loss(batch_labels, probs))
            grads = inner.gradient(loss, current)
        else:
            total = query.initial_sample_state(current)
            for i in range(b):
                with tf.GradientTape() as inner:
                    inner.watch(current)
                    probs = forward(model, current, batch_images[i:i + 1])
                    loss = soft_per_example_loss(batch_labels[i:i + 1], probs)[0]
                total = query.accumulate_record(clip, total, inner.gradient(loss, current))
            grads = [t / float(settings.batch_size) for t in total]
        if settings.optimizer == "sgd":
            current = [w - settings.learning_rate * g for w, g in
                       zip(current, grads, strict=True)]
        else:
            beta1, beta2, epsilon = client_adam_hyperparameters()
            t = step + 1
            m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads, strict=True)]
            v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads, strict=True)]
            lr_t = settings.learning_rate * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            # sqrt(v + tiny) keeps the second derivative finite where a gradient is 0.
            current = [w - lr_t * mi / (tf.sqrt(vi + 1e-24) + epsilon)
                       for w, mi, vi in zip(current, m, v, strict=True)]
    return [c - s for c, s in zip(current, start, strict=True)]


def _cosine_distance(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
    dot = tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b, strict=True)])
    return 1.0 - dot / (tf.linalg.global_norm(list(a)) * tf.linalg.global_norm(list(b))
                        + 1e-12)


def total_variation(images: tf.Tensor) -> tf.Tensor:
    """Mean absolute difference between neighbouring voxels along z, y and x."""
    dz = tf.reduce_mean(tf.abs(images[:, 1:] - images[:, :-1]))
    dy = tf.reduce_mean(tf.abs(images[:, :, 1:] - images[:, :, :-1]))
    dx = tf.reduce_mean(tf.abs(images[:, :, :, 1:] - images[:, :, :, :-1]))
    return dz + dy + dx


def invert_update(
    config: UNetConfig,
    settings: ClientSettings,
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[np.ndarray],
    attack: AttackConfig,
    known_labels: np.ndarray | None = None,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> Reconstruction:
    """Reconstruct the client's patches from one update (unmatched order).

    The unknowns are ``settings.n_patches`` patches: one dummy batch per local step with
    fresh batches (step t uses dummies t * B .. (t + 1) * B - 1), else one batch.

    Args:
        config: the U-Net architecture of the weights.
        settings: the client's training settings.
        global_weights: the weights the client received (get_weights() order).
        client_weights: the weights it sent back.
        attack: the reconstruction's settings.
        known_labels: optional (n_patches, z, y, x) label maps the attacker knows (side
            information, e.g. an atlas); then only the CT patches are optimised.
        prior: optional (images, labels) patches of other patients: the dummy data
            start from their mean patch and most common labels, and the result gets
            their mean and standard deviation (the update is blind to a patch's
            intensity offset and scale, see the module docstring).

    Returns:
        The reconstruction in the attacker's order (see :func:`match_and_score`).

    Raises:
        FedsegError: the weight lists do not fit the architecture or each other, or the
            update is all zeros.
    """
    if config.residual or config.dropout > 0:
        raise FedsegError("the inversion attack supports U-Nets without residual "
                          "shortcuts and dropout only")
    # The architecture (widths as the weights have them); runs at the simulated weights.
    model = build_unet(architecture_of(config, global_weights), seed=0)
    check_weights(model, global_weights)
    client_adam_hyperparameters()  # outside the tf.function below (see there)
    if len(client_weights) != len(global_weights):
        raise FedsegError(f"client weights have {len(client_weights)} arrays, global "
                          f"weights {len(global_weights)}")
    real = []
    for index, (g, c) in enumerate(zip(global_weights, client_weights, strict=True)):
        if np.shape(g) != np.shape(c):
            raise FedsegError(f"weight {index}: global shape {np.shape(g)} != client shape "
                              f"{np.shape(c)}")
        real.append(tf.constant(np.asarray(c, np.float32) - np.asarray(g, np.float32)))
    if float(tf.linalg.global_norm(real)) == 0.0:
        raise FedsegError("the client update is all zeros: nothing to invert")

    rng = np.random.default_rng(attack.seed)
    shape = (settings.n_patches, *settings.patch_size)
    init_x = rng.uniform(-0.1, 0.1, (*shape, 1))
    init_logits = rng.normal(0.0, 0.1, (*shape, N_CLASSES))
    if prior is not None:
        init_x = init_x + prior[0].mean(axis=0)[None, ..., None]
        counts = np.stack([(prior[1] == k).mean(axis=0) for k in range(N_CLASSES)], -1)
        init_logits = init_logits + np.log(counts + 0.05)[None]
    x = tf.Variable(np.clip(init_x, -1, 1).astype(np.float32))
    logits = tf.Variable(init_logits.astype(np.float32))
    boundaries = [int(attack.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [attack.step_size * f for f in (1.0, 0.1, 0.01, 0.001)])
    opt = keras.optimizers.Adam(schedule)
    fixed = None
    if known_labels is not None:
        fixed = tf.one_hot(np.asarray(known_labels, np.int32), N_CLASSES)
    globals_t = [tf.constant(np.asarray(w, np.float32)) for w in global_weights]

    @tf.function
    def attack_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            soft = fixed if fixed is not None else tf.nn.softmax(logits, axis=-1)
            simulated = simulate_update(model, settings, globals_t, x, soft)
            objective = _cosine_distance(simulated, real) + attack.tv_weight * \
                total_variation(x)
        grads = tape.gradient(objective, [x, logits])
        if attack.signed:
            grads = [tf.sign(g) for g in grads]
        opt.apply_gradients(zip(grads, [x, logits], strict=True))
        x.assign(tf.clip_by_value(x, -1.0, 1.0))  # box constraint: the HU window
        return objective

    started = time.perf_counter()
    history: list[float] = []
    for it in range(attack.iterations):
        value = float(attack_step())
        if it % 10 == 0 or it == attack.iterations - 1:
            history.append(value)
    seconds = time.perf_counter() - started
    logger.info("inversion: %d iterations in %.1f s, final objective %.4f",
                attack.iterations, seconds, history[-1])
    images = x.numpy()[..., 0]
    if prior is not None:
        # Fill in the offset and scale the update cannot show from the prior's statistics.
        axes = (1, 2, 3)
        centred = images - images.mean(axis=axes, keepdims=True)
        spread = centred.std(axis=axes, keepdims=True)
        images = np.clip(prior[0].mean() + centred / np.maximum(spread, 1e-6)
                         * prior[0].std(axis=axes).mean(), -1.0, 1.0)
    return Reconstruction(
        images=images,
        labels=(np.asarray(known_labels, np.uint8) if known_labels is not None
                else np.argmax(logits.numpy(), axis=-1).astype(np.uint8)),
        loss_history=history,
        seconds=seconds,
    )


# ----------------------------------------------------------------------- quality


def psnr(reconstruction: np.ndarray, truth: np.ndarray, data_range: float = DATA_RANGE
         ) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical arrays)."""
    mse = float(np.mean((np.asarray(reconstruction, np.float64)
                         - np.asarray(truth, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim3d(reconstruction: np.ndarray, truth: np.ndarray, data_range: float = DATA_RANGE,
           sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of two 3D volumes with a Gaussian window.

    Hand-written (Wang et al. 2004, K1 = 0.01, K2 = 0.03, Gaussian-weighted local
    statistics) because no installed library computes it: scikit-image is not in the
    stack and TensorFlow's tf.image.ssim is 2D only. Local statistics come from
    scipy.ndimage.gaussian_filter (reflect padding), so the mean covers every voxel.
    """
    a = np.asarray(reconstruction, np.float64)
    b = np.asarray(truth, np.float64)
    if a.shape != b.shape:
        raise FedsegError(f"SSIM: shapes differ {a.shape} vs {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=3.0)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def correlation(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation of voxel intensities (0 when either patch is constant).

    Blind to a global affine change of intensity, which the attack cannot see: the first
    GroupNormalization removes each channel's offset and scale.
    """
    a = np.asarray(reconstruction, np.float64).ravel()
    b = np.asarray(truth, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def mask_dice(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Mean Dice over the organ classes 1..6 present in either map (NaN if none is)."""
    scores = [dice(pred_labels == k, true_labels == k) for k in range(1, N_CLASSES)]
    finite = [s for s in scores if not math.isnan(s)]
    return float(np.mean(finite)) if finite else math.nan


def match_and_score(
    reconstruction: Reconstruction, true_images: np.ndarray, true_labels: np.ndarray
) -> tuple[Reconstruction, dict[str, Any]]:
    """Pair reconstructed with true patches (best total PSNR) and score every pair.

    Args:
        reconstruction: the attack's output.
        true_images: (b, z, y, x) true patches in [-1, 1].
        true_labels: (b, z, y, x) true label maps.

    Returns:
        (reconstruction reordered to the truth's order, metrics dict with per-example
        lists psnr / ssim / mask_dice and their means).
    """
    b = true_images.shape[0]
    cost = np.array([[-psnr(reconstruction.images[j], true_images[i]) for j in range(b)]
                     for i in range(b)])
    _, cols = optimize.linear_sum_assignment(np.where(np.isfinite(cost), cost, -1e9))
    images = reconstruction.images[cols]
    labels = reconstruction.labels[cols]
    per_psnr = [psnr(images[i], true_images[i]) for i in range(b)]
    per_ssim = [ssim3d(images[i], true_images[i]) for i in range(b)]
    per_dice = [mask_dice(labels[i], true_labels[i]) for i in range(b)]
    per_corr = [correlation(images[i], true_images[i]) for i in range(b)]
    metrics = {
        "correlation": float(np.mean(per_corr)),
        "psnr": float(np.mean(per_psnr)),
        "ssim": float(np.mean(per_ssim)),
        "mask_dice": float(np.nanmean(per_dice)) if not all(map(math.isnan, per_dice))
        else math.nan,
        "psnr_per_example": per_psnr,
        "ssim_per_example": per_ssim,
        "mask_dice_per_example": per_dice,
    }
    matched = dataclasses.replace(reconstruction, images=images, labels=labels)
    return matched, metrics


def prior_baseline(true_images: np.ndarray, true_labels: np.ndarray,
                   prior_images: np.ndarray, prior_labels: np.ndarray) -> dict[str, float]:
    """Scores of the best guess without the update: the population's mean patch.

    Args:
        true_images: the client's true patches (b, z, y, x).
        true_labels: their label maps.
        prior_images: patches of *other* patients (the attacker's prior).
        prior_labels: their label maps.

    Returns:
        psnr / ssim / correlation of the mean prior patch and mask_dice of the voxelwise
        most common prior label, averaged over the true patches.
    """
    mean_patch = prior_images.mean(axis=0)
    counts = np.stack([(prior_labels == k).sum(axis=0) for k in range(N_CLASSES)])
    mode_labels = np.argmax(counts, axis=0).astype(np.uint8)
    dices = [mask_dice(mode_labels, t) for t in true_labels]
    return {
        "psnr": float(np.mean([psnr(mean_patch, t) for t in true_images])),
        "ssim": float(np.mean([ssim3d(mean_patch, t) for t in true_images])),
        "correlation": float(np.mean([correlation(mean_patch, t) for t in true_images])),
        "mask_dice": float(np.nanmean(dices)) if not all(map(math.isnan, dices))
        else math.nan,
    }


# ------------------------------------------------------------- simulated client, study

# A reconstruction is called recognisable when it shows the patient beyond what the
# population prior shows: its CT patch correlates with the truth at least
# CORRELATION_MARGIN more than the prior's mean patch does (visible structure: organ
# boundaries line up; the attack cannot see a global intensity offset/scale, hence
# correlation rather than PSNR), or its masks beat the prior's most-common-label guess by
# MASK_MARGIN Dice. Relative, because the mean patch alone already correlates 0.16-0.27
# with a phantom patch (measured on the study's patches).
CORRELATION_MARGIN: float = 0.1
MASK_MARGIN: float = 0.1
PRIOR_PATCHES: int = 8  # other patients' patches the attacker's prior is made of


@dataclasses.dataclass
class SimulatedClient:
    """A client update made by the project's real DPTrainer on phantom patches.

    Attributes:
        global_weights, client_weights: the weights before and after local training.
        images, labels: every patch the client trained on ((n_patches, z, y, x) in
            [-1, 1], uint8 labels), step by step: with fresh batches step t's batch is
            images[t * B:(t + 1) * B].
        prior_images, prior_labels: patches of other phantom patients (attacker's prior).
    """

    global_weights: list[np.ndarray]
    client_weights: list[np.ndarray]
    images: np.ndarray
    labels: np.ndarray
    prior_images: np.ndarray
    prior_labels: np.ndarray


def simulate_client(config: UNetConfig, settings: ClientSettings,
                    noise_multiplier: float | None, seed: int) -> SimulatedClient:
    """Train a fresh client: ``local_steps`` DPTrainer steps on phantom patches.

    As ClinicApp, the client takes a new batch of B patches (of B further patients) at
    every step, unless ``settings.fresh_batches`` is False (one batch for every step).
    Every patch comes from a distinct phantom patient; the attacker's prior is made of
    PRIOR_PATCHES further patients.

    Args:
        config: the (tiny) U-Net.
        settings: client settings; l2_norm_clip None means a non-DP client.
        noise_multiplier: DP sigma (ignored, must be None or 0, for a non-DP client).
        seed: model initialisation, phantoms and noise.
    """
    if len(set(settings.patch_size)) != 1:
        raise FedsegError(f"--simulate needs a cubic patch, got {settings.patch_size}")
    if settings.l2_norm_clip is None and noise_multiplier:
        raise FedsegError("DP noise needs a clip norm (l2_norm_clip)")
    b = settings.batch_size
    n = settings.n_patches
    images, labels = phantom_patches(n + PRIOR_PATCHES, settings.patch_size[0], seed)
    victim = build_victim(config, settings.dp_config(noise_multiplier or 0.0), seed)
    start = victim.weights()
    for step in range(settings.local_steps):
        first = step * b if settings.fresh_batches else 0
        victim.step(images[first:first + b], labels[first:first + b])
    return SimulatedClient(start, victim.weights(),
                           images[:n, ..., 0], labels[:n].astype(np.uint8),
                           images[n:, ..., 0], labels[n:].astype(np.uint8))


def recognisable(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
    """The stated threshold (see CORRELATION_MARGIN and MASK_MARGIN)."""
    mask_gain = metrics["mask_dice"] - baseline["mask_dice"]
    return bool(metrics["correlation"] - baseline["correlation"] >= CORRELATION_MARGIN
                or (math.isfinite(mask_gain) and mask_gain >= MASK_MARGIN))


def attack_simulated(config: UNetConfig, settings: ClientSettings,
                     noise_multiplier: float | None, attack: AttackConfig, seed: int,
                     secure_aggregation: bool = False
                     ) -> tuple[dict[str, Any], SimulatedClient, Reconstruction]:
    """Simulate a client, invert its update, score against the truth and the prior.

    Args:
        config: the (tiny) U-Net.
        settings: client settings (see :func:`simulate_client`).
        noise_multiplier: DP sigma of the client.
        attack: the reconstruction's settings.
        seed: model initialisation, phantoms and noise.
        secure_aggregation: Attack what the server stores under secure aggregation (the
            client's masked update, analysis/leakage/secure.py) instead of the update.

    Returns:
        (JSON-ready result, the simulated client, the matched reconstruction).
    """
    client = simulate_client(config, settings, noise_multiplier, seed)
    seen = client.client_weights
    if secure_aggregation:
        from fedseg.analysis.leakage.secure import masked_update_view

        seen = masked_update_view(client.global_weights, client.client_weights,
                                  settings.n_patches)
    rec = invert_update(config, settings, client.global_weights, seen,
                        attack, prior=(client.prior_images, client.prior_labels))
    matched, metrics = match_and_score(rec, client.images, client.labels)
    baseline = prior_baseline(client.images, client.labels, client.prior_images,
                              client.prior_labels)
    result = {
        "batch_size": settings.batch_size,
        "local_steps": settings.local_steps,
        "fresh_batches": settings.fresh_batches,
        "n_patches": settings.n_patches,
        "noise_multiplier": noise_multiplier,
        "settings": dataclasses.asdict(settings),
        "model": config.to_dict(),
        "attack": dataclasses.asdict(attack),
        "seed": seed,
        "secure_aggregation": secure_aggregation,
        **metrics,
        "baseline": baseline,
        "recognisable": recognisable(metrics, baseline),
        "objective": rec.loss_history[-1],
        "seconds": rec.seconds,
    }
    return result, client, matched


def attack_stored(config: UNetConfig, settings: ClientSettings, global_weights: Path,
                  client_weights: Path, attack: AttackConfig
                  ) -> tuple[dict[str, Any], Reconstruction]:
    """Invert a stored round's update (the truth is unknown: no quality metrics).

    Args:
        config: the U-Net architecture of the weights.
        settings: the client's training settings.
        global_weights: npz of the weights the client received.
        client_weights: npz of the weights it sent back.
        attack: the reconstruction's settings.

    Returns:
        (JSON-ready result, the reconstruction in the attacker's order).

    Raises:
        FedsegError: an unreadable npz, or weights that do not fit (see invert_update).
    """
    from fedseg_clinic.model.weights import load_weights_npz

    rec = invert_update(config, settings, load_weights_npz(global_weights),
                        load_weights_npz(client_weights), attack)
    result = {"global_weights": str(global_weights), "client_weights": str(client_weights),
              "settings": dataclasses.asdict(settings), "n_patches": settings.n_patches,
              "objective": rec.loss_history[-1], "seconds": rec.seconds,
              "note": "truth unknown: no quality metrics"}
    return result, rec


@dataclasses.dataclass(frozen=True)
class StudyGrid:
    """One-factor-at-a-time grid around batch 1, 1 local step, no noise.

    Attributes:
        batch_sizes: batch sizes tried (1 local step, no noise).
        local_steps: local step counts tried (batch 1, no noise).
        epsilons: target epsilons whose calibrated sigma is tried (batch 1, 1 step),
            besides sigma = 0.
        schedule: (patients N, expected batch B, total steps T, delta) the noise is
            calibrated for with accounting.calibrate_noise.
        sigmas: further noise multipliers below the calibrated ones (batch 1, 1 step),
            to locate where reconstructions stop being recognisable.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    local_steps: tuple[int, ...] = (1, 5, 20)
    epsilons: tuple[float, ...] = (8.0, 4.0, 1.0)
    sigmas: tuple[float, ...] = (0.001, 0.01, 0.1)
    schedule: tuple[int, int, int, float] = (100, 4, 100, 1e-3)


def run_study(config: UNetConfig, grid: StudyGrid, attack: AttackConfig, patch: int,
              learning_rate: float, l2_norm_clip: float, seed: int,
              fresh_batches: bool = True) -> dict[str, Any]:
    """Reconstruction quality vs batch size, local steps and DP noise.

    Args:
        config: the (tiny) U-Net.
        grid: the grid points.
        attack: the reconstruction's settings.
        patch: cubic patch side.
        learning_rate: client learning rate (SGD).
        l2_norm_clip: client clip norm.
        seed: model, phantoms and noise.
        fresh_batches: a new batch per local step (ClinicApp, the default); False = the
            same batch at every step (the attacker's best case).

    Returns:
        JSON-ready dict: rows (one per grid point), the sigma per epsilon, and the
        smallest sigma tried whose reconstruction is no longer recognisable.
    """
    from fedseg_clinic.privacy.accounting import calibrate_noise

    n, b, t, delta = grid.schedule
    sigmas = {eps: calibrate_noise(n, b, t, eps, delta) for eps in grid.epsilons}
    points: list[tuple[int, int, float, float | None]] = []
    for batch in grid.batch_sizes:
        points.append((batch, 1, 0.0, None))
    for steps in grid.local_steps:
        if steps != 1:
            points.append((1, steps, 0.0, None))
    for sigma in sorted(grid.sigmas):
        points.append((1, 1, sigma, None))
    for eps in sorted(grid.epsilons, reverse=True):
        points.append((1, 1, sigmas[eps], eps))
    rows = []
    for batch, steps, sigma, eps in points:
        settings = ClientSettings(learning_rate, steps, batch, (patch,) * 3, l2_norm_clip,
                                  fresh_batches=fresh_batches)
        result, _, _ = attack_simulated(config, settings, sigma, attack, seed)
        result["target_epsilon"] = eps
        rows.append(result)
        logger.info("study b=%d T=%d sigma=%.3g: corr %.3f ssim %.3f dice %.3f", batch,
                    steps, sigma, result["correlation"], result["ssim"], result["mask_dice"])
    noise_rows = sorted((r for r in rows if r["batch_size"] == 1 and r["local_steps"] == 1),
                        key=lambda r: r["noise_multiplier"])
    threshold = next((r["noise_multiplier"] for r in noise_rows if not r["recognisable"]),
                     None)
    return {
        "rows": rows,
        "sigma_for_epsilon": {str(k): v for k, v in sigmas.items()},
        "schedule": {"patients": n, "batch_size": b, "steps": t, "delta": delta},
        "smallest_unrecognisable_sigma": threshold,
        "threshold": {"correlation_margin": CORRELATION_MARGIN, "mask_margin": MASK_MARGIN},
        "fresh_batches": fresh_batches,
    }
