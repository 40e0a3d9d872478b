from __future__ import annotations

import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.inference import (
    allowed_classes,
    argmax_labels,
    gaussian_importance,
    predict_labels,
    sliding_window_predict,
    window_starts,
)
from fedseg_clinic.model.unet import UNetConfig, build_unet
from fedseg_clinic.organs import HEAD_NECK
from fedseg_clinic.tf_env import keras


@pytest.fixture(scope="module")
def pointwise_model() -> keras.Model:
    """A real Keras model whose output at a voxel depends only on that voxel."""
    inputs = keras.Input(shape=(None, None, None, 1))
    outputs = keras.layers.Conv3D(
        7, 1, activation="softmax",
        kernel_initializer=keras.initializers.RandomNormal(stddev=2.0, seed=0),
        bias_initializer=keras.initializers.RandomNormal(seed=1),
    )(inputs)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny_unet() -> keras.Model:
    return build_unet(UNetConfig(levels=2, base_filters=4), seed=0)


@pytest.mark.parametrize(
    ("dim", "side", "overlap", "expected"),
    [
        (10, 10, 0.5, [0]),
        (8, 10, 0.5, [0]),
        (128, 64, 0.5, [0, 32, 64]),
        (100, 64, 0.5, [0, 18, 36]),
        (128, 64, 0.0, [0, 64]),
        (130, 64, 0.0, [0, 33, 66]),
        (20, 16, 0.5, [0, 4]),
    ],
)
def test_window_starts(dim: int, side: int, overlap: float, expected: list) -> None:
    starts = window_starts(dim, side, overlap)
    assert starts == expected
    assert starts[-1] + side == max(dim, side)  # the last window ends at the edge


def test_gaussian_importance() -> None:
    weights = gaussian_importance((8, 16, 12))
    assert weights.shape == (8, 16, 12) and weights.dtype == np.float32
    assert weights.max() == pytest.approx(1.0)
    assert weights[4, 8, 6] == weights.max()
    assert weights.min() > 0
    assert weights[0, 0, 0] < weights[4, 8, 0] < weights[4, 8, 6]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "batch_size"),
    [
        ((20, 24, 17), (8, 8, 8), 0.5, 2),
        ((5, 9, 3), (8, 8, 8), 0.5, 1),  # smaller than the patch: padded
        ((16, 16, 16), (16, 16, 16), 0.25, 3),  # one window, batch padded
        ((12, 20, 9), (4, 8, 8), 0.0, 4),
    ],
)
def test_pointwise_model_matches_whole_volume(pointwise_model: keras.Model, blend: str,
                                              shape: tuple, patch: tuple, overlap: float,
                                              batch_size: int) -> None:
    image = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    probs = sliding_window_predict(pointwise_model, image, patch, overlap, blend, batch_size)
    direct = pointwise_model(image[None, ..., None]).numpy()[0]
    assert probs.shape == (*shape, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, direct, atol=1e-5)


