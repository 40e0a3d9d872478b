"""DP-SGD / DP-Adam step: checked against hand-computed clipping, plain SGD and TF Privacy."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.dp_sgd import DPConfig, DPTrainer, poisson_sample
from fedseg_clinic.tf_env import keras, tf

N_CLASSES = 3
SHAPE = (4, 4, 4)


def tiny_model(seed: int = 0) -> keras.Model:
    """Conv3D + GroupNorm + softmax head: the U-Net's layer kinds, a few hundred weights."""
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.Conv3D(4, 3, padding="same", kernel_initializer=init)(inputs)
    x = keras.layers.GroupNormalization(groups=2)(x)
    x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Conv3D(N_CLASSES, 1, activation="softmax",
                                  kernel_initializer=init)(x)
    return keras.Model(inputs, outputs)


def ce_loss(labels: tf.Tensor, probs: tf.Tensor, known: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy, classes weighted by `known` (so it is used)."""
    onehot = tf.one_hot(labels, N_CLASSES) * known[:, None, None, None, :]
    log_p = tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0))
    return -tf.reduce_mean(tf.reduce_sum(onehot * log_p, axis=-1), axis=[1, 2, 3])


def batch(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *SHAPE, 1)).astype(np.float32) * 3.0
    labels = rng.integers(0, N_CLASSES, size=(n, *SHAPE)).astype(np.int32)
    known = np.ones((n, N_CLASSES), np.float32)
    if n > 1:
        known[1, 2] = 0.0
    return images, labels, known


def clone(model: keras.Model) -> keras.Model:
    other = tiny_model()
    other.set_weights(model.get_weights())
    return other


def weights(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.trainable_variables]


def per_example_grads(model: keras.Model, data: tuple) -> list[list[np.ndarray]]:
    images, labels, known = data
    out = []
    for i in range(len(images)):
        with tf.GradientTape() as tape:
            loss = ce_loss(labels[i:i + 1], model(images[i:i + 1]), known[i:i + 1])[0]
        out.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    return out


def clipped_mean(grads: list[list[np.ndarray]], clip: float, denominator: float
                 ) -> list[np.ndarray]:
    """Hand-written per-example clipping to global norm `clip`, summed, divided."""
    total = [np.zeros_like(g) for g in grads[0]]
    for example in grads:
        norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in example))
        scale = min(1.0, clip / norm)
        total = [t + g * scale for t, g in zip(total, example, strict=True)]
    return [t / denominator for t in total]


def assert_weights_close(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"l2_norm_clip": 0.0}, "l2_norm_clip=0.0"),
    ({"l2_norm_clip": float("nan")}, "l2_norm_clip=nan"),
    ({"noise_multiplier": -1.0}, "noise_multiplier=-1.0"),
    ({"expected_batch_size": 0}, "expected_batch_size=0"),
    ({"expected_batch_size": 2.5}, "expected_batch_size=2.5"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"optimizer": "rmsprop"}, "rmsprop"),
])
def test_config_refuses_bad_values(kwargs: dict, fragment: str) -> None:
    args = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 2,
            "learning_rate": 0.1, **kwargs}
    with pytest.raises(FedsegError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        DPConfig(**args)


def test_config_private_flag() -> None:
    assert DPConfig(1.0, 0.0, 2, 0.1).private
    assert not DPConfig(1.0, None, 2, 0.1).private


def test_poisson_sample_has_rate_q_and_is_reproducible() -> None:
    sizes = [len(poisson_sample(50, 5, np.random.default_rng(s))) for s in range(2000)]
    assert np.mean(sizes) == pytest.approx(5.0, abs=0.15)  # E = N q = B
    assert np.var(sizes) == pytest.approx(50 * 0.1 * 0.9, rel=0.15)  # binomial variance
    assert 0 in sizes  # empty batches do happen
    a = poisson_sample(50, 5, np.random.default_rng(7))
    b = poisson_sample(50, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0) and (len(a) == 0 or (a[0] >= 0 and a[-1] < 50))
    np.testing.assert_array_equal(poisson_sample(4, 4, np.random.default_rng(0)), np.arange(4))


@pytest.mark.parametrize(("n", "b"), [(0, 1), (5, 0), (5, 6)])
def test_poisson_sample_refuses_bad_sizes(n: int, b: int) -> None:
    with pytest.raises(FedsegError):
        poisson_sample(n, b, np.random.default_rng(0))


# Example gradient norms are 0.67-1.08: 0.9 clips some examples and leaves others.
@pytest.mark.parametrize(("n", "expected_batch", "clip"),
                         [(3, 3, 0.05), (2, 4, 0.2), (3, 2, 1e-3), (3, 3, 0.9)])
def test_zero_noise_step_equals_hand_clipped_sgd(n: int, expected_batch: int, clip: float
                                                 ) -> None:
    model = tiny_model()
    data = batch(n)
    before = weights(model)
    expected_grad = clipped_mean(per_example_grads(model, data), clip, expected_batch)
    trainer = DPTrainer(model, ce_loss, DPConfig(clip, 0.0, expected_batch, 0.5), seed=0)
    trainer.step(*data)
    after = weights(model)
    # The normaliser is the EXPECTED batch size, whatever the realised one.
    assert_weights_close(after, [w - 0.5 * g for w, g in zip(before, expected_grad, strict=True)])


def test_zero_noise_step_equals_tf_privacy_dp_keras_sgd() -> None:
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasSGDOptimizer

    images, labels, known = batch(3)
    ours, theirs = tiny_model(), tiny_model()
    theirs.set_weights(ours.get_weights())
    DPTrainer(ours, ce_loss, DPConfig(0.05, 0.0, 3, 0.5), seed=0).step(images, labels, known)
    optimizer = DPKerasSGDOptimizer(l2_norm_clip=0.05, noise_multiplier=0.0,
                                    num_microbatches=3, learning_rate=0.5)
    optimizer.minimize(lambda: ce_loss(labels, theirs(images), known),
                       theirs.trainable_variables, tape=tf.GradientTape())
    assert_weights_close(weights(ours), weights(theirs))
    assert not np.allclose(weights(ours)[0], tiny_model().get_weights()[0])  # it moved


@pytest.mark.parametrize("noise", [0.0, None])
def test_huge_clip_and_no_noise_equals_plain_sgd(noise: float | None) -> None:
    model = tiny_model()
    plain = clone(model)
    images, labels, known = batch(3)
    DPTrainer(model, ce_loss, DPConfig(1e6, noise, 3, 0.5), seed=0).step(images, labels, known)
    sgd = keras.optimizers.SGD(learning_rate=0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(ce_loss(labels, plain(images), known))
    sgd.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables),
                            plain.trainable_variables, strict=True))
    assert_weights_close(weights(model), weights(plain))


def test_non_dp_mode_averages_over_realised_batch() -> None:
    model = tiny_model()
    data = batch(2)
    before = weights(model)
    grad = clipped_mean(per_example_grads(model, data), 1e9, 2)  # the plain mean
    DPTrainer(model, ce_loss, DPConfig(1e-3, None, 5, 0.5), seed=0).step(*data)
    assert_weights_close(weights(model), [w - 0.5 * g for w, g in zip(before, grad, strict=True)])


def test_empty_batch_is_a_noise_only_step() -> None:
    model = tiny_model()
    before = weights(model)
    empty = batch(1)
    empty = tuple(a[:0] for a in empty)
    trainer = DPTrainer(model, ce_loss, DPConfig(2.0, 1.0, 4, 1.0), seed=3)
    loss = trainer.step(*empty)
    assert np.isnan(loss)
    update = np.concatenate([(b - a).ravel() for a, b in zip(weights(model), before,
                                                            strict=True)])
    # noise N(0, (clip sigma)^2) / B = N(0, 0.5^2), times lr 1
    assert update.std() == pytest.approx(0.5, rel=0.2)
    assert abs(update.mean()) < 0.1


def test_empty_batch_without_noise_changes_nothing() -> None:
    model = tiny_model()
    before = weights(model)
    empty = tuple(a[:0] for a in batch(1))
    assert np.isnan(DPTrainer(model, ce_loss, DPConfig(2.0, 0.0, 4, 1.0), seed=3).step(*empty))
    assert_weights_close(weights(model), before, atol=0.0)


def test_same_seed_same_noise_other_seed_other_noise() -> None:
    data = batch(2)

    def run(seed: int) -> list[np.ndarray]:
        model = tiny_model()
        trainer = DPTrainer(model, ce_loss, DPConfig(0.1, 1.0, 2, 0.1), seed=seed)
        trainer.step(*data)
        trainer.step(*data)
        return weights(model)

    a, b, c = run(11), run(11), run(12)
    assert_weights_close(a, b, atol=0.0)
    assert not np.allclose(a[0], c[0])


def test_secret_key_two_trainings_same_settings_draw_different_noise() -> None:
    """No seed: the Philox key and counter come from the OS, so nothing repeats them."""
    empty = tuple(a[:0] for a in batch(1))  # noise-only steps: the update is the noise

    def noise_of_one_training() -> np.ndarray:
        model = tiny_model()
        before = weights(model)[0]
        DPTrainer(model, ce_loss, DPConfig(1.0, 1.0, 2, 1.0)).step(*empty)
        return weights(model)[0] - before

    a, b = noise_of_one_training(), noise_of_one_training()
    assert not np.allclose(a, b)
    # Both are N(0, (clip sigma / B)^2) = N(0, 0.5^2) per coordinate.
    for draw in (a, b):
        assert 0.35 < float(np.std(draw)) < 0.65


def test_reseed_restarts_a_reproducible_stream_and_renews_a_secret_one() -> None:
    empty = tuple(a[:0] for a in batch(1))
    model = tiny_model()
    trainer = DPTrainer(model, ce_loss, DPConfig(1.0, 1.0, 2, 1.0), seed=5)
    steps = []
    for seed in (5, 5, None):
        trainer.reseed(seed)
        before = weights(model)[0]
        trainer.step(*empty)
        steps.append(weights(model)[0] - before)
    np.testing.assert_allclose(steps[0], steps[1], atol=1e-6)  # same noise (weights moved)
    assert not np.allclose(steps[1], steps[2])


def test_noise_differs_from_step_to_step() -> None:
    model = tiny_model()
    trainer = DPTrainer(model, ce_loss, DPConfig(1.0, 1.0, 2, 1.0), seed=0)
    empty = tuple(a[:0] for a in batch(1))
    w0 = weights(model)[0]
    trainer.step(*empty)
    w1 = weights(model)[0]
    trainer.step(*empty)
    w2 = weights(model)[0]
    assert not np.allclose(w1 - w0, w2 - w1)


def test_dp_adam_is_adam_on_the_privatised_gradient() -> None:
    model = tiny_model()
    reference = clone(model)
    data = batch(3)
    grad = clipped_mean(per_example_grads(model, data), 0.05, 3)
    DPTrainer(model, ce_loss, DPConfig(0.05, 0.0, 3, 0.01, "adam"), seed=0).step(*data)
    adam = keras.optimizers.Adam(learning_rate=0.01)
    adam.apply_gradients(zip([tf.constant(g) for g in grad], reference.trainable_variables,
                             strict=True))
    assert_weights_close(weights(model), weights(reference))


def test_varying_batch_sizes_trace_once_and_return_mean_loss() -> None:
    model = tiny_model()
    trainer = DPTrainer(model, ce_loss, DPConfig(1.0, 0.5, 2, 0.01), seed=0)
    for n in (3, 1, 0, 2):
        data = batch(n) if n else tuple(a[:0] for a in batch(1))
        expected = float(np.mean(ce_loss(data[1], model(data[0]), data[2]))) if n else None
        loss = trainer.step(*data)
        if n:
            assert loss == pytest.approx(expected, rel=1e-5)
    assert trainer._step_fn.experimental_get_tracing_count() == 1
    assert trainer.steps_taken == 4


@pytest.mark.parametrize("cut", ["labels", "known", "rank"])
def test_step_refuses_mismatched_arrays(cut: str) -> None:
    images, labels, known = batch(2)
    if cut == "labels":
        labels = labels[:1]
    elif cut == "known":
        known = known[:1]
    else:
        images = images[..., 0]
    trainer = DPTrainer(tiny_model(), ce_loss, DPConfig(1.0, 1.0, 2, 0.1), seed=0)
    with pytest.raises(FedsegError, match="DP step"):
        trainer.step(images, labels, known)


@pytest.mark.slow
def test_unet_step_with_project_loss_equals_tf_privacy() -> None:
    """The real model and loss: our zero-noise step equals DPKerasSGDOptimizer's."""
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasSGDOptimizer

    from fedseg_clinic.model.losses import per_example_loss
    from fedseg_clinic.model.unet import N_CLASSES as C
    from fedseg_clinic.model.unet import UNetConfig, build_unet, class_known

    config = UNetConfig(levels=2, base_filters=4, groups=2)
    ours, theirs = build_unet(config, seed=0), build_unet(config, seed=0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, C, size=(2, 8, 8, 8)).astype(np.int32)
    known = np.stack([np.ones(C, np.float32), class_known(["body", "heart"])])
    trainer = DPTrainer(ours, per_example_loss, DPConfig(0.1, 0.0, 2, 0.5), seed=0)
    loss = trainer.step(images, labels, known)
    assert np.isfinite(loss)
    optimizer = DPKerasSGDOptimizer(l2_norm_clip=0.1, noise_multiplier=0.0,
                                    num_microbatches=2, learning_rate=0.5)
    optimizer.minimize(lambda: per_example_loss(labels, theirs(images, training=True), known),
                       theirs.trainable_variables, tape=tf.GradientTape())
    assert_weights_close(weights(ours), weights(theirs), atol=1e-5)
    assert not np.allclose(weights(ours)[0], build_unet(config, seed=0).get_weights()[0])


def test_subset_of_variables_trains_only_those_with_clip_on_the_subset() -> None:
    model = tiny_model()
    data = batch(3)
    subset = [v for v in model.trainable_variables if "group_normalization" in v.name
              or v.name.endswith("bias:0")]
    assert 0 < len(subset) < len(model.trainable_variables)
    chosen = {id(v) for v in subset}
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    grads = per_example_grads(model, data)
    index = [i for i, v in enumerate(model.trainable_variables) if id(v) in chosen]
    # Clipping is to the norm of the trained subset's gradient alone.
    expected = clipped_mean([[g[i] for i in index] for g in grads], 0.05, 3)
    trainer = DPTrainer(model, ce_loss, DPConfig(0.05, 0.0, 3, 0.5), seed=0, variables=subset)
    trainer.step(*data)
    for v in model.trainable_variables:
        if id(v) not in chosen:
            assert np.array_equal(v.numpy(), before[v.name]), v.name  # bit-identical
    assert_weights_close([v.numpy() for v in subset],
                         [before[v.name] - 0.5 * g for v, g in zip(subset, expected, strict=True)])


@pytest.mark.parametrize("clip", [1e-3, 0.9, 100.0])
def test_k_augmentations_clip_the_patient_mean_once(clip: float) -> None:
    """Hand computation: a patient's record is the mean of its K patch gradients."""
    model = tiny_model()
    k, patients = 3, 2
    images, labels, known = batch(k * patients, seed=5)
    known[:] = 1.0
    before = weights(model)
    rows = per_example_grads(model, (images, labels, known))
    patient_grads = [[np.mean([rows[p * k + j][v] for j in range(k)], axis=0)
                      for v in range(len(before))] for p in range(patients)]
    expected = clipped_mean(patient_grads, clip, 4)
    trainer = DPTrainer(model, ce_loss, DPConfig(clip, 0.0, 4, 0.5), seed=0, augmentations=k)
    trainer.step(images, labels, known)
    assert_weights_close(weights(model),
                         [w - 0.5 * g for w, g in zip(before, expected, strict=True)])
    if clip == 1e-3:  # every record is clipped: the update's norm is at most 2 C / B
        delta = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in
                            zip(weights(model), before, strict=True)))
        assert delta <= 0.5 * patients * clip / 4 * (1 + 1e-4)


