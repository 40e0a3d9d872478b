from __future__ import annotations

import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.unet import (
    N_CLASSES,
    UNetConfig,
    build_unet,
    check_patch_size,
    class_known,
    labels_from_masks,
)
from fedseg_clinic.organs import ORGANS
from fedseg_clinic.tf_env import keras

TINY = UNetConfig(levels=2, base_filters=4)


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    return build_unet(TINY, seed=3)


def test_defaults_match_contract() -> None:
    config = UNetConfig()
    assert (config.levels, config.base_filters, config.groups, config.residual,
            config.n_classes, config.dropout) == (4, 16, 8, False, 7, 0.0)
    assert UNetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"levels": 0}, "levels"),
        ({"levels": 2.5}, "levels"),
        ({"base_filters": 0}, "base_filters"),
        ({"groups": 0}, "groups"),
        ({"base_filters": 12, "groups": 8}, "not divisible"),
        ({"n_classes": 3}, "n_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": "x"}, "dropout"),
        ({"residual": "yes"}, "residual"),
        ({"level": 3}, "unknown key"),
    ],
)
def test_from_dict_rejects_bad_values(data: dict, fragment: str) -> None:
    with pytest.raises(FedsegError, match=fragment):
        UNetConfig.from_dict(data)


def test_groups_capped_at_channels() -> None:
    config = UNetConfig.from_dict({"base_filters": 4, "groups": 8, "levels": 3})
    assert config.groups_for(4) == 4
    assert config.groups_for(16) == 8


@pytest.mark.parametrize(
    ("levels", "patch", "ok"),
    [
        (4, (64, 64, 64), True),
        (4, (32, 96, 8), True),
        (4, (60, 64, 64), False),
        (2, (18, 18, 18), True),
        (2, (17, 18, 18), False),
        (1, (5, 7, 9), True),
        (3, (0, 4, 4), False),
        (3, (4, 4), False),
    ],
)
def test_check_patch_size(levels: int, patch: tuple, ok: bool) -> None:
    config = UNetConfig(levels=levels, base_filters=8)
    if ok:
        assert check_patch_size(config, patch) == tuple(patch)
    else:
        with pytest.raises(FedsegError, match="patch size"):
            check_patch_size(config, patch)


def test_output_is_softmax_over_seven_classes(tiny_model: keras.Model) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 16, 4, 1)).astype(np.float32)
    probs = tiny_model(x, training=False).numpy()
    assert probs.shape == (2, 8, 16, 4, N_CLASSES)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0


def test_group_norm_never_batch_norm(tiny_model: keras.Model) -> None:
    kinds = {type(layer).__name__ for layer in tiny_model.layers}
    assert "GroupNormalization" in kinds
    assert not any("BatchNormalization" in k for k in kinds)


def test_seed_makes_initialisation_deterministic(tiny_model: keras.Model) -> None:
    same = build_unet(TINY, seed=3).get_weights()
    other = build_unet(TINY, seed=4).get_weights()
    reference = tiny_model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(reference, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(reference, other, strict=True))
    # Layers of the same shape get different initial values (one seed per layer).
    enc = tiny_model.get_layer("enc0_conv2").kernel.numpy()
    dec = tiny_model.get_layer("dec0_conv2").kernel.numpy()
    assert enc.shape == dec.shape
    assert not np.array_equal(enc, dec)


def test_residual_and_dropout_build_and_change_the_graph() -> None:
    plain = build_unet(TINY, seed=0)
    fancy = build_unet(UNetConfig(levels=2, base_filters=4, residual=True, dropout=0.2), seed=0)
    assert fancy.count_params() > plain.count_params()
    names = {layer.name for layer in fancy.layers}
    assert "enc0_add" in names and "enc0_drop" in names


def test_labels_from_masks_priority_and_overwrite() -> None:
    shape = (1, 1, 6)
    body = np.array([[[0, 1, 1, 1, 1, 1]]], dtype=bool)
    lung_left = np.array([[[0, 0, 1, 1, 0, 0]]], dtype=bool)
    heart = np.array([[[0, 0, 0, 1, 1, 0]]], dtype=bool)
    cord = np.array([[[0, 0, 0, 0, 1, 1]]], dtype=bool)
    labels = labels_from_masks(
        {"heart": heart, "body": body, "spinal_cord": cord, "lung_left": lung_left}, shape
    )
    assert labels.dtype == np.uint8
    # body=1, lung_left=2, heart=4 over lung, spinal_cord=5 over heart.
    assert labels.tolist() == [[[0, 1, 2, 4, 5, 5]]]


def test_labels_from_masks_empty_and_errors() -> None:
    assert not labels_from_masks({}, (2, 3, 4)).any()
    assert not labels_from_masks({"heart": np.zeros((2, 3, 4), bool)}, (2, 3, 4)).any()
    with pytest.raises(FedsegError, match="shape"):
        labels_from_masks({"heart": np.zeros((2, 3, 3), bool)}, (2, 3, 4))
    with pytest.raises(FedsegError, match="liver"):
        labels_from_masks({"liver": np.zeros((2, 3, 4), bool)}, (2, 3, 4))


@pytest.mark.parametrize(
    ("organs", "expected"),
    [
        ((), [1, 0, 0, 0, 0, 0, 0]),
        (("body",), [1, 1, 0, 0, 0, 0, 0]),
        (("esophagus", "heart"), [1, 0, 0, 0, 1, 0, 1]),
        (ORGANS, [1] * 7),
    ],
)
def test_class_known(organs: tuple, expected: list) -> None:
    known = class_known(organs)
    assert known.dtype == np.float32
    assert known.tolist() == expected


