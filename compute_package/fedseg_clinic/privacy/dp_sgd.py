"""Patient-level DP-SGD / DP-Adam: one private update per Poisson-sampled batch.

A step computes each example's gradient with its own batch-1 backward pass, inside one
``tf.function`` (a ``tf.while_loop`` over the batch). This was measured (see the TF
stack notes and bench/bench_dp_step.py) to cost about as much as a plain step, whereas
TF Privacy's stock optimizers (jacobian / vectorized_map) cost 1.5-4.5x and up to 2.5x
the memory on a 3D U-Net. Clipping and noise are not ours: every per-example gradient
goes through TF Privacy's ``GaussianSumQuery`` (clip to ``l2_norm_clip``, sum, add
N(0, (clip * sigma)^2) noise); tests show the update equals ``DPKerasSGDOptimizer``'s.

The noised sum is divided by the *expected* batch size B, not the realised one: the
Poisson subsampled Gaussian analysis (dp_accounting's ``PoissonSampledDpEvent``, as in
TF Privacy and Opacus) assumes a fixed normaliser; dividing by the realised size would
make the update itself depend on whether a patient was sampled. A batch of size 0 is a
valid, noise-only step. DP-Adam is Adam applied to the privatised gradient (post-
processing: no extra privacy cost).

One record = one patient: the caller puts one patch per sampled patient in the batch
(:func:`poisson_sample` draws patients, each with probability q = B / N), or K patches
per sampled patient (``augmentations``): that patient's gradient is then the gradient of
the mean loss over its K patches, clipped once, so one patient still moves the noised
sum by at most C and the accounting is unchanged (augmentation multiplicity, De et al.
2022).

Parameter-efficient DP fine-tuning: ``variables`` restricts the step to a subset of the
model's weights (e.g. GroupNorm scale/offset and biases). Only those get clipped, noised
gradients; the others are never touched. The clip and noise apply to the trained
subset's gradient alone, so noise / signal scales with sqrt(trained parameters).

The noise comes from a Philox ``tf.random.Generator`` of the trainer's own
(:func:`noise_generator`), not from TensorFlow's global generator: by default its 64-bit
key and 128-bit counter are drawn from the OS (``secrets``), 192 secret bits that nothing
outside the process knows, so an observer of the update cannot enumerate seeds to
subtract the noise. A seed makes it reproducible: an explicit opt-in for synthetic
experiments and attacks on our own models (docs/privacy-model.md, with the
floating-point caveats that remain).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.tf_env import keras, tf

# isort: split
# TF Privacy only after tf_env has set its skip flag (its top level needs the Estimator API).
import dp_accounting
from tensorflow_privacy.privacy.dp_query import gaussian_query, no_privacy_query

logger = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

# loss_fn(labels (b,z,y,x) int, probs (b,z,y,x,C), known (b,C) float) -> per-example (b,)
PerExampleLoss = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


@dataclass(frozen=True)
class DPConfig:
    """Settings of the private optimiser.

    Attributes:
        l2_norm_clip: Per-example (per-patient) gradient L2 clip norm C, > 0.
        noise_multiplier: sigma, >= 0: noise std is C * sigma. None = non-DP baseline
            (no clipping, no noise, mean over the realised batch) on the same code path.
        expected_batch_size: B, >= 1: the Poisson sampling's expected batch size and the
            normaliser of the noised gradient sum.
        learning_rate: Optimiser learning rate, > 0.
        optimizer: "sgd" or "adam" (Adam on the privatised gradient).
        proximal_mu: FedProx's mu >= 0: mu * (w - anchor) is added to the privatised
            gradient (data-independent, so after clipping and noise; no privacy cost).
            The anchor is the round's global model (:meth:`DPTrainer.set_anchor`).
    """

    l2_norm_clip: float
    noise_multiplier: float | None
    expected_batch_size: int
    learning_rate: float
    optimizer: str = "sgd"
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.l2_norm_clip) and self.l2_norm_clip > 0):
            raise FedsegError(f"l2_norm_clip={self.l2_norm_clip} must be a finite number > 0")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise FedsegError(
                f"noise_multiplier={self.noise_multiplier} must be a finite number >= 0 "
                "(or None for non-DP training)"
            )
        if (isinstance(self.expected_batch_size, bool)
                or not isinstance(self.expected_batch_size, int | np.integer)
                or self.expected_batch_size < 1):
            raise FedsegError(
                f"expected_batch_size={self.expected_batch_size!r} must be an integer >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise FedsegError(f"learning_rate={self.learning_rate} must be a finite number > 0")
        if self.optimizer not in OPTIMIZERS:
            raise FedsegError(
                f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise FedsegError(f"proximal_mu={self.proximal_mu} must be a finite number >= 0")

    @property
    def private(self) -> bool:
        """True unless this is the non-DP baseline (noise_multiplier None)."""
        return self.noise_multiplier is not None


def poisson_sample(
    n_patients: int, expected_batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Poisson sampling: each patient joins the batch independently with q = B / N.

    This is exactly the sampling ``accounting.compute_epsilon`` assumes; the batch size
    varies (and may be 0).

    Args:
        n_patients: N >= 1.
        expected_batch_size: B, 1 <= B <= N.
        rng: The generator to draw from.

    Returns:
        Sorted int64 indices of the sampled patients.

    Raises:
        FedsegError: N or B out of range.
    """
    if n_patients < 1:
        raise FedsegError(f"number of patients N={n_patients} must be >= 1")
    if not 1 <= expected_batch_size <= n_patients:
        raise FedsegError(
            f"expected batch size B={expected_batch_size} must be in [1, N={n_patients}]")
    q = expected_batch_size / n_patients
    return np.flatnonzero(rng.random(n_patients) < q).astype(np.int64)