def test_unet_probabilities_sum_to_one_and_labels(tiny_unet: keras.Model) -> None:
    image = np.random.default_rng(1).uniform(-1, 1, (10, 18, 7)).astype(np.float32)
    probs = sliding_window_predict(tiny_unet, image, (8, 8, 8))
    assert probs.shape == (10, 18, 7, 7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    labels = predict_labels(tiny_unet, image, (8, 8, 8))
    assert labels.dtype == np.uint8 and labels.shape == (10, 18, 7)
    np.testing.assert_array_equal(labels, probs.argmax(-1))


def test_gaussian_blend_weights_window_centres(tiny_unet: keras.Model) -> None:
    # Where windows overlap, Gaussian and constant blends differ; elsewhere they agree.
    image = np.random.default_rng(2).uniform(-1, 1, (8, 8, 12)).astype(np.float32)
    gauss = sliding_window_predict(tiny_unet, image, (8, 8, 8), 0.5, "gaussian")
    flat = sliding_window_predict(tiny_unet, image, (8, 8, 8), 0.5, "constant")
    np.testing.assert_allclose(gauss[..., :4, :], flat[..., :4, :], atol=1e-6)  # one window
    assert np.abs(gauss[..., 4:8, :] - flat[..., 4:8, :]).max() > 1e-6


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"image": np.zeros((4, 4), np.float32)}, "3-D"),
        ({"patch_size": (8, 8)}, "patch size"),
        ({"overlap": 1.0}, "overlap"),
        ({"blend": "median"}, "blend"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(pointwise_model: keras.Model, kwargs: dict, fragment: str) -> None:
    args = {"image": np.zeros((8, 8, 8), np.float32), "patch_size": (8, 8, 8)} | kwargs
    with pytest.raises(FedsegError, match=fragment):
        sliding_window_predict(pointwise_model, **args)


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrent_windows_give_the_same_result(tiny_unet: keras.Model, workers: int) -> None:
    rng = np.random.default_rng(5)
    image = rng.uniform(-1, 1, (20, 24, 16)).astype(np.float32)
    reference = sliding_window_predict(tiny_unet, image, (8, 8, 8), overlap=0.5, workers=2)
    result = sliding_window_predict(tiny_unet, image, (8, 8, 8), overlap=0.5, workers=workers)
    np.testing.assert_allclose(result, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, rtol=1e-5)


def test_allowed_classes_of_a_partial_protocol() -> None:
    # clinic-b of the OpenKBP study: no esophagus, no larynx.
    trained = ["brainstem", "spinal_cord", "parotid_left", "parotid_right", "mandible"]
    allowed = allowed_classes(HEAD_NECK, trained)
    assert allowed is not None and allowed.dtype == bool and allowed.shape == (8,)
    assert allowed.tolist() == [True, True, True, True, True, False, False, True]
    assert allowed_classes(HEAD_NECK, None) is None
    # Nothing trained: only background may win.
    assert allowed_classes(HEAD_NECK, []).tolist() == [True] + [False] * 7
    with pytest.raises(FedsegError, match="heart, not in organ set head_neck"):
        allowed_classes(HEAD_NECK, ["brainstem", "heart"])


def test_argmax_never_picks_an_excluded_class() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=(6, 5, 4)).astype(np.float32)
    probs[0, 0, 0] = [0.1, 0.0, 0.2, 0.0, 0.0, 0.0, 0.7, 0.0]  # larynx, then cord
    probs[0, 0, 1] = [0.3, 0.0, 0.0, 0.0, 0.0, 0.6, 0.1, 0.0]  # esophagus, then background
    allowed = allowed_classes(HEAD_NECK, ["brainstem", "spinal_cord", "parotid_left",
                                          "parotid_right", "mandible"])
    plain = argmax_labels(probs)
    restricted = argmax_labels(probs, allowed)
    assert plain.dtype == np.uint8 and plain[0, 0, 0] == 6 and plain[0, 0, 1] == 5
    # The next most probable allowed class takes the voxel.
    assert restricted[0, 0, 0] == 2 and restricted[0, 0, 1] == 0
    assert not np.isin(restricted, [5, 6]).any()
    keep = ~np.isin(plain, [5, 6])
    assert np.array_equal(restricted[keep], plain[keep])  # other voxels unchanged
    with pytest.raises(FedsegError, match="do not fit 8 output classes"):
        argmax_labels(probs, allowed[:7])
    no_background = allowed.copy()
    no_background[0] = False
    with pytest.raises(FedsegError, match="with background"):
        argmax_labels(probs, no_background)


def test_predict_labels_honours_allowed(pointwise_model: keras.Model) -> None:
    image = np.random.default_rng(3).uniform(-1, 1, (12, 10, 9)).astype(np.float32)
    plain = predict_labels(pointwise_model, image, (8, 8, 8), overlap=0.5)
    top = int(np.bincount(plain.ravel()).argmax())
    if top == 0:
        top = int(np.bincount(plain.ravel(), minlength=7)[1:].argmax()) + 1
    allowed = np.ones(7, dtype=bool)
    allowed[top] = False
    restricted = predict_labels(pointwise_model, image, (8, 8, 8), overlap=0.5,
                                allowed=allowed)
    assert (plain == top).any() and not (restricted == top).any()
