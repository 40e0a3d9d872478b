"""The 3D U-Net, its configuration, and the label map it is trained against.

Classes follow the experiment's organ set (``model.organ_set``, default ``thorax``; see
organs.py): 0 is background, class ``k`` is ``organ_set.organs[k - 1]`` (thorax: body,
lung_left, lung_right, heart, spinal_cord, esophagus). The network ends in a softmax over
these classes, so every voxel gets exactly one class; a container organ (thorax's body)
therefore means "inside the patient and none of the organs" in the label map, and "any
non-background class" when measured.

Architecture (per resolution level ``k`` with ``base_filters * 2**k`` channels): two
3x3x3 convolutions, each followed by GroupNormalization and LeakyReLU(0.01); optional
residual shortcut (1x1x1 projection) around the pair; 2x max pooling down,
2x transposed convolution up, skip connections by concatenation, a 1x1x1 convolution and
softmax at the end. GroupNormalization, never BatchNormalization: batch statistics mix
examples, which breaks per-example DP-SGD gradients (docs/dependencies.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import THORAX, OrganSet, organ_set
from fedseg_clinic.settings import TRAINABLE_SUBSETS
from fedseg_clinic.tf_env import keras, tf

# The thorax set's class count and paint order (code written before organ sets).
N_CLASSES: int = THORAX.n_classes
LABEL_PRIORITY: tuple[str, ...] = THORAX.label_priority


def class_index(organ: str, organs: OrganSet = THORAX) -> int:
    """The class index of a canonical organ in an organ set (1-based; 0 is background)."""
    return organs.class_index(organ)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the 3D U-Net.

    Attributes:
        levels: resolution levels (levels - 1 poolings); patch sides must be divisible
            by ``2 ** (levels - 1)``.
        base_filters: channels at the first level; doubled at each level down.
        groups: GroupNormalization groups, capped at a layer's channel count; every
            level's channel count must be divisible by its (capped) group count.
        residual: add a residual shortcut around each pair of convolutions.
        n_classes: output classes; None (the default) takes background + the organ
            set's organs, and any other value must equal that.
        dropout: dropout rate after each convolution block, in [0, 1).
        organ_set: name of the organ set (organs.ORGAN_SETS) the output channels follow.
        weight_standardisation: standardise each 3x3x3 convolution's kernel per output
            channel (zero mean, unit variance over its inputs and taps) before use
            (Qiao et al. 2019); with GroupNorm the combination used for DP training by
            De et al. 2022 and Ziller et al. 2024. The stored weights are unchanged in
            shape (the raw kernel is kept; standardisation happens in the forward pass).
    """

    levels: int = 4
    base_filters: int = 16
    groups: int = 8
    residual: bool = False
    n_classes: int | None = None
    dropout: float = 0.0
    organ_set: str = THORAX.name
    weight_standardisation: bool = False

    def __post_init__(self) -> None:
        organs = organ_set(self.organ_set)  # raises for an unknown name
        if self.n_classes is None:
            object.__setattr__(self, "n_classes", organs.n_classes)
        for name in ("levels", "base_filters", "groups", "n_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FedsegError(f"model config: {name} must be an integer, got {value!r}")
        if not isinstance(self.weight_standardisation, bool):
            raise FedsegError(f"model config: weight_standardisation must be true or false, "
                              f"got {self.weight_standardisation!r}")
        if not isinstance(self.residual, bool):
            raise FedsegError(f"model config: residual must be true or false, got "
                              f"{self.residual!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise FedsegError(f"model config: dropout must be a number, got {self.dropout!r}")
        if not 1 <= self.levels <= 7:
            raise FedsegError(f"model config: levels must be in 1..7, got {self.levels}")
        if self.base_filters < 1:
            raise FedsegError(f"model config: base_filters must be >= 1, got "
                              f"{self.base_filters}")
        if self.groups < 1:
            raise FedsegError(f"model config: groups must be >= 1, got {self.groups}")
        if self.n_classes != organs.n_classes:
            raise FedsegError(
                f"model config: n_classes must be {organs.n_classes} (background + "
                f"{', '.join(organs.organs)} of organ set {organs.name}), got {self.n_classes}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise FedsegError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        for level in range(self.levels):
            filters = self.filters(level)
            if filters % self.groups_for(filters) != 0:
                raise FedsegError(
                    f"model config: level {level} has {filters} channels, not divisible by "
                    f"groups={self.groups}"
                )

    @property
    def organs(self) -> OrganSet:
        """The organ set the output channels follow."""
        return organ_set(self.organ_set)

    def filters(self, level: int) -> int:
        """Channel count of a resolution level (0 = full resolution)."""
        return self.base_filters * 2**level

    def groups_for(self, filters: int) -> int:
        """GroupNormalization groups for a layer with ``filters`` channels."""
        return min(self.groups, filters)

    @property
    def divisor(self) -> int:
        """Every patch side must be a multiple of this."""
        return 2 ** (self.levels - 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Build from a settings dict; unknown keys and bad values raise FedsegError."""
        if not isinstance(data, Mapping):
            raise FedsegError(f"model config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise FedsegError(
                f"model config: unknown key(s) {', '.join(map(str, unknown))} "
                f"(known: {', '.join(names)})"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)


def check_patch_size(config: UNetConfig, patch: Sequence[int]) -> tuple[int, int, int]:
    """Validate a (z, y, x) patch size for a model; return it as a tuple of ints.

    Raises:
        FedsegError: when it is not three positive multiples of ``2 ** (levels - 1)``.
    """
    sides = tuple(patch)
    if len(sides) != 3 or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) for s in sides
    ):
        raise FedsegError(f"patch size must be three integers (z, y, x), got {patch!r}")
    result = (int(sides[0]), int(sides[1]), int(sides[2]))
    if any(s <= 0 or s % config.divisor != 0 for s in result):
        raise FedsegError(
            f"patch size {result}: every side must be a positive multiple of "
            f"{config.divisor} (2 ** (levels - 1) with levels={config.levels})"
        )
    return result


WS_EPSILON = 1e-5


def standardise_kernel(kernel: Any) -> Any:
    """A convolution kernel standardised per output channel (the last axis).

    Zero mean and unit variance over every other axis (taps and input channels).
    """
    axes = list(range(len(kernel.shape) - 1))
    mean, var = tf.nn.moments(kernel, axes=axes, keepdims=True)
    return (kernel - mean) * tf.math.rsqrt(var + WS_EPSILON)


@keras.saving.register_keras_serializable(package="fedseg")
class WSConv3D(keras.layers.Conv3D):
    """Conv3D with weight standardisation (:func:`standardise_kernel`) in the forward pass."""

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        """Convolve with the standardised kernel."""
        return super().convolution_op(inputs, standardise_kernel(kernel))


def _initializer_factory(seed: int | None) -> Callable[[], keras.initializers.Initializer]:
    """Return a function giving one He-normal initializer per layer.

    Each layer gets its own seed drawn from one generator, so the whole model is
    reproducible from ``seed`` while no two layers share initial values.
    """
    rng = np.random.default_rng(seed) if seed is not None else None

    def make() -> keras.initializers.Initializer:
        layer_seed = None if rng is None else int(rng.integers(0, 2**31 - 1))
        return keras.initializers.HeNormal(seed=layer_seed)

    return make


def _conv_block(
    x: Any,
    filters: int,
    name: str,
    config: UNetConfig,
    init: Callable[[], keras.initializers.Initializer],
    dropout_seed: int | None,
) -> Any:
    """Two conv-GN-LeakyReLU units, optionally with a residual shortcut."""
    shortcut = x
    conv = WSConv3D if config.weight_standardisation else keras.layers.Conv3D
    for unit in (1, 2):
        x = conv(
            filters, 3, padding="same", use_bias=False,  # GN's beta makes a bias redundant
            kernel_initializer=init(), name=f"{name}_conv{unit}",
        )(x)
        x = keras.layers.GroupNormalization(
            groups=config.groups_for(filters), name=f"{name}_gn{unit}"
        )(x)
        if unit == 2 and config.residual:
            shortcut = keras.layers.Conv3D(
                filters, 1, use_bias=False, kernel_initializer=init(), name=f"{name}_proj"
            )(shortcut)
            x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
        x = keras.layers.LeakyReLU(0.01, name=f"{name}_act{unit}")(x)
    if config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, seed=dropout_seed, name=f"{name}_drop")(x)
    return x


def build_unet(config: UNetConfig, seed: int | None = None) -> keras.Model:
    """Build the 3D U-Net.

    Args:
        config: architecture hyperparameters.
        seed: seed of the initial weights (and dropout masks); same seed, same weights.

    Returns:
        A Keras model from (batch, z, y, x, 1) float32 to softmax probabilities
        (batch, z, y, x, n_classes), float32.
    """
    init = _initializer_factory(seed)
    inputs = keras.Input(shape=(None, None, None, 1), dtype="float32", name="ct")
    x = inputs
    skips = []
    for level in range(config.levels):
        drop_seed = None if seed is None else seed + level
        x = _conv_block(x, config.filters(level), f"enc{level}", config, init, drop_seed)
        if level < config.levels - 1:
            skips.append(x)
            x = keras.layers.MaxPool3D(2, name=f"down{level}")(x)
    for level in reversed(range(config.levels - 1)):
        x = keras.layers.Conv3DTranspose(
            config.filters(level), 2, strides=2, kernel_initializer=init(), name=f"up{level}"
        )(x)
        x = keras.layers.Concatenate(name=f"skip{level}")([skips[level], x])
        drop_seed = None if seed is None else seed + 100 + level
        x = _conv_block(x, config.filters(level), f"dec{level}", config, init, drop_seed)
    outputs = keras.layers.Conv3D(
        config.n_classes, 1, activation="softmax", kernel_initializer=init(),
        dtype="float32", name="head",
    )(x)
    return keras.Model(inputs, outputs, name="unet3d")


def labels_from_masks(
    masks: Mapping[str, np.ndarray], shape: Sequence[int], organs: OrganSet = THORAX
) -> np.ndarray:
    """Combine organ masks into one uint8 label map.

    Background is 0, organ ``k`` is ``organs.class_index(organ)``. Masks are painted in
    the set's ``label_priority`` order, later organs overwriting earlier ones (so organs
    overwrite body, and e.g. spinal cord wins over a lung contour).

    Args:
        masks: organ -> boolean (z, y, x) array; only labelled organs.
        shape: the (z, y, x) shape of the volume.
        organs: the organ set the classes follow.

    Raises:
        FedsegError: for an organ outside the set or a mask of another shape.
    """
    target = tuple(int(s) for s in shape)
    labels = np.zeros(target, dtype=np.uint8)
    for organ in masks:
        if organ not in organs.organs:
            raise FedsegError(f"label map: organ {organ!r} is not in organ set {organs.name}")
    for organ in organs.label_priority:
        mask = masks.get(organ)
        if mask is None:
            continue
        if tuple(mask.shape) != target:
            raise FedsegError(f"label map: mask {organ} has shape {mask.shape}, expected "
                              f"{target}")
        labels[np.asarray(mask, dtype=bool)] = organs.class_index(organ)
    return labels


def class_known(labelled_organs: Iterable[str], organs: OrganSet = THORAX) -> np.ndarray:
    """Which classes a case's labels speak for: float32 (n_classes,), 1 known, 0 unknown.

    Background is always known: a voxel outside every labelled contour is a true
    background voxel when body is labelled, and at least "not a labelled organ" otherwise
    (the loss merges unknown classes into it, see losses.py).
    """
    known = np.zeros(organs.n_classes, dtype=np.float32)
    known[0] = 1.0
    for organ in labelled_organs:
        known[organs.class_index(organ)] = 1.0
    return known


# Trainable subsets for parameter-efficient DP fine-tuning (see dp_sgd): DP noise grows
# with sqrt(trained parameters), so fine-tuning a few from a public-pretrained seed keeps
# the signal (Yu et al. 2022; Bu et al., DP-BiTFiT: biases; normalisation scale/offset).


def _is_norm_or_bias(variable: Any) -> bool:
    leaf = variable.name.split("/")[-1].split(":")[0]
    return leaf in ("gamma", "beta", "bias")


def norm_variables(model: keras.Model) -> list[Any]:
    """Every GroupNorm scale (gamma) and offset (beta) of the model, in weight order."""
    return [v for v in model.weights
            if v.name.split("/")[-1].split(":")[0] in ("gamma", "beta")]


def trainable_subset(model: keras.Model, subset: str) -> list[Any]:
    """The variables a training ``subset`` updates, in ``model.trainable_variables`` order.

    Subsets: ``all``; ``norm_bias`` (every GroupNorm scale/offset and every bias);
    ``head`` (the final 1x1x1 convolution); ``norm_bias_head`` (both); ``decoder_last``
    (the full-resolution decoder block and the head).

    Raises:
        FedsegError: unknown subset, or one that selects nothing in this model.
    """
    if subset not in TRAINABLE_SUBSETS:
        raise FedsegError(f"trainable subset {subset!r} unknown (choose from "
                          f"{', '.join(TRAINABLE_SUBSETS)})")

    def layer_of(variable: Any) -> str:
        return variable.name.split("/")[0]

    variables = list(model.trainable_variables)
    if subset == "all":
        chosen = variables
    elif subset == "norm_bias":
        chosen = [v for v in variables if _is_norm_or_bias(v)]
    elif subset == "head":
        chosen = [v for v in variables if layer_of(v) == "head"]
    elif subset == "norm_bias_head":
        chosen = [v for v in variables if _is_norm_or_bias(v) or layer_of(v) == "head"]
    else:  # decoder_last
        chosen = [v for v in variables
                  if layer_of(v) == "head" or layer_of(v).startswith("dec0_")]
    if not chosen:
        raise FedsegError(f"trainable subset {subset!r} selects no weights of this model")
    return chosen


def count_parameters(variables: Iterable[Any]) -> int:
    """Number of scalar parameters in ``variables``."""
    return int(sum(int(np.prod(v.shape)) for v in variables))