def _int64(bits: int) -> int:
    """An unsigned 64-bit draw as the signed int64 TensorFlow stores."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def noise_generator(seed: int | None = None) -> tf.random.Generator:
    """The Philox generator the DP noise is drawn from.

    Args:
        seed: None (the default) draws the key (64 bits) and the starting counter (128
            bits) from the OS's secret randomness; an int gives a reproducible stream
            (explicit opt-in: anyone who knows the seed can recompute the noise).
    """
    if seed is None:
        return tf.random.Generator.from_key_counter(
            key=_int64(secrets.randbits(64)),
            counter=[_int64(secrets.randbits(64)), _int64(secrets.randbits(64))],
            alg="philox")
    return tf.random.Generator.from_seed(int(seed), alg="philox")


class KeyedGaussianSumQuery(gaussian_query.GaussianSumQuery):
    """TF Privacy's Gaussian sum query with the noise drawn from our keyed generator.

    Clipping, accumulation and the DP event stay TF Privacy's; only the source of the
    N(0, stddev^2) noise changes (TF Privacy draws from TensorFlow's global generator,
    whose seed is at most 64 bits and process-global).
    """

    def __init__(self, l2_norm_clip: float, stddev: float,
                 generator: tf.random.Generator) -> None:
        super().__init__(l2_norm_clip=l2_norm_clip, stddev=stddev)
        self._generator = generator

    def get_noised_result(self, sample_state: object, global_state: object
                          ) -> tuple[object, object, dp_accounting.DpEvent]:
        """The summed, clipped records plus Gaussian noise of the query's stddev."""
        stddev = global_state.stddev  # type: ignore[attr-defined]

        def add_noise(v: tf.Tensor) -> tf.Tensor:
            noise = self._generator.normal(tf.shape(v), stddev=stddev, dtype=tf.float32)
            return v + tf.cast(noise, v.dtype)

        result = tf.nest.map_structure(add_noise, sample_state)
        event = dp_accounting.GaussianDpEvent(
            stddev / global_state.l2_norm_clip)  # type: ignore[attr-defined]
        return result, global_state, event


def make_optimizer(config: DPConfig) -> keras.optimizers.Optimizer:
    """The Keras 2 optimiser that applies the (privatised) gradient."""
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=config.learning_rate)
    return keras.optimizers.SGD(learning_rate=config.learning_rate)


def sum_query(config: DPConfig, generator: tf.random.Generator | None = None
              ) -> gaussian_query.GaussianSumQuery | no_privacy_query.NoPrivacySumQuery:
    """TF Privacy's query that clips each per-example gradient and sums them (with noise).

    The non-DP baseline (noise_multiplier None) sums without clipping or noise. Also the
    update inversion's model of the client (fedseg.analysis.leakage.inversion) clips
    through it, so attacker and client clip alike.

    Args:
        config: The DP settings.
        generator: Where the noise comes from (:func:`noise_generator`); None keeps TF
            Privacy's own draw from TensorFlow's global generator (only for callers that
            never release the noised sum, like the inversion's clipping model).
    """
    if config.noise_multiplier is None:
        return no_privacy_query.NoPrivacySumQuery()
    stddev = config.l2_norm_clip * config.noise_multiplier
    if generator is None:
        return gaussian_query.GaussianSumQuery(l2_norm_clip=config.l2_norm_clip,
                                               stddev=stddev)
    return KeyedGaussianSumQuery(config.l2_norm_clip, stddev, generator)


