"""Canonical organ names and the alias table that maps clinic ROI names onto them.

The canonical set is the AAPM 2017 thoracic auto-segmentation challenge's organs at
risk. ROI names are matched after normalisation: case is ignored and every
run of separators (space, ``_``, ``-``, ``.``, ``/``) is dropped, so "Lt Lung",
"LUNG_LT" and "lt-lung" are the same key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedseg_clinic.errors import FedsegError

ORGANS: tuple[str, ...] = (
    "body",
    "lung_left",
    "lung_right",
    "heart",
    "spinal_cord",
    "esophagus",
)

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
}

_SEPARATORS = re.compile(r"[\s_\-./]+")


def normalise_name(name: str) -> str:
    """Return the lookup key of an ROI name: lower case, separators removed."""
    return _SEPARATORS.sub("", name.strip().lower())


class AliasTable:
    """Maps ROI names to canonical organ names.

    Args:
        aliases: canonical organ -> names that mean it. Canonical names must be in
            ``ORGANS``; the canonical name itself always maps to itself.
    """

    def __init__(self, aliases: Mapping[str, Iterable[str]] | None = None) -> None:
        self._lookup: dict[str, str] = {}
        for organ in ORGANS:
            self._lookup[normalise_name(organ)] = organ
        for organ, names in (aliases if aliases is not None else DEFAULT_ALIASES).items():
            self.add(organ, names)

    def add(self, organ: str, names: Iterable[str]) -> None:
        """Add names for a canonical organ; a name already mapped elsewhere is an error."""
        if organ not in ORGANS:
            raise FedsegError(f"alias table: unknown organ {organ!r} (known: {', '.join(ORGANS)})")
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
