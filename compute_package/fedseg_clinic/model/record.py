"""The record kept beside model weights: which organ set and architecture they are for.

Weights travel through FEDn as a bare list of arrays (weights.py), which says nothing
about what the output channels mean. Every weights file fedseg writes outside FEDn - the
seed, a run's per-round models - therefore gets a JSON sidecar::

    seed.npz  +  seed.json       {"organ_set": {name, version, organs}, "model": {...}}
    models/round-3.npz           covered by models/model.json (one record per run)
    models/clinic-b/round-3.npz  a local-only baseline's clinic model: models/clinic-b/
                                 model.json, with "organs_trained"

``organs_trained`` (optional) lists the organs whose contours the weights were trained
on, when that is a strict part of the organ set: a clinic that never contours the larynx
trains a model whose larynx channel no loss ever penalised (unknown organs are
marginalised, losses.py), so it may fill the larynx anywhere. Inference honours the list
(model/inference.py :func:`allowed_classes`): only background and those organs compete.

Readers look for ``<file>.json`` (same stem) first, then ``model.json`` in the same
folder. A model whose record names another organ set than the data or the experiment is
refused (:meth:`fedseg_clinic.organs.OrganSet.check_record`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_text
from fedseg_clinic.model.unet import UNetConfig
from fedseg_clinic.organs import OrganSet, organ_set

RECORD_VERSION = 1
FOLDER_RECORD_NAME = "model.json"


def model_record(config: UNetConfig,
                 organs_trained: Iterable[str] | None = None) -> dict[str, Any]:
    """The sidecar content for weights of a model built from ``config``.

    Args:
        config: the architecture (organ set included).
        organs_trained: the organs the weights learnt from contours, or None (all of the
            organ set); kept in the organ set's order.

    Raises:
        FedsegError: an organ outside the organ set.
    """
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "organ_set": config.organs.to_json(),
        "model": config.to_dict(),
    }
    if organs_trained is not None:
        record["organs_trained"] = list(check_organs_trained(organs_trained, config.organs,
                                                             "organs_trained"))
    return record


def check_organs_trained(value: Any, organs: OrganSet, where: str) -> tuple[str, ...]:
    """An ``organs_trained`` list checked against the organ set, in the set's order.

    Raises:
        FedsegError: one line naming ``where`` when it is not a list of the set's organs.
    """
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise FedsegError(f"{where}: organs_trained must be a list of organ names, got "
                          f"{value!r}")
    names = [str(v) for v in value]
    foreign = sorted(set(names) - set(organs.organs))
    if foreign:
        raise FedsegError(f"{where}: organs_trained names {', '.join(foreign)}, not in organ "
                          f"set {organs.key} ({', '.join(organs.organs)})")
    return tuple(o for o in organs.organs if o in names)


def sidecar_path(weights: Path) -> Path:
    """``seed.npz`` -> ``seed.json``: the sidecar of one weights file."""
    return Path(weights).with_suffix(".json")


def write_record(path: Path, config: UNetConfig,
                 organs_trained: Iterable[str] | None = None) -> Path:
    """Write a model record (atomically) to ``path``; returns ``path``."""
    atomic_write_text(Path(path),
                      json.dumps(model_record(config, organs_trained), indent=2) + "\n")
    return Path(path)


def read_record(path: Path) -> dict[str, Any]:
    """Read a model record; errors name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FedsegError(f"{path}: model record does not exist") from None
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{path}: unreadable model record ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) \
            or "organ_set" not in data:
        raise FedsegError(f"{path}: not a model record (needs 'model' and 'organ_set')")
    return data


def find_record(weights: Path) -> Path | None:
    """The record that covers a weights file, or None."""
    for candidate in (sidecar_path(weights), Path(weights).parent / FOLDER_RECORD_NAME):
        if candidate.is_file():
            return candidate
    return None


def config_from_record(record: dict[str, Any], where: str) -> UNetConfig:
    """The model config of a record, checked against its organ set entry."""
    config = UNetConfig.from_dict(record["model"])
    config.organs.check_record(record["organ_set"], where)
    return config


def check_weights_organ_set(weights: Path, organs: OrganSet | str) -> None:
    """Refuse weights whose record names another organ set (no record: nothing to check).

    Raises:
        FedsegError: one line naming the weights file and both organ sets.
    """
    path = find_record(weights)
    if path is None:
        return
    organ_set(organs).check_record(read_record(path)["organ_set"], f"model {weights}")


def record_organs_trained(record: dict[str, Any], config: UNetConfig,
                          where: str) -> tuple[str, ...] | None:
    """A record's (or card's) ``organs_trained``, checked; None when it has none."""
    value = record.get("organs_trained")
    return None if value is None else check_organs_trained(value, config.organs, where)
