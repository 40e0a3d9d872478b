"""Canonical organ names, organ sets per treatment site, and the ROI alias table.

An *organ set* is the named, versioned vocabulary one experiment trains for: its organs
(in class order: class ``k`` is ``organs[k - 1]``, class 0 is background), the order in
which overlapping contours are painted into one label map, the organ (if any) that
contains all others (``container``: "body" for the thorax set), and each organ's clinical
name and display colour (for RTSTRUCT/SEG output). Two sets exist:

- ``thorax`` (v1): the AAPM 2017 thoracic auto-segmentation challenge's organs at risk -
  body, lungs, heart, spinal cord, esophagus (the vocabulary fedseg started with);
- ``head_neck`` (v1): the OpenKBP head-and-neck organs at risk - brainstem, spinal cord,
  parotids, esophagus, larynx, mandible.

A set's version changes whenever its organs or their order change, since a model's output
channels follow that order; models, seeds and clinic data record ``name`` and ``version``
and are refused when they do not match.

ROI names are matched after normalisation: case is ignored and every run of separators
(space, ``_``, ``-``, ``.``, ``/``) is dropped, so "Lt Lung", "LUNG_LT" and "lt-lung" are
the same key.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError


@dataclasses.dataclass(frozen=True)
class OrganSet:
    """A named, versioned organ vocabulary (see the module docstring).

    Attributes:
        name: the set's name, e.g. "thorax".
        version: bumped whenever ``organs`` or their order change.
        organs: canonical organ names in class order (class k = organs[k - 1]).
        label_priority: every organ once; overlapping masks are painted in this order,
            later organs overwriting earlier ones.
        container: the organ that contains every other ("body"), or None. It is
            predicted by every non-background class, and unknown classes of a case whose
            container is labelled merge into it in the loss.
        clinical_names: organ -> the ROI name written into RTSTRUCT/SEG output.
        colours: organ -> (r, g, b) 0..255 display colour.
    """

    name: str
    version: int
    organs: tuple[str, ...]
    label_priority: tuple[str, ...]
    container: str | None
    clinical_names: Mapping[str, str]
    colours: Mapping[str, tuple[int, int, int]]

    def __post_init__(self) -> None:
        if sorted(self.label_priority) != sorted(self.organs):
            raise ValueError(f"organ set {self.name}: label_priority must list every organ once")
        if self.container is not None and self.container not in self.organs:
            raise ValueError(f"organ set {self.name}: container {self.container} not an organ")

    @property
    def n_classes(self) -> int:
        """Output channels of a model for this set: background + organs."""
        return len(self.organs) + 1

    @property
    def key(self) -> str:
        """``name@vVERSION``, the form written into records and error messages."""
        return f"{self.name}@v{self.version}"

    def class_index(self, organ: str) -> int:
        """The class index of an organ (1-based; 0 is background)."""
        if organ not in self.organs:
            raise FedsegError(f"organ {organ!r} is not in organ set {self.name} "
                              f"({', '.join(self.organs)})")
        return self.organs.index(organ) + 1

    def to_json(self) -> dict[str, Any]:
        """The record written beside models, seeds and manifests."""
        return {"name": self.name, "version": self.version, "organs": list(self.organs)}

    def check_record(self, record: Any, where: str) -> None:
        """Refuse a recorded organ set (``to_json`` form or a name) that is not this one.

        Raises:
            FedsegError: one line naming ``where``, both sets and their organs.
        """
        if isinstance(record, str):
            if record not in ORGAN_SETS:
                raise FedsegError(f"{where}: unknown organ set {record!r} "
                                  f"(known: {', '.join(ORGAN_SETS)})")
            record = ORGAN_SETS[record].to_json()
        if isinstance(record, Mapping):
            name = str(record.get("name"))
            version = record.get("version")
            organs = list(record.get("organs") or [])
        else:
            raise FedsegError(f"{where}: malformed organ set record {record!r}")
        if name != self.name or version != self.version or organs != list(self.organs):
            raise FedsegError(
                f"{where}: built for organ set {name}@v{version} ({', '.join(map(str, organs))})"
                f", but this is organ set {self.key} ({', '.join(self.organs)}); "
                "use data and models of one organ set"
            )


_COLOURS: dict[str, tuple[int, int, int]] = {
    "body": (177, 122, 101),
    "lung_left": (111, 184, 210),
    "lung_right": (90, 160, 200),
    "heart": (206, 110, 84),
    "spinal_cord": (244, 214, 49),
    "esophagus": (211, 171, 158),
    "brainstem": (119, 167, 255),
    "parotid_left": (0, 200, 100),
    "parotid_right": (0, 150, 200),
    "larynx": (200, 100, 255),
    "mandible": (255, 250, 220),
}

_CLINICAL: dict[str, str] = {
    "body": "External",
    "lung_left": "Lung_L",
    "lung_right": "Lung_R",
    "heart": "Heart",
    "spinal_cord": "SpinalCord",
    "esophagus": "Esophagus",
    "brainstem": "Brainstem",
    "parotid_left": "Parotid_L",
    "parotid_right": "Parotid_R",
    "larynx": "Larynx",
    "mandible": "Bone_Mandible",
}

THORAX = OrganSet(
    name="thorax",
    version=1,
    organs=("body", "lung_left", "lung_right", "heart", "spinal_cord", "esophagus"),
    # Body first (everything inside the patient), then the large lungs, then the heart
    # (lung contours often spill into the mediastinum), then the thin tubular organs,
    # whose few voxels would otherwise vanish under a neighbour's generous contour.
    label_priority=("body", "lung_left", "lung_right", "heart", "esophagus", "spinal_cord"),
    container="body",
    clinical_names={o: _CLINICAL[o] for o in
                    ("body", "lung_left", "lung_right", "heart", "spinal_cord", "esophagus")},
    colours={o: _COLOURS[o] for o in
             ("body", "lung_left", "lung_right", "heart", "spinal_cord", "esophagus")},
)

_HN_ORGANS = ("brainstem", "spinal_cord", "parotid_left", "parotid_right", "esophagus",
              "larynx", "mandible")
HEAD_NECK = OrganSet(
    name="head_neck",
    version=1,
    organs=_HN_ORGANS,
    # Bone and glands first, thin tubular structures last (as for the thorax set).
    label_priority=("mandible", "parotid_left", "parotid_right", "larynx", "esophagus",
                    "brainstem", "spinal_cord"),
    container=None,
    clinical_names={o: _CLINICAL[o] for o in _HN_ORGANS},
    colours={o: _COLOURS[o] for o in _HN_ORGANS},
)

ORGAN_SETS: dict[str, OrganSet] = {s.name: s for s in (THORAX, HEAD_NECK)}
DEFAULT_ORGAN_SET = THORAX.name

# The thorax set's organs: the vocabulary of code written before organ sets existed.
ORGANS: tuple[str, ...] = THORAX.organs
# Every canonical organ of every set (case files and alias tables accept all of them).
ALL_ORGANS: tuple[str, ...] = tuple(dict.fromkeys(o for s in ORGAN_SETS.values()
                                                  for o in s.organs))


def organ_set(name: str | OrganSet | None) -> OrganSet:
    """The organ set of a name (None: the default, thorax).

    Raises:
        FedsegError: for an unknown name, listing the known ones.
    """
    if isinstance(name, OrganSet):
        return name
    if name is None:
        return ORGAN_SETS[DEFAULT_ORGAN_SET]
    if name not in ORGAN_SETS:
        raise FedsegError(f"unknown organ set {name!r} (known: {', '.join(ORGAN_SETS)})")
    return ORGAN_SETS[name]

# Names seen in clinical RTSTRUCTs and public data sets (AAPM 2017, TCIA, vendor defaults).
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "body": ("body", "external", "outline", "skin", "patient", "body contour", "ext"),
    "lung_left": (
        "lung_left", "left lung", "lung left", "lt lung", "lung lt", "l lung", "lung l",
        "lungl", "lung_lt",
    ),
    "lung_right": (
        "lung_right", "right lung", "lung right", "rt lung", "lung rt", "r lung", "lung r",
        "lungr", "lung_rt",
    ),
    "heart": ("heart", "cor", "heart whole"),
    "spinal_cord": ("spinal_cord", "spinal cord", "cord", "spinalcord", "spinal canal", "sc"),
    "esophagus": ("esophagus", "oesophagus", "esoph", "eso"),
    # Head and neck: OpenKBP's names (Brainstem, SpinalCord, LeftParotid, RightParotid,
    # Esophagus, Larynx, Mandible), TG-263 names and common variants.
    "brainstem": ("brainstem", "brain stem", "brain_stem"),
    "parotid_left": ("parotid_left", "leftparotid", "left parotid", "parotid_l", "parotid l",
                     "lt parotid", "parotid lt", "l parotid"),
    "parotid_right": ("parotid_right", "rightparotid", "right parotid", "parotid_r",
                      "parotid r", "rt parotid", "parotid rt", "r parotid"),
    "larynx": ("larynx", "glottis", "larynx_sg"),
    "mandible": ("mandible", "bone_mandible", "bone mandible", "jaw"),
}

_SEPARATORS = re.compile(r"[\s_\-./]+")


def normalise_name(name: str) -> str:
    """Return the lookup key of an ROI name: lower case, separators removed."""
    return _SEPARATORS.sub("", name.strip().lower())


class AliasTable:
    """Maps ROI names to canonical organ names.

    Args:
        aliases: canonical organ -> names that mean it. Canonical names must be in
            ``ALL_ORGANS``; the canonical name itself always maps to itself.
    """

    def __init__(self, aliases: Mapping[str, Iterable[str]] | None = None) -> None:
        self._lookup: dict[str, str] = {}
        for organ in ALL_ORGANS:
            self._lookup[normalise_name(organ)] = organ
        for organ, names in (aliases if aliases is not None else DEFAULT_ALIASES).items():
            self.add(organ, names)

    def add(self, organ: str, names: Iterable[str]) -> None:
        """Add names for a canonical organ; a name already mapped elsewhere is an error."""
        if organ not in ALL_ORGANS:
            raise FedsegError(f"alias table: unknown organ {organ!r} "
                              f"(known: {', '.join(ALL_ORGANS)})")
        for name in names:
            key = normalise_name(name)
            previous = self._lookup.get(key)
            if previous is not None and previous != organ:
                raise FedsegError(
                    f"alias table: {name!r} maps to both {previous!r} and {organ!r}"
                )
            self._lookup[key] = organ

    def canonical(self, roi_name: str) -> str | None:
        """Return the canonical organ for an ROI name, or None if it is not mapped."""
        return self._lookup.get(normalise_name(roi_name))

    @classmethod
    def from_file(cls, path: Path) -> AliasTable:
        """Default table extended by a JSON or YAML file ``{organ: [names...]}``."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise FedsegError(f"{path}: cannot read alias table ({exc.strerror})") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise FedsegError(f"{path}: not a valid alias table ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
        ):
            raise FedsegError(f"{path}: alias table must map organ names to lists of strings")
        table = cls()
        for organ, names in data.items():
            try:
                table.add(organ, names)
            except FedsegError as exc:
                raise FedsegError(f"{path}: {exc}") from None
        return table
