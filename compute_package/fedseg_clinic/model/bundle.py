"""A trained model ready for inference, and the exported model folder it can come from.

``fedseg predict --model MODEL`` accepts either

- an **exported model** folder (``fedseg model export``)::

      DIR/model.keras        the Keras model (architecture + weights)
      DIR/model_card.json    organ set, model config, patch size, HU window, spacing,
                             training run, rounds, clinics, epsilon/delta per clinic,
                             validation Dice per organ (see :data:`CARD_KEYS`)

  which needs nothing else; or
- a round's **weights** (``runs/<name>/models/round-<k>.npz``, or ``seed.npz``): the
  architecture and organ set come from the model record beside them (model/record.py),
  the patch size, HU window and overlap from the run's ``run.json`` two folders up when
  there is one (else the clinic defaults).

Either way the result is a :class:`LoadedModel`: the Keras model plus everything the
sliding-window inference needs to see the CT as training did. A card or record may add
``organs_trained`` (model/record.py): the model then labels only those organs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import read_json_object
from fedseg_clinic.model.record import (
    config_from_record,
    find_record,
    read_record,
    record_organs_trained,
)
from fedseg_clinic.model.unet import UNetConfig, build_unet, check_patch_size
from fedseg_clinic.organs import OrganSet
from fedseg_clinic.settings import ClinicSettings, settings_from_mapping

logger = logging.getLogger(__name__)

KERAS_NAME = "model.keras"
CARD_NAME = "model_card.json"
CARD_VERSION = 1
# Keys every model card has (values may be null where the run did not record them).
CARD_KEYS: tuple[str, ...] = (
    "card_version", "organ_set", "model", "patch_size", "overlap", "hu_window", "spacing",
    "run", "round", "rounds", "clinics", "privacy", "validation_dice",
)


@dataclasses.dataclass
class LoadedModel:
    """A model and how to feed it.

    Attributes:
        model: the Keras U-Net.
        config: its architecture (organ set included).
        patch_size: (z, y, x) sliding-window patch.
        overlap: sliding-window overlap.
        hu_window: HU window mapped onto [-1, 1].
        spacing: (z, y, x) mm the model was trained at, or None (each CT's own spacing).
        source: the file or folder it was loaded from.
        card: the model card (exported models) or a card-like summary (weights).
        organs_trained: the organs it learnt from contours when that is part of its
            organ set (a local-only model of a partial protocol), else None (all).
    """

    model: Any
    config: UNetConfig
    patch_size: tuple[int, int, int]
    overlap: float
    hu_window: tuple[float, float]
    spacing: tuple[float, float, float] | None
    source: Path
    card: dict[str, Any]
    organs_trained: tuple[str, ...] | None = None

    @property
    def organs(self) -> OrganSet:
        """The organ set of the output channels."""
        return self.config.organs

    @property
    def organs_predicted(self) -> tuple[str, ...]:
        """The organs it labels: its trained organs, or the whole organ set."""
        return self.organs_trained if self.organs_trained is not None else self.organs.organs

    @property
    def organs_excluded(self) -> tuple[str, ...]:
        """Organs of the set it was never trained on (their channels are not used)."""
        return tuple(o for o in self.organs.organs if o not in self.organs_predicted)


def read_card(folder: Path) -> dict[str, Any]:
    """Read and check an exported model's card.

    Raises:
        FedsegError: naming the file when it is missing, unreadable or lacks a key.
    """
    path = folder / CARD_NAME
    card = read_json_object(path, "model card",
                            missing=f"{folder}: not an exported model (no {CARD_NAME})")
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise FedsegError(f"{path}: model card lacks {', '.join(missing)}")
    if card["card_version"] != CARD_VERSION:
        raise FedsegError(f"{path}: model card version {card['card_version']}, expected "
                          f"{CARD_VERSION}")
    return card


def _triple(value: Any, what: str, where: str) -> tuple[Any, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3:
        raise FedsegError(f"{where}: {what} must be three numbers (z, y, x), got {value!r}")
    return items


def _load_exported(folder: Path) -> LoadedModel:
    from fedseg_clinic.tf_env import keras

    card = read_card(folder)
    where = str(folder / CARD_NAME)
    config = config_from_record({"model": card["model"], "organ_set": card["organ_set"]},
                                where)
    try:
        model = keras.models.load_model(str(folder / KERAS_NAME), compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad files
        raise FedsegError(f"{folder / KERAS_NAME}: cannot load the Keras model "
                          f"({type(exc).__name__}: {exc})") from None
    if int(model.output_shape[-1]) != config.n_classes:
        raise FedsegError(f"{folder / KERAS_NAME}: {model.output_shape[-1]} output classes, "
                          f"but the card's organ set {config.organs.key} has "
                          f"{config.n_classes}")
    patch = check_patch_size(config, [int(v) for v in _triple(card["patch_size"],
                                                              "patch_size", where) or ()])
    spacing = _triple(card["spacing"], "spacing", where)
    window = card["hu_window"]
    return LoadedModel(
        model=model, config=config, patch_size=patch, overlap=float(card["overlap"]),
        hu_window=(float(window[0]), float(window[1])),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        source=folder, card=card,
        organs_trained=record_organs_trained(card, config, where))


def run_settings(run_dir: Path) -> ClinicSettings:
    """The clinic settings a run trained with (run.json's config.clinic); defaults if none."""
    path = run_dir / "run.json"
    if not path.is_file():
        return ClinicSettings()
    try:
        info = json.loads(path.read_text())
        clinic = dict((info.get("config") or {}).get("clinic") or {})
    except (OSError, ValueError, AttributeError) as exc:
        raise FedsegError(f"{path}: unreadable run record ({exc})") from None
    sections = {k: v for k, v in clinic.items() if k in ("training", "validation", "privacy")}
    return settings_from_mapping(sections, str(path))


def _load_weights(path: Path) -> LoadedModel:
    from fedseg_clinic.model.weights import apply_weights, load_weights_npz

    record_path = find_record(path)
    if record_path is None:
        raise FedsegError(f"{path}: no model record beside it ({path.with_suffix('.json').name}"
                          " or model.json); export the model with `fedseg model export`")
    record = read_record(record_path)
    config = config_from_record(record, str(record_path))
    model = build_unet(config)
    apply_weights(model, load_weights_npz(path), str(path))
    organs_trained = record_organs_trained(record, config, str(record_path))
    # runs/<name>/models/round-k.npz -> runs/<name>; a local-only baseline's
    # runs/<name>/models/<clinic>/round-k.npz too; seed.npz sits in the run folder.
    if path.parent.name == "models":
        run_dir = path.parent.parent
    elif path.parent.parent.name == "models":
        run_dir = path.parent.parent.parent
    else:
        run_dir = path.parent
    settings = run_settings(run_dir)
    patch = check_patch_size(config, settings.validation.patch_size)
    card = {"organ_set": config.organs.to_json(), "model": config.to_dict(),
            "weights": str(path), "run": run_dir.name}
    if organs_trained is not None:
        card["organs_trained"] = list(organs_trained)
    return LoadedModel(model=model, config=config, patch_size=patch,
                       overlap=settings.validation.overlap,
                       hu_window=settings.training.hu_window, spacing=_run_spacing(run_dir),
                       source=path, card=card, organs_trained=organs_trained)


def run_clinic_dirs(run_dir: Path) -> dict[str, Path]:
    """The clinic data folders a run trained on.

    run.json's ``clinic_data`` (written by ``fedseg run``), else the generated phantom
    clinics under ``run_dir/data``.
    """
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    recorded = info.get("clinic_data") if isinstance(info, dict) else None
    if isinstance(recorded, dict) and recorded:
        return {str(k): Path(v) for k, v in recorded.items()}
    return {m.parent.name: m.parent for m in sorted((run_dir / "data").glob("*/manifest.json"))}


def _run_spacing(run_dir: Path) -> tuple[float, float, float] | None:
    """The import spacing shared by a run's clinic manifests, or None (native spacing)."""
    spacings = set()
    for folder in run_clinic_dirs(run_dir).values():
        try:
            extra = json.loads((folder / "manifest.json").read_text()).get("extra") or {}
        except (OSError, ValueError, AttributeError):
            continue
        spacing = extra.get("spacing")
        spacings.add(tuple(float(v) for v in spacing) if spacing else None)
    return spacings.pop() if len(spacings) == 1 else None  # type: ignore[return-value]


def load_model(path: Path) -> LoadedModel:
    """Load an exported model folder or a weights file (see the module docstring).

    Raises:
        FedsegError: one line naming the file for anything missing or inconsistent.
    """
    path = Path(path)
    if path.is_dir():
        return _load_exported(path)
    if path.is_file() and path.suffix == ".npz":
        return _load_weights(path)
    if not path.exists():
        raise FedsegError(f"{path}: model does not exist")
    raise FedsegError(f"{path}: not a model (an exported model folder or a round's .npz "
                      "weights)")


def card_from_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A card with every key of :data:`CARD_KEYS` (missing ones null), version set.

    ``organs_trained`` is kept when ``data`` has one (a model of part of its organ set).
    """
    card = {key: data.get(key) for key in CARD_KEYS}
    if data.get("organs_trained") is not None:
        card["organs_trained"] = list(data["organs_trained"])
    card["card_version"] = CARD_VERSION
    return card
