"""Sliding-window inference over a whole volume, nnU-Net style.

The volume is covered by patches whose starts are spread evenly so that neighbours
overlap by at least ``overlap`` of the patch side; each patch's softmax output is
weighted (Gaussian importance map: centre voxels count more than edge voxels, whose
receptive field is cut off) and accumulated; the sum is divided by the accumulated
weights. Every weight is positive and every voxel is covered, so the result is a convex
combination of softmax outputs: probabilities that sum to 1.

Patches are run in batches of a fixed shape (the last batch is padded) through
``model.predict_on_batch``, whose traced function Keras keeps on the model: it is traced
once per (batch, patch) shape and reused for every later volume and weight update.

A model trained on part of its organ set (a local-only clinic model whose protocol lacks
some organs, record.py ``organs_trained``) labels only what it learnt: the argmax runs
over background and its trained organs (:func:`allowed_classes`, :func:`argmax_labels`).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import product
from typing import Any

import numpy as np
from scipy import ndimage

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.record import check_organs_trained
from fedseg_clinic.organs import OrganSet
from fedseg_clinic.tf_env import keras, tf

logger = logging.getLogger(__name__)

BLENDS: tuple[str, ...] = ("gaussian", "constant")
PAD_VALUE: float = -1.0  # normalised value of the lowest HU of the window (air)
GAUSSIAN_SIGMA_SCALE: float = 1.0 / 8  # nnU-Net's sigma = patch side / 8


def window_starts(dim: int, side: int, overlap: float) -> list[int]:
    """Evenly spread patch starts along one axis (nnU-Net's step computation).

    Args:
        dim: length of the (padded) axis; at least ``side``.
        side: patch side along the axis.
        overlap: minimum fraction of the side that neighbouring patches share.
    """
    if dim <= side:
        return [0]
    target_step = side * (1.0 - overlap)
    n_steps = math.ceil((dim - side) / target_step) + 1
    step = (dim - side) / (n_steps - 1)
    return [round(step * i) for i in range(n_steps)]


def gaussian_importance(patch_size: Sequence[int]) -> np.ndarray:
    """Gaussian importance map (max 1, no zeros), float32 of shape ``patch_size``."""
    impulse = np.zeros(tuple(patch_size), dtype=np.float64)
    impulse[tuple(s // 2 for s in patch_size)] = 1.0
    weights = ndimage.gaussian_filter(
        impulse, sigma=[s * GAUSSIAN_SIGMA_SCALE for s in patch_size], mode="constant", cval=0
    )
    weights /= weights.max()
    # Far corners underflow to 0; a zero weight would leave a voxel undefined.
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def _check_args(image: np.ndarray, patch_size: Sequence[int], overlap: float, blend: str,
                batch_size: int) -> tuple[int, int, int]:
    if image.ndim != 3:
        raise FedsegError(f"sliding window: image must be 3-D (z, y, x), got shape "
                          f"{image.shape}")
    sides = tuple(int(s) for s in patch_size)
    if len(sides) != 3 or any(s <= 0 for s in sides):
        raise FedsegError(f"sliding window: patch size must be three positive integers, "
                          f"got {patch_size}")
    if not 0.0 <= overlap < 1.0:
        raise FedsegError(f"sliding window: overlap must be in [0, 1), got {overlap}")
    if blend not in BLENDS:
        raise FedsegError(f"sliding window: blend must be one of {', '.join(BLENDS)}, "
                          f"got {blend!r}")
    if batch_size < 1:
        raise FedsegError(f"sliding window: batch_size must be >= 1, got {batch_size}")
    return sides  # type: ignore[return-value]


_FORWARD: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = (
    weakref.WeakKeyDictionary())


def _forward_fn(model: keras.Model, batch_shape: tuple[int, ...]) -> Any:
    """A traced inference call of ``model`` for one batch shape, kept per model.

    One trace per (model, window shape): validation calls this every round, and a
    fresh trace costs seconds. Calls of a traced function are thread-safe.
    """
    per_model = _FORWARD.setdefault(model, {})
    if batch_shape not in per_model:
        spec = tf.TensorSpec(batch_shape, tf.float32)
        per_model[batch_shape] = tf.function(lambda x: model(x, training=False),
                                             input_signature=[spec])
    return per_model[batch_shape]


def sliding_window_predict(
    model: keras.Model,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    workers: int = 2,
) -> np.ndarray:
    """Class probabilities for a whole normalised volume.

    Args:
        model: maps (b, z, y, x, 1) float32 to (b, z, y, x, C) softmax probabilities.
        image: normalised float32 volume (z, y, x) (patches.normalise_hu).
        patch_size: (z, y, x) window, a size the model accepts (model.check_patch_size).
        overlap: minimum overlap of neighbouring windows as a fraction of the side.
        blend: "gaussian" (nnU-Net importance weights) or "constant" (plain average).
        batch_size: windows per forward pass.
        workers: forward passes run concurrently in this many threads. TensorFlow's
            Conv3D kept only ~1.1 of 2 CPU cores busy with one call at a time; two
            concurrent calls cut a 128^3 volume from 13.7 s to under 10 s here
            (bench/RESULTS.md). Blending stays in this thread, in window order, so the
            result does not depend on ``workers``.

    Returns:
        float32 (z, y, x, C) probabilities summing to 1 over C.
    """
    image = np.asarray(image, dtype=np.float32)
    sides = _check_args(image, patch_size, overlap, blend, batch_size)
    shape = image.shape
    # Pad (centred) to at least the patch size; cropped off again at the end.
    pad = [((max(side - dim, 0)) // 2, max(side - dim, 0) - (max(side - dim, 0)) // 2)
           for dim, side in zip(shape, sides, strict=True)]
    padded = np.pad(image, pad, constant_values=PAD_VALUE) if any(map(any, pad)) else image
    starts = list(product(*(window_starts(d, s, overlap)
                            for d, s in zip(padded.shape, sides, strict=True))))

    weights = (gaussian_importance(sides) if blend == "gaussian"
               else np.ones(sides, dtype=np.float32))
    n_classes = int(model.output_shape[-1])
    summed = np.zeros((*padded.shape, n_classes), dtype=np.float32)
    weight_sum = np.zeros(padded.shape, dtype=np.float32)

    logger.debug("sliding window: %d windows of %s over %s", len(starts), sides,
                 padded.shape)
    forward = _forward_fn(model, (batch_size, *sides, 1))
    chunks = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]

    def run(chunk: list[tuple[int, int, int]]) -> np.ndarray:
        batch = np.full((batch_size, *sides, 1), PAD_VALUE, dtype=np.float32)
        for i, (z, y, x) in enumerate(chunk):
            batch[i, ..., 0] = padded[z:z + sides[0], y:y + sides[1], x:x + sides[2]]
        return forward(batch).numpy()

    def blend(chunk: list[tuple[int, int, int]], probs: np.ndarray) -> None:
        for i, (z, y, x) in enumerate(chunk):
            region = (slice(z, z + sides[0]), slice(y, y + sides[1]), slice(x, x + sides[2]))
            summed[region] += probs[i] * weights[..., None]
            weight_sum[region] += weights

    workers = max(1, workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # At most workers + 1 windows' outputs in memory; blended in window order.
        pending: deque[tuple[list[tuple[int, int, int]], Future[np.ndarray]]] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(run, chunk)))
            if len(pending) > workers:
                done, future = pending.popleft()
                blend(done, future.result())
        while pending:
            done, future = pending.popleft()
            blend(done, future.result())

    summed /= weight_sum[..., None]
    crop = tuple(slice(before, before + dim) for (before, _), dim in zip(pad, shape,
                                                                        strict=True))
    return np.ascontiguousarray(summed[crop])


def allowed_classes(organs: OrganSet, organs_trained: Iterable[str] | None) -> np.ndarray | None:
    """Which output classes may label a voxel: bool (n_classes,), or None for all.

    Background (class 0) is always allowed; an organ only when ``organs_trained`` names
    it. None (no list) allows every class.

    Raises:
        FedsegError: an organ outside the organ set.
    """
    if organs_trained is None:
        return None
    allowed = np.zeros(organs.n_classes, dtype=bool)
    allowed[0] = True
    for organ in check_organs_trained(organs_trained, organs, "allowed classes"):
        allowed[organs.class_index(organ)] = True
    return allowed


def argmax_labels(probs: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map of class probabilities (..., C), over the ``allowed`` classes only.

    An excluded class never wins, however high its probability: its voxels go to the
    most probable allowed class (background or a trained organ).
    """
    if allowed is not None:
        if allowed.shape != (probs.shape[-1],) or not allowed[0]:
            raise FedsegError(f"allowed classes {allowed.tolist()} do not fit "
                              f"{probs.shape[-1]} output classes with background")
        # Probabilities are >= 0, so -1 puts an excluded class below every allowed one.
        probs = np.where(allowed, probs, np.float32(-1.0))
    return np.argmax(probs, axis=-1).astype(np.uint8)


def predict_labels(
    model: keras.Model,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    workers: int = 2,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Argmax label map (uint8 (z, y, x)) of :func:`sliding_window_predict`.

    ``allowed`` (:func:`allowed_classes`) restricts the argmax to those classes.
    """
    probs = sliding_window_predict(model, image, patch_size, overlap, blend, batch_size,
                                   workers)
    return argmax_labels(probs, allowed)
