"""Clinic-side settings: defaults, the clinic's settings file, and server overrides.

Resolution order (later wins):

1. the defaults of :class:`ClinicSettings`;
2. the clinic's settings file: the path in ``$FEDSEG_SETTINGS``, else ``settings.yaml``
   beside the compute package's ``entrypoint.py`` (the package's own defaults);
3. the per-round settings the server sends (FEDn client settings / ``IN-metadata``),
   as flat keys (see :data:`SERVER_KEYS`).

The data folder comes from ``$FEDSEG_DATA_DIR`` (else ``data_dir`` in the file); the state
folder (predictions, kept updates) from ``$FEDSEG_STATE_DIR`` (else ``<data_dir>/.fedseg``).
The privacy ledgers belong to the data, not to a run: they live in the data set's privacy
folder, ``<data_dir>/.fedseg-privacy`` unless ``$FEDSEG_PRIVACY_DIR`` (or ``privacy_dir``
in the file) names another one - e.g. one per run for synthetic experiments, so that runs
on shared phantom data stay independent (docs/privacy-model.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError

# The subsets model.trainable_subset knows (kept here so settings need no TensorFlow).
TRAINABLE_SUBSETS: tuple[str, ...] = ("all", "norm_bias", "head", "norm_bias_head",
                                      "decoder_last")

logger = logging.getLogger(__name__)

ENV_SETTINGS = "FEDSEG_SETTINGS"
ENV_DATA_DIR = "FEDSEG_DATA_DIR"
ENV_STATE_DIR = "FEDSEG_STATE_DIR"
ENV_CLIENT_NAME = "FEDSEG_CLIENT_NAME"
ENV_PRIVACY_DIR = "FEDSEG_PRIVACY_DIR"
ENV_RUN_NAME = "FEDSEG_RUN_NAME"


@dataclasses.dataclass
class TrainingSettings:
    """Local training per round.

    Attributes:
        learning_rate: client optimiser step size.
        optimizer: "sgd" or "adam" (DP-SGD / DP-Adam when privacy is on).
        local_steps: optimiser steps per round.
        batch_size: expected number of patients per step (Poisson sampling, q = B / N).
        patch_size: (z, y, x) voxels of the random crop taken from each sampled patient.
        foreground_fraction: share of patches centred on a labelled organ voxel.
        hu_window: (low, high) HU mapped linearly onto [-1, 1] as the network's input
            (values outside are clipped). The default covers lung to bone while keeping
            soft-tissue contrast; the stored cases' wider clip window (-1024..3071)
            would squeeze fat, muscle and contrast blood into a few percent of the range.
        seed: base seed; each round's randomness derives from it and the round count.
        trainable: which weights local training updates (model.TRAINABLE_SUBSETS):
            "all", or a small subset for DP fine-tuning of a pretrained seed, e.g.
            "norm_bias" (GroupNorm scale/offset + biases). The others stay frozen, so
            the weights a clinic sends back differ from the global ones only there.
        augmentations_per_patient: K patches per sampled patient per step; the patient's
            gradient is the mean over them, clipped once (privacy cost unchanged).
        ema_decay: 0 (off) or in (0, 1): the clinic sends the exponential moving average
            of its trained weights over the round's steps (starting at the global
            model) instead of the last iterate; post-processing, no privacy cost.
        proximal_mu: FedProx's mu (0 = off): each step adds mu * (w - w_global) to the
            privatised gradient of the trained weights, pulling local training towards
            the round's global model on non-iid clinics. It depends on no patient, so it
            is added after clipping and noise and costs no privacy.
        optimizer_state: "reset" (default: Adam's moments start at zero every round, as
            in FedAvg's client update) or "keep" (they carry over between rounds).
        local_epochs: 0 (off: ``local_steps`` per round) or E > 0: each round takes
            ceil(E * N / batch_size) steps, so unbalanced clinics each see their data E
            times per round instead of taking equal steps (:func:`with_local_steps`).
        local_norm: FedBN-like personalisation: the clinic keeps its own GroupNorm
            scale/offset (saved in its state folder) over the global ones, for training
            and validation; it still sends them, so the global model averages them.
        local_seconds: 0 (off) or S > 0: equal time instead of equal steps. Each round
            trains until S seconds of its step loop are spent (at least one step), at
            most ``local_steps`` steps, so a faster clinic takes more steps. The metadata
            records the steps actually taken. With DP the ledger reserves (and the
            round's epsilon is that of) the maximum ``local_steps`` before training: an
            upper bound on what the steps taken spend.
        full_batch: full-batch DP-GD: every step uses all N training patients (the batch
            size becomes N, so q = 1: no subsampling, no amplification by sampling; the
            accountant sees PoissonSampledDpEvent(1, Gaussian), i.e. the Gaussian
            mechanism composed over the steps).
        dice_classes: which known foreground classes the Dice term averages over:
            "known" (default: every known class; one absent from the patch costs ~1
            unless predicted nowhere) or "present" (only the known classes the patch's
            labels contain; absent ones are left to the cross-entropy). Per example
            either way, so DP clipping is unchanged. "present" is for sparse organs
            (OpenKBP, docs/findings.md): with "known", small patches mostly lack a given
            organ and the Dice term drives every organ's probability to zero.
    """

    learning_rate: float = 1e-3
    optimizer: str = "adam"
    local_steps: int = 10
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (32, 32, 32)
    foreground_fraction: float = 0.5
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    seed: int = 0
    trainable: str = "all"
    augmentations_per_patient: int = 1
    ema_decay: float = 0.0
    proximal_mu: float = 0.0
    optimizer_state: str = "reset"
    local_epochs: float = 0.0
    local_norm: bool = False
    local_seconds: float = 0.0
    full_batch: bool = False
    dice_classes: str = "known"


@dataclasses.dataclass
class PrivacySettings:
    """Patient-level DP-SGD.

    Attributes:
        enabled: False trains without clipping or noise (baselines); epsilon is then inf.
        noise_multiplier: Gaussian noise std / l2_norm_clip.
        l2_norm_clip: per-patient gradient clip norm.
        delta: target delta; must be < 1 / number of training patients. None means
            1 / (10 N), a common choice.
        epsilon_budget: the most epsilon this clinic spends over all rounds; None means
            no limit (epsilon is still accounted and reported).
        secure_randomness: draw the DP noise seed and the patient sampling from the
            operating system's secret randomness (the default). The DP guarantee assumes
            the attacker does not know the noise or which patients were sampled; a seed
            that the server knows (it can send ``seed``) would let it recompute both.
            False derives them from ``training.seed`` and the round count instead:
            bit-reproducible runs for experiments on synthetic data only.
        target_epsilon: calibrate the noise instead of using ``noise_multiplier``: the
            smallest sigma (dp_accounting) with which ``planned_rounds`` rounds of this
            clinic's schedule (its N, batch size, local steps) end at <= target_epsilon.
            It also becomes the epsilon budget unless one is set.
        planned_rounds: the number of rounds target_epsilon must cover; required with it.
        dp_optimizer: "fedseg" (the fast per-example loop, default) or "tf_privacy"
            (TF Privacy's stock DPKeras{SGD,Adam}Optimizer, to cross-check a result on
            the reference implementation; slower, see privacy/tfp_reference.py).
        distributed: distributed DP under secure aggregation (privacy/skellam.py): each
            round is one full-batch DP gradient step of the federation; the clinic sends
            its integer sum of clipped patient gradients plus its share of Skellam noise,
            masked, and the noise multiplier (or the one target_epsilon calibrates) is
            that of the *aggregate*. Needs ``session.secure_aggregation``.
        distributed_honest: the honest noise shares the reported epsilon assumes (each
            clinic adds 1 / m of the variance); None = the secure-aggregation threshold
            (a strict majority of the round's clinics). 1 = every clinic adds all of it.
    """

    enabled: bool = True
    noise_multiplier: float = 1.0
    l2_norm_clip: float = 1.0
    delta: float | None = None
    epsilon_budget: float | None = None
    secure_randomness: bool = True
    target_epsilon: float | None = None
    planned_rounds: int | None = None
    dp_optimizer: str = "fedseg"
    distributed: bool = False
    distributed_honest: int | None = None


@dataclasses.dataclass
class ValidationSettings:
    """Whole-volume validation by sliding-window inference."""

    patch_size: tuple[int, int, int] = (32, 32, 32)
    overlap: float = 0.5
    batch_size: int = 2


@dataclasses.dataclass
class ClinicSettings:
    """Everything a clinic's train/validate/predict needs."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: TrainingSettings = dataclasses.field(default_factory=TrainingSettings)
    privacy: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    validation: ValidationSettings = dataclasses.field(default_factory=ValidationSettings)
    data_dir: Path | None = None
    state_dir: Path | None = None
    privacy_dir: Path | None = None
    client_name: str = "clinic"
    run_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able snapshot (recorded with every round for reproducibility)."""
        data = dataclasses.asdict(self)
        data["data_dir"] = str(self.data_dir) if self.data_dir else None
        data["state_dir"] = str(self.state_dir) if self.state_dir else None
        data["privacy_dir"] = str(self.privacy_dir) if self.privacy_dir else None
        return data


# Flat keys the server may send each round -> (section, field).
SERVER_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("training", "learning_rate"),
    "optimizer": ("training", "optimizer"),
    "local_steps": ("training", "local_steps"),
    "batch_size": ("training", "batch_size"),
    "patch_size": ("training", "patch_size"),
    "foreground_fraction": ("training", "foreground_fraction"),
    "seed": ("training", "seed"),
    "trainable": ("training", "trainable"),
    "augmentations_per_patient": ("training", "augmentations_per_patient"),
    "ema_decay": ("training", "ema_decay"),
    "proximal_mu": ("training", "proximal_mu"),
    "optimizer_state": ("training", "optimizer_state"),
    "local_epochs": ("training", "local_epochs"),
    "local_seconds": ("training", "local_seconds"),
    "full_batch": ("training", "full_batch"),
    "dp": ("privacy", "enabled"),
    "noise_multiplier": ("privacy", "noise_multiplier"),
    "l2_norm_clip": ("privacy", "l2_norm_clip"),
    "delta": ("privacy", "delta"),
    "epsilon_budget": ("privacy", "epsilon_budget"),
    "target_epsilon": ("privacy", "target_epsilon"),
    "planned_rounds": ("privacy", "planned_rounds"),
}

_SECTIONS = {
    "training": TrainingSettings,
    "privacy": PrivacySettings,
    "validation": ValidationSettings,
}


def _coerce(section: str, name: str, value: Any, where: str) -> Any:
    """Convert a value from YAML/JSON to the field's type, or raise FedsegError."""
    field_type = {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}[name]
    label = f"{where}: {section}.{name}={value!r}"
    try:
        if "tuple[float, float]" in str(field_type):
            pair = tuple(float(v) for v in value)
            if len(pair) != 2 or not pair[0] < pair[1]:
                raise ValueError
            return pair
        if "tuple" in str(field_type):
            if isinstance(value, int | float):
                value = [value] * 3
            items = tuple(int(v) for v in value)
            if len(items) != 3:
                raise ValueError
            return items
        if field_type in ("bool", bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if value is None:
            if "None" in str(field_type):
                return None
            raise ValueError
        if field_type in ("int", int, "int | None"):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if "float" in str(field_type):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise FedsegError(f"{label} has the wrong type (expected {field_type})") from None


def _apply_section(target: Any, section: str, values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise FedsegError(f"{where}: unknown setting {section}.{key}")
        setattr(target, key, _coerce(section, key, value, where))


def validate_settings(settings: ClinicSettings, where: str) -> None:
    """Range checks; raises FedsegError naming the value."""
    t, p, v = settings.training, settings.privacy, settings.validation
    checks = [
        (t.learning_rate > 0 and math.isfinite(t.learning_rate), "learning_rate must be > 0",
         t.learning_rate),
        (t.optimizer in ("sgd", "adam"), "optimizer must be sgd or adam", t.optimizer),
        (t.local_steps >= 1, "local_steps must be >= 1", t.local_steps),
        (t.batch_size >= 1, "batch_size must be >= 1", t.batch_size),
        (all(s >= 8 for s in t.patch_size), "patch_size sides must be >= 8", t.patch_size),
        (0.0 <= t.foreground_fraction <= 1.0, "foreground_fraction must be in [0, 1]",
         t.foreground_fraction),
        (p.noise_multiplier >= 0, "noise_multiplier must be >= 0", p.noise_multiplier),
        (p.l2_norm_clip > 0, "l2_norm_clip must be > 0", p.l2_norm_clip),
        (p.delta is None or 0 < p.delta < 1, "delta must be in (0, 1)", p.delta),
        (p.epsilon_budget is None or p.epsilon_budget > 0, "epsilon_budget must be > 0",
         p.epsilon_budget),
        (t.trainable in TRAINABLE_SUBSETS,
         f"trainable must be one of {', '.join(TRAINABLE_SUBSETS)}", t.trainable),
        (t.augmentations_per_patient >= 1, "augmentations_per_patient must be >= 1",
         t.augmentations_per_patient),
        (p.target_epsilon is None or (p.target_epsilon > 0 and math.isfinite(p.target_epsilon)),
         "target_epsilon must be a finite number > 0", p.target_epsilon),
        (0.0 <= t.ema_decay < 1.0, "ema_decay must be in [0, 1)", t.ema_decay),
        (0.0 <= t.proximal_mu and math.isfinite(t.proximal_mu),
         "proximal_mu must be a finite number >= 0", t.proximal_mu),
        (t.optimizer_state in ("reset", "keep"), "optimizer_state must be reset or keep",
         t.optimizer_state),
        (t.dice_classes in ("known", "present"), "dice_classes must be known or present",
         t.dice_classes),
        (0.0 <= t.local_epochs and math.isfinite(t.local_epochs),
         "local_epochs must be a finite number >= 0", t.local_epochs),
        (0.0 <= t.local_seconds and math.isfinite(t.local_seconds),
         "local_seconds must be a finite number >= 0", t.local_seconds),
        (p.dp_optimizer in ("fedseg", "tf_privacy"),
         "dp_optimizer must be fedseg or tf_privacy", p.dp_optimizer),
        (p.planned_rounds is None or p.planned_rounds >= 1, "planned_rounds must be >= 1",
         p.planned_rounds),
        (not p.distributed or p.enabled, "privacy.distributed needs privacy.enabled",
         p.distributed),
        (p.distributed_honest is None or p.distributed_honest >= 1,
         "distributed_honest must be >= 1", p.distributed_honest),
        (p.target_epsilon is None or p.planned_rounds is not None,
         "target_epsilon needs planned_rounds (the rounds it must cover)", p.planned_rounds),
        (0.0 <= v.overlap < 1.0, "validation overlap must be in [0, 1)", v.overlap),
        (all(s >= 8 for s in v.patch_size), "validation patch_size sides must be >= 8",
         v.patch_size),
    ]
    for ok, message, value in checks:
        if not ok:
            raise FedsegError(f"{where}: {message}, got {value!r}")


def settings_from_mapping(data: Mapping[str, Any], where: str) -> ClinicSettings:
    """Build settings from a nested mapping (the settings file's content)."""
    settings = ClinicSettings()
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise FedsegError(f"{where}: section {key} must be a mapping")
            _apply_section(getattr(settings, key), key, value, where)
        elif key == "model":
            if not isinstance(value, Mapping):
                raise FedsegError(f"{where}: section model must be a mapping")
            settings.model = dict(value)
        elif key in ("data_dir", "state_dir", "privacy_dir"):
            setattr(settings, key, Path(value).expanduser() if value else None)
        elif key == "client_name":
            settings.client_name = str(value)
        else:
            raise FedsegError(f"{where}: unknown setting {key}")
    validate_settings(settings, where)
    return settings


def default_settings_path() -> Path:
    """``settings.yaml`` beside the compute package's entrypoint.py (one level above us)."""
    return Path(__file__).resolve().parent.parent / "settings.yaml"


def load_settings(environ: Mapping[str, str] | None = None) -> ClinicSettings:
    """Load settings from the file named by $FEDSEG_SETTINGS (or the package default)."""
    import yaml

    env = os.environ if environ is None else environ
    path = Path(env[ENV_SETTINGS]).expanduser() if env.get(ENV_SETTINGS) else None
    if path is None:
        path = default_settings_path()
        if not path.exists():
            settings = ClinicSettings()
            path = None
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FedsegError(f"{path}: settings file does not exist ({ENV_SETTINGS})") from None
        except (OSError, yaml.YAMLError) as exc:
            raise FedsegError(f"{path}: unreadable settings file ({exc})") from None
        if not isinstance(data, Mapping):
            raise FedsegError(f"{path}: settings file must be a mapping")
        settings = settings_from_mapping(data, str(path))
    if env.get(ENV_DATA_DIR):
        settings.data_dir = Path(env[ENV_DATA_DIR]).expanduser()
    if env.get(ENV_STATE_DIR):
        settings.state_dir = Path(env[ENV_STATE_DIR]).expanduser()
    if env.get(ENV_CLIENT_NAME):
        settings.client_name = env[ENV_CLIENT_NAME]
    if env.get(ENV_PRIVACY_DIR):
        settings.privacy_dir = Path(env[ENV_PRIVACY_DIR]).expanduser()
    if env.get(ENV_RUN_NAME):
        settings.run_name = env[ENV_RUN_NAME]
    if settings.data_dir is None:
        raise FedsegError(f"no data folder: set {ENV_DATA_DIR} or data_dir in the settings file")
    if settings.state_dir is None:
        settings.state_dir = settings.data_dir / ".fedseg"
    if settings.privacy_dir is None:
        from fedseg_clinic.privacy.ledger import default_privacy_dir

        settings.privacy_dir = default_privacy_dir(settings.data_dir)
    return settings


def with_local_steps(settings: ClinicSettings, n_patients: int) -> ClinicSettings:
    """Resolve ``training.local_epochs`` into ``local_steps`` for a clinic of N patients.

    With E > 0 local epochs a round takes ceil(E * N / batch_size) steps (at least 1):
    the expected number of patient visits is E * N. ``training.full_batch`` sets the
    batch size to N first (DP-GD); ``privacy.distributed`` means one step over all N.
    Everything downstream (training, the ledger's segment, noise calibration, the budget
    plan) then uses that step count.
    """
    t = settings.training
    if settings.privacy.enabled and settings.privacy.distributed:
        # One federation-level DP-GD step per round, over every patient.
        return dataclasses.replace(settings, training=dataclasses.replace(
            t, local_steps=1, batch_size=n_patients, local_epochs=0.0))
    if t.full_batch:
        t = dataclasses.replace(t, batch_size=n_patients)
        settings = dataclasses.replace(settings, training=t)
    if t.local_epochs <= 0:
        return settings
    steps = max(1, math.ceil(t.local_epochs * n_patients / t.batch_size))
    return dataclasses.replace(settings, training=dataclasses.replace(t, local_steps=steps))


def with_server_overrides(
    settings: ClinicSettings, server_settings: Mapping[str, Any]
) -> ClinicSettings:
    """A copy of ``settings`` with the server's per-round flat keys applied.

    Keys we do not know (FEDn adds its own) are logged and ignored; known keys with bad
    values raise FedsegError.
    """
    merged = dataclasses.replace(
        settings,
        training=dataclasses.replace(settings.training),
        privacy=dataclasses.replace(settings.privacy),
        validation=dataclasses.replace(settings.validation),
        model=dict(settings.model),
    )
    for key, value in server_settings.items():
        if key in SERVER_KEYS:
            section, name = SERVER_KEYS[key]
            setattr(getattr(merged, section), name,
                    _coerce(section, name, value, "server settings"))
        else:
            logger.debug("ignoring server setting %s", key)
    validate_settings(merged, "server settings")
    return merged