def test_k_augmentations_refuse_a_ragged_batch_and_bad_k() -> None:
    trainer = DPTrainer(tiny_model(), ce_loss, DPConfig(1.0, 0.0, 2, 0.5), seed=0,
                        augmentations=2)
    with pytest.raises(FedsegError, match="multiple of augmentations"):
        trainer.step(*batch(3))
    with pytest.raises(FedsegError, match="augmentations"):
        DPTrainer(tiny_model(), ce_loss, DPConfig(1.0, 0.0, 2, 0.5), seed=0, augmentations=0)


@pytest.mark.parametrize(("optimizer", "realised", "k", "subset"),
                         [("sgd", 3, 1, False), ("sgd", 2, 2, True), ("adam", 3, 2, True),
                          ("adam", 3, 1, False)])
def test_tf_privacy_stock_optimizer_gives_the_same_update(optimizer: str, realised: int,
                                                          k: int, subset: bool) -> None:
    """privacy.dp_optimizer tf_privacy: DPKeras{SGD,Adam}Optimizer, same step, noise 0."""
    from fedseg_clinic.privacy.tfp_reference import TFPrivacyTrainer

    images, labels, known = batch(realised * k, seed=3)
    ours, theirs = tiny_model(), tiny_model()
    theirs.set_weights(ours.get_weights())

    def chosen(model: keras.Model) -> list:
        if not subset:
            return list(model.trainable_variables)
        return [v for v in model.trainable_variables if not v.name.endswith("kernel:0")]

    config = DPConfig(0.3, 0.0, 3, 0.05, optimizer)
    mine = DPTrainer(ours, ce_loss, config, seed=0, variables=chosen(ours), augmentations=k)
    stock = TFPrivacyTrainer(theirs, ce_loss, config, seed=0, variables=chosen(theirs),
                             augmentations=k)
    for _ in range(2):
        mine.step(images, labels, known)
        stock.step(images, labels, known)
    assert_weights_close(weights(ours), weights(theirs), atol=2e-6)
    assert not np.allclose(weights(ours)[0 if not subset else 1],
                           tiny_model().get_weights()[0 if not subset else 1])


