"""Model weights as they travel through FEDn: a numpyhelper npz of a list of arrays.

The list is ``model.get_weights()`` of :func:`fedseg_clinic.model.unet.build_unet`: the
layers in the order build_unet creates them (encoder blocks top to bottom, then for each
decoder level the transposed convolution and its block, then the head), each layer's
weights in Keras order (Conv3D: kernel [, bias]; GroupNormalization: gamma, beta;
Conv3DTranspose: kernel, bias). The npz holds them under keys "0", "1", ... - exactly
what fedn's numpyhelper writes, reads and averages.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fedn.utils.helpers.helpers import get_helper

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_output
from fedseg_clinic.model.npz import write_npz
from fedseg_clinic.tf_env import keras

HELPER_NAME = "numpyhelper"


def save_weights_npz(arrays: Sequence[np.ndarray], path: Path) -> Path:
    """Write weights atomically (temporary sibling + os.replace) as a numpyhelper npz.

    Args:
        arrays: the weights, in model.get_weights() order.
        path: destination; written as given (no ".npz" appended).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        # A file object, not a name: numpy would append ".npz" to a name without it.
        write_npz(arrays, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_weights_npz(path: Path) -> list[np.ndarray]:
    """Read a numpyhelper npz into a list of arrays.

    Raises:
        FedsegError: missing or unreadable file, or keys other than "0".."n-1".
    """
    path = Path(path)
    helper = get_helper(HELPER_NAME)
    try:
        with open(path, "rb") as handle:
            return [np.asarray(a) for a in helper.load(handle)]
    except FileNotFoundError:
        raise FedsegError(f"{path}: weights file does not exist") from None
    except KeyError as exc:
        raise FedsegError(f"{path}: not a numpyhelper weights file (missing key {exc})") \
            from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedsegError(f"{path}: unreadable weights file ({exc})") from None


def apply_weights(model: keras.Model, arrays: Sequence[np.ndarray], where: str) -> None:
    """Set a model's weights, with a clear error when they belong to another architecture.

    Args:
        model: the model to update.
        arrays: weights in model.get_weights() order.
        where: what the arrays came from (file name, "global model ..."), for messages.

    Raises:
        FedsegError: naming ``where``, the count or the first index whose shape differs.
    """
    variables = model.weights
    if len(arrays) != len(variables):
        raise FedsegError(
            f"{where}: {len(arrays)} weight arrays, model {model.name} expects "
            f"{len(variables)} (different architecture?)"
        )
    converted = []
    for index, (array, variable) in enumerate(zip(arrays, variables, strict=True)):
        array = np.asarray(array)
        expected = tuple(variable.shape)
        if tuple(array.shape) != expected:
            raise FedsegError(
                f"{where}: weight {index} ({variable.name}) has shape {tuple(array.shape)}, "
                f"model expects {expected} (different architecture?)"
            )
        if not np.all(np.isfinite(array)):
            raise FedsegError(f"{where}: weight {index} ({variable.name}) contains NaN or inf")
        converted.append(array.astype(variable.dtype.as_numpy_dtype, copy=False))
    model.set_weights(converted)