class DPTrainer:
    """Takes DP-SGD / DP-Adam steps on a Keras model.

    Args:
        model: A Keras 2 model (images (b, z, y, x, ch) -> probs (b, z, y, x, C)). It
            must have no cross-example layers (BatchNormalization) - GroupNorm is fine.
            ``model.losses`` (weight regularisers) are not included in the step.
        loss_fn: Per-example loss (labels, probs, known) -> (b,).
        config: The DP settings.
        seed: None (the default): the noise generator's key and counter are secret OS
            randomness (:func:`noise_generator`). An int makes the noise reproducible
            (same seed, same noise sequence): synthetic experiments only.
        parallel_iterations: Per-example backward passes run concurrently; 1 keeps the
            peak memory at that of a batch-1 step.
        variables: The variables to train (a subset of ``model.trainable_variables``);
            None trains all of them.
        augmentations: K >= 1 patches per sampled patient: a batch holds K consecutive
            rows per patient and the patient's gradient is that of its mean loss.
    """

    def __init__(
        self,
        model: keras.Model,
        loss_fn: PerExampleLoss,
        config: DPConfig,
        seed: int | None = None,
        parallel_iterations: int = 1,
        variables: Sequence[tf.Variable] | None = None,
        augmentations: int = 1,
    ) -> None:
        if isinstance(augmentations, bool) or not isinstance(augmentations, int | np.integer) \
                or augmentations < 1:
            raise FedsegError(f"augmentations={augmentations!r} must be an integer >= 1")
        self.model = model
        self.variables = list(model.trainable_variables if variables is None else variables)
        if not self.variables:
            raise FedsegError("DP trainer: no variables to train")
        self.augmentations = int(augmentations)
        self.loss_fn = loss_fn
        self.config = config
        self.seed = seed
        self.parallel_iterations = parallel_iterations
        self.optimizer = make_optimizer(config)
        self.optimizer.build(self.variables)
        self.steps_taken = 0
        # Our own keyed generator (module doc); None for the non-DP baseline.
        self._noise = noise_generator(seed) if config.private else None
        self._query = sum_query(config, self._noise)
        self._global_state = self._query.initial_global_state()
        self._step_fn: Callable[..., tf.Tensor] | None = None
        # FedProx's anchor: the round's global values of the trained weights.
        self._anchor = [tf.Variable(v, trainable=False) for v in self.variables] \
            if config.proximal_mu > 0 else []

    def set_anchor(self) -> None:
        """Take the trained weights' current values (the global model) as FedProx anchor."""
        for anchor, variable in zip(self._anchor, self.variables, strict=False):
            anchor.assign(variable)

    def _trace(self, images: np.ndarray, known: np.ndarray) -> Callable[..., tf.Tensor]:
        """Build the step's tf.function: any batch size and patch shape, one trace."""
        signature = [
            tf.TensorSpec([None, None, None, None, images.shape[-1]], tf.float32),
            tf.TensorSpec([None, None, None, None], tf.int32),
            tf.TensorSpec([None, known.shape[-1]], tf.float32),
        ]
        return tf.function(self._step_graph, input_signature=signature)

    def _step_graph(self, images: tf.Tensor, labels: tf.Tensor, known: tf.Tensor) -> tf.Tensor:
        variables = self.variables
        params = self._query.derive_sample_params(self._global_state)
        k = self.augmentations
        batch = tf.shape(images)[0] // k  # patients; rows i*K..i*K+K-1 are patient i's

        def body(i: tf.Tensor, loss_sum: tf.Tensor, state: list[tf.Tensor]
                 ) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
            rows = slice(i * k, (i + 1) * k)
            with tf.GradientTape() as tape:
                probs = self.model(images[rows], training=True)
                # One record per patient: the mean over its K patches, clipped once below.
                loss = tf.reduce_mean(self.loss_fn(labels[rows], probs, known[rows]))
            grads = tape.gradient(
                loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            # TF Privacy clips this record (its global L2 norm) and adds it to the sum.
            state = self._query.accumulate_record(params, state, grads)
            return i + 1, loss_sum + tf.cast(loss, tf.float32), state

        _, loss_sum, state = tf.while_loop(
            lambda i, _loss, _state: i < batch,
            body,
            (tf.constant(0), tf.constant(0.0), self._query.initial_sample_state(variables)),
            parallel_iterations=self.parallel_iterations,
        )
        noised_sum, _, _ = self._query.get_noised_result(state, self._global_state)
        if self.config.private:
            denominator = tf.constant(float(self.config.expected_batch_size))
        else:
            denominator = tf.cast(tf.maximum(batch, 1), tf.float32)
        grads = [g / tf.cast(denominator, g.dtype) for g in noised_sum]
        if self._anchor:  # FedProx: no patient in it, so outside the DP mechanism
            mu = self.config.proximal_mu
            grads = [g + mu * (v - a) for g, v, a in zip(grads, variables, self._anchor,
                                                         strict=True)]
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.where(batch > 0, loss_sum / tf.cast(tf.maximum(batch, 1), tf.float32),
                        tf.constant(math.nan))

    def reseed(self, seed: int | None) -> None:
        """Restart the noise stream: from fresh secret randomness (None) or a seed."""
        self.seed = seed
        if self.config.private:
            fresh = noise_generator(seed)
            self._noise.reset(fresh.state)  # the traced step keeps reading this variable

    def step(self, images: np.ndarray, labels: np.ndarray, known: np.ndarray) -> float:
        """One private update on a (Poisson-sampled) batch.

        Args:
            images: float (b * K, z, y, x, ch), K consecutive rows per patient; b may
                be 0 (a noise-only step).
            labels: int (b * K, z, y, x).
            known: float (b * K, C) known-class vectors.

        Returns:
            Mean per-example loss of the batch before the update; NaN when b == 0.

        Raises:
            FedsegError: The arrays' batch sizes or ranks disagree.
        """
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int32)
        known = np.asarray(known, dtype=np.float32)
        if images.ndim != 5 or labels.ndim != 4 or known.ndim != 2:
            raise FedsegError(
                f"DP step: expected images (b,z,y,x,ch), labels (b,z,y,x), known (b,C); got "
                f"shapes {images.shape}, {labels.shape}, {known.shape}")
        if not images.shape[0] == labels.shape[0] == known.shape[0]:
            raise FedsegError(
                f"DP step: batch sizes differ: images {images.shape[0]}, labels "
                f"{labels.shape[0]}, known {known.shape[0]}")
        if images.shape[0] % self.augmentations:
            raise FedsegError(
                f"DP step: batch of {images.shape[0]} rows is not a multiple of "
                f"augmentations K={self.augmentations}")
        if self._step_fn is None:
            self._step_fn = self._trace(images, known)
        loss = float(self._step_fn(images, labels, known))
        self.steps_taken += 1
        return loss