def test_tf_privacy_stock_optimizer_refuses_non_dp_and_skips_empty_batches() -> None:
    from fedseg_clinic.privacy.tfp_reference import TFPrivacyTrainer

    with pytest.raises(FedsegError, match="needs privacy"):
        TFPrivacyTrainer(tiny_model(), ce_loss, DPConfig(1.0, None, 2, 0.1), seed=0)
    trainer = TFPrivacyTrainer(tiny_model(), ce_loss, DPConfig(1.0, 1.0, 2, 0.1), seed=0)
    assert np.isnan(trainer.step(*batch(0)))
    assert trainer.skipped_steps == 1


def test_fedprox_adds_mu_times_distance_to_the_anchor_after_clipping() -> None:
    """FedProx: the step is the clipped (noise-free) mean plus mu * (w - anchor)."""
    mu, lr, clip = 0.3, 0.5, 0.05
    model = tiny_model()
    data = batch(2)
    trainer = DPTrainer(model, ce_loss, DPConfig(clip, 0.0, 2, lr, proximal_mu=mu), seed=0)
    anchor = weights(model)
    trainer.set_anchor()
    # Move the weights away from the anchor, as after earlier local steps.
    for variable in model.trainable_variables:
        variable.assign_add(tf.fill(variable.shape, 0.1))
    start = weights(model)
    grad = clipped_mean(per_example_grads(model, data), clip, 2)
    trainer.step(*data)
    expected = [w - lr * (g + mu * (w - a))
                for w, g, a in zip(start, grad, anchor, strict=True)]
    assert_weights_close(weights(model), expected)
    with pytest.raises(FedsegError, match="proximal_mu=-1"):
        DPConfig(clip, 0.0, 2, lr, proximal_mu=-1.0)