def test_class_known_rejects_unknown_organ() -> None:
    with pytest.raises(FedsegError, match="liver"):
        class_known(["liver"])


@pytest.mark.slow
def test_tiny_unet_learns_a_cube_with_the_marginal_loss() -> None:
    """Model + loss + label map together: a few Adam steps fit one synthetic patch."""
    from fedseg_clinic.model.losses import per_example_loss
    from fedseg_clinic.model.metrics import dice
    from fedseg_clinic.tf_env import tf

    keras.utils.set_random_seed(0)
    shape = (8, 8, 8)
    body = np.zeros(shape, bool)
    body[1:7, 1:7, 1:7] = True
    heart = np.zeros(shape, bool)
    heart[3:5, 3:5, 3:5] = True
    labels = labels_from_masks({"body": body, "heart": heart}, shape)[None]
    image = np.where(body, 0.5, -1.0).astype(np.float32)
    image[heart] = 0.0
    x = image[None, ..., None]
    known = class_known(("body", "heart"))[None]
    model = build_unet(TINY, seed=0)
    optimizer = keras.optimizers.Adam(0.02)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(labels, model(x, training=True), known))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables, strict=True))
        return loss

    first = float(step())
    for _ in range(60):
        last = float(step())
    assert last < 0.3 * first
    pred = np.argmax(model(x).numpy()[0], axis=-1)
    assert dice(pred == 4, heart) > 0.8
    assert dice(pred != 0, body) > 0.9


def test_trainable_subsets_pick_the_named_weights() -> None:
    from fedseg_clinic.model.unet import count_parameters, trainable_subset

    model = build_unet(UNetConfig(levels=3, base_filters=8, groups=4), seed=0)
    every = model.trainable_variables
    assert count_parameters(trainable_subset(model, "all")) == count_parameters(every)
    norm_bias = trainable_subset(model, "norm_bias")
    # 2 x (8+16+32+16+8) x 2 GroupNorm scale/offset + up-conv biases (16+8) + head bias 7.
    assert count_parameters(norm_bias) == 351
    assert {v.name.split("/")[-1] for v in norm_bias} == {"gamma:0", "beta:0", "bias:0"}
    head = trainable_subset(model, "head")
    assert count_parameters(head) == 8 * 7 + 7
    both = trainable_subset(model, "norm_bias_head")
    assert count_parameters(both) == 351 + 8 * 7
    last = trainable_subset(model, "decoder_last")
    assert all(v.name.startswith(("dec0_", "head/")) for v in last)
    with pytest.raises(FedsegError, match="unknown"):
        trainable_subset(model, "everything")


def test_weight_standardisation_standardises_each_output_channel(tmp_path) -> None:
    from fedseg_clinic.model.unet import WSConv3D, standardise_kernel

    config = UNetConfig(levels=2, base_filters=4, weight_standardisation=True)
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(FedsegError, match="weight_standardisation"):
        UNetConfig.from_dict({"weight_standardisation": "yes"})
    model = build_unet(config, seed=3)
    plain = build_unet(TINY, seed=3)
    # Same weights, same shapes: a seed or a round model moves between the two variants.
    assert [w.shape for w in model.get_weights()] == [w.shape for w in plain.get_weights()]
    ws_layers = [layer for layer in model.layers if isinstance(layer, WSConv3D)]
    assert len(ws_layers) == 2 * 3  # two 3x3x3 convolutions per block, 3 blocks
    assert not any(isinstance(layer, WSConv3D) for layer in plain.layers)
    for layer in ws_layers:
        raw = layer.kernel.numpy()
        assert abs(raw.mean(axis=(0, 1, 2, 3))).max() > 1e-3  # the stored kernel is raw
        std = standardise_kernel(layer.kernel).numpy().reshape(-1, raw.shape[-1])
        np.testing.assert_allclose(std.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(std.var(axis=0), 1.0, rtol=5e-3)  # var / (var + 1e-5)
    # The layer convolves with the standardised kernel: a plain Conv3D given it agrees.
    layer = ws_layers[0]
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    ref = keras.layers.Conv3D(layer.filters, 3, padding="same", use_bias=False)
    ref.build(x.shape)
    ref.set_weights([standardise_kernel(layer.kernel).numpy()])
    np.testing.assert_allclose(layer(x).numpy(), ref(x).numpy(), atol=1e-4)
    # It saves and loads as a Keras model (bundles export the model file).
    path = tmp_path / "ws.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)


@pytest.mark.slow
def test_weight_standardised_unet_learns_a_cube() -> None:
    from fedseg_clinic.model.losses import per_example_loss
    from fedseg_clinic.model.metrics import dice
    from fedseg_clinic.tf_env import tf

    keras.utils.set_random_seed(0)
    shape = (8, 8, 8)
    body = np.zeros(shape, bool)
    body[1:7, 1:7, 1:7] = True
    labels = labels_from_masks({"body": body}, shape)[None]
    x = np.where(body, 0.5, -1.0).astype(np.float32)[None, ..., None]
    known = class_known(("body",))[None]
    model = build_unet(UNetConfig(levels=2, base_filters=4, weight_standardisation=True),
                       seed=0)
    optimizer = keras.optimizers.Adam(0.02)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(labels, model(x, training=True), known))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables, strict=True))
        return loss

    first = float(step())
    for _ in range(40):
        last = float(step())
    assert last < 0.3 * first
    assert dice(np.argmax(model(x).numpy()[0], axis=-1) != 0, body) > 0.9