def patient_gradient_fn(model: keras.Model, loss_fn: PerExampleLoss,
                        variables: Sequence[tf.Variable], l2_norm_clip: float
                        ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]:
    """One patient's clipped gradient, for distributed DP (privacy/skellam.py).

    The patient's K patches form one record: the gradient of their mean loss, clipped to
    ``l2_norm_clip`` by TF Privacy's query (as :class:`DPTrainer` clips), returned
    without noise: the caller turns it into integers and the noise is added to the sum.

    Returns:
        f(images (K,z,y,x,ch), labels (K,z,y,x), known (K,C)) -> clipped gradient arrays
        in ``variables`` order.
    """
    query = gaussian_query.GaussianSumQuery(l2_norm_clip=float(l2_norm_clip), stddev=0.0)
    params = query.derive_sample_params(query.initial_global_state())
    variables = list(variables)

    @tf.function(reduce_retracing=True)
    def clipped(images: tf.Tensor, labels: tf.Tensor, known: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            probs = model(images, training=True)
            loss = tf.reduce_mean(loss_fn(labels, probs, known))
        grads = tape.gradient(loss, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return query.preprocess_record(params, grads)

    def run(images: np.ndarray, labels: np.ndarray, known: np.ndarray) -> list[np.ndarray]:
        out = clipped(np.asarray(images, np.float32), np.asarray(labels, np.int32),
                      np.asarray(known, np.float32))
        return [np.asarray(g) for g in out]

    return run
