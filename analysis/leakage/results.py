"""Writers (and readers) for attack and audit results: JSON, PNG figures, one HTML page.

Figures use the matplotlib object API on an Agg canvas (:func:`fedseg.analysis.plots.
png_bytes`); nothing is shown. Every file is written atomically (temporary sibling +
os.replace), so an interrupted command never leaves half a report.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from fedseg.analysis.plots import png_bytes
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_bytes

# Background black, then one colour per organ (body, lungs, heart, cord, esophagus).
LABEL_COLORS = ListedColormap(["black", "0.55", "tab:blue", "tab:cyan", "tab:red",
                               "yellow", "tab:orange"])


def write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes atomically; create the parent folder."""
    return atomic_write_bytes(Path(path), data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write a dict as indented JSON (NaN -> null, inf -> "inf")."""
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"
    return write_bytes(path, text.encode())


def montage(true_images: np.ndarray | None, rec_images: np.ndarray,
            true_labels: np.ndarray | None, rec_labels: np.ndarray, max_examples: int = 4
            ) -> Figure:
    """True vs reconstructed CT and masks: rows per example, three axial slices each.

    Args:
        true_images: (b, z, y, x) in [-1, 1]; None when the truth is unknown (a stored
            round): then only the reconstruction is drawn.
        rec_images: matched reconstructions, same shape.
        true_labels: (b, z, y, x) label maps, or None.
        rec_labels: reconstructed label maps.
        max_examples: at most this many examples are drawn.
    """
    b = min(len(rec_images), max_examples)
    depth = rec_images.shape[1]
    slices = sorted({depth // 4, depth // 2, (3 * depth) // 4})
    columns = [("CT", true_images, "gray"), ("CT rec.", rec_images, "gray"),
               ("mask", true_labels, LABEL_COLORS), ("mask rec.", rec_labels, LABEL_COLORS)]
    columns = [c for c in columns if c[1] is not None]
    fig = Figure(figsize=(2.0 * len(slices) * 4 / 2, 2.0 * b + 0.5), layout="constrained")
    axes = fig.subplots(b, len(slices) * len(columns), squeeze=False)
    for i in range(b):
        for c, (title, volume, cmap) in enumerate(columns):
            for s, z in enumerate(slices):
                ax = axes[i][c * len(slices) + s]
                is_mask = cmap is LABEL_COLORS
                ax.imshow(np.asarray(volume)[i][z], cmap=cmap, vmin=0 if is_mask else -1,
                          vmax=6 if is_mask else 1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{title} z={z}", fontsize=7)
    return fig


def line_figure(title: str, xlabel: str, series: Mapping[str, tuple[Sequence[float],
                Sequence[float]]], ylabel: str, hline: float | None = None) -> Figure:
    """One small line plot: name -> (x, y); an optional dashed reference line."""
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="0.4", linestyle="--", label="threshold")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def write_html(path: Path, title: str, intro: str, tables: Mapping[str, Sequence[
        Mapping[str, Any]]], images: Sequence[str]) -> Path:
    """One self-contained HTML page: tables (list of rows) and PNGs beside it.

    Args:
        path: the .html file.
        title: page title.
        intro: one paragraph of plain text.
        tables: heading -> rows (dicts with the same keys).
        images: PNG file names relative to the page.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:1100px}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px;"
             "font-size:13px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    for heading, rows in tables.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if not rows:
            parts.append("<p>(no rows)</p>")
            continue
        keys = list(rows[0])
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
                     + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{_cell(row.get(k))}</td>" for k in keys)
                         + "</tr>")
        parts.append("</table>")
    for name in images:
        parts.append(f"<p><img src='{html.escape(name)}' style='max-width:100%'></p>")
    parts.append("</body></html>\n")
    return write_bytes(path, "".join(parts).encode())


def write_png(path: Path, fig: Figure) -> Path:
    """Render a figure to PNG atomically."""
    return write_bytes(path, png_bytes(fig))


# --------------------------------------------------------------- reading results back
#
# `fedseg analyze --attack/--audit` shows these results in the round-log report. The
# key lists below are the schema the readers check; the writers (inversion.run_study /
# attack_simulated, :func:`audit_row`) produce them, and the tests feed the real writers'
# output through the readers so the two cannot drift apart.

STUDY_NAME = "study.json"  # fedseg attack study
INVERT_NAME = "results.json"  # fedseg attack invert
AUDIT_NAME = "audit.json"  # fedseg audit
STUDY_KEYS: tuple[str, ...] = ("rows", "smallest_unrecognisable_sigma", "threshold")
STUDY_ROW_KEYS: tuple[str, ...] = (
    "batch_size", "local_steps", "noise_multiplier", "target_epsilon", "correlation",
    "psnr", "ssim", "mask_dice", "recognisable", "baseline")
BASELINE_KEYS: tuple[str, ...] = ("psnr", "ssim", "mask_dice")  # + correlation since v2
# correlation_margin: recognisable = correlation >= the prior's + margin (current);
# studies written before it carry an absolute "correlation" threshold instead.
THRESHOLD_KEYS: tuple[str, ...] = ("mask_margin",)
CORRELATION_THRESHOLD_KEYS: tuple[str, ...] = ("correlation_margin", "correlation")
INVERT_KEYS: tuple[str, ...] = ("objective", "seconds", "settings")
AUDIT_ROW_KEYS: tuple[str, ...] = (
    "noise_multiplier", "epsilon_accountant", "epsilon_lower_bound", "confidence",
    "canary_correct", "canary_auc")
MEMBERSHIP_ATTACKS: tuple[str, ...] = ("loss_threshold", "lira_offline")
MEMBERSHIP_KEYS: tuple[str, ...] = ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")


def audit_row(noise_multiplier: float | None, canary: Mapping[str, Any],
              membership: Mapping[str, Any] | None) -> dict[str, Any]:
    """One configuration's line of audit.json: accountant, lower bound, attack AUCs.

    Args:
        noise_multiplier: sigma, None = non-private ("none" in the row).
        canary: :func:`fedseg.analysis.leakage.canary.run_canary_audit`'s result.
        membership: :func:`fedseg.analysis.leakage.membership.run_membership`'s result, or None.

    Returns:
        AUDIT_ROW_KEYS, plus <attack>_<metric> for each membership attack and metric.
    """
    row: dict[str, Any] = {
        "noise_multiplier": "none" if noise_multiplier is None else noise_multiplier,
        "epsilon_accountant": canary["epsilon"],
        "epsilon_lower_bound": canary["epsilon_lower_bound"],
        "confidence": canary["confidence"],
        "canary_correct": f"{canary['v']}/{canary['r']}",
        "canary_auc": canary["attack_auc"],
    }
    if membership is not None:
        for attack_name in MEMBERSHIP_ATTACKS:
            for key in MEMBERSHIP_KEYS:
                row[f"{attack_name}_{key}"] = membership[attack_name][key]
    return row


@dataclasses.dataclass(frozen=True)
class LeakageResult:
    """An attack or audit result read back for the analysis report.

    Attributes:
        kind: "study" (fedseg attack study), "invert" (fedseg attack invert) or "audit".
        source: the JSON file.
        data: its content (inf comes back as the string "inf", NaN as None).
        figures: (file name, PNG bytes) of the figures beside the JSON.
    """

    kind: str
    source: Path
    data: dict[str, Any]
    figures: tuple[tuple[str, bytes], ...]


def _need(mapping: Any, keys: Sequence[str], source: Path, where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise FedsegError(f"{source}: {where} is not a JSON object")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise FedsegError(f"{source}: {where} lacks {', '.join(missing)} (not written by "
                          "fedseg attack / fedseg audit?)")


def _number(value: Any, source: Path, where: str, none_ok: bool = True) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not (isinstance(value, int | float)
                                       or value in ("inf", "-inf")):
        raise FedsegError(f"{source}: {where} = {value!r} is not a number")


def _check_study(data: Mapping[str, Any], source: Path) -> None:
    _need(data, STUDY_KEYS, source, "the study")
    _need(data["threshold"], THRESHOLD_KEYS, source, "threshold")
    if not any(k in data["threshold"] for k in CORRELATION_THRESHOLD_KEYS):
        raise FedsegError(f"{source}: threshold lacks correlation_margin")
    rows = data["rows"]
    if not isinstance(rows, list) or not rows:
        raise FedsegError(f"{source}: rows must be a non-empty list")
    for i, row in enumerate(rows):
        _need(row, STUDY_ROW_KEYS, source, f"rows[{i}]")
        _need(row["baseline"], BASELINE_KEYS, source, f"rows[{i}].baseline")
        for key in ("batch_size", "local_steps", "noise_multiplier", "correlation", "psnr",
                    "ssim", "mask_dice", "target_epsilon"):
            _number(row[key], source, f"rows[{i}].{key}",
                    none_ok=key in ("target_epsilon", "mask_dice"))


def _check_audit(data: Mapping[str, Any], source: Path) -> None:
    _need(data, ("rows",), source, "the audit")
    rows = data["rows"]
    if not isinstance(rows, list) or not rows:
        raise FedsegError(f"{source}: rows must be a non-empty list")
    for i, row in enumerate(rows):
        _need(row, AUDIT_ROW_KEYS, source, f"rows[{i}]")
        for key in ("epsilon_accountant", "epsilon_lower_bound", "confidence",
                    "canary_auc"):
            _number(row[key], source, f"rows[{i}].{key}", none_ok=key == "canary_auc")


def _backfill_confidence(data: dict[str, Any]) -> None:
    """Audits written before rows carried ``confidence`` keep it in runs[i]."""
    rows, runs = data.get("rows"), data.get("runs")
    if not (isinstance(rows, list) and isinstance(runs, list) and len(rows) == len(runs)):
        return
    for row, run in zip(rows, runs, strict=True):
        try:
            if isinstance(row, dict) and "confidence" not in row:
                row["confidence"] = run["canary_audit"]["confidence"]
        except (KeyError, TypeError):
            return


def _locate(path: Path, names: Sequence[str]) -> Path:
    """The JSON file itself, or the first of ``names`` inside a folder."""
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FedsegError(f"{path}: no {' or '.join(names)} in this folder")
    if not path.is_file():
        raise FedsegError(f"{path}: no such file or folder")
    return path


def load_leakage(path: Path, expected: str) -> LeakageResult:
    """Read and check one result of ``fedseg attack`` or ``fedseg audit``.

    Args:
        path: the JSON file (study.json, results.json, audit.json) or the folder the
            command wrote (--out).
        expected: "attack" (a study or one inversion) or "audit".

    Returns:
        The checked result with the PNG figures found beside it.

    Raises:
        FedsegError: missing or unreadable file, not JSON, or not the expected schema
            (the message names the file).
    """
    if expected not in ("attack", "audit"):
        raise FedsegError(f"load_leakage: expected must be attack or audit, got {expected!r}")
    names = (STUDY_NAME, INVERT_NAME) if expected == "attack" else (AUDIT_NAME,)
    source = _locate(Path(path), names)
    try:
        data = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise FedsegError(f"{source}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise FedsegError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise FedsegError(f"{source}: expected a JSON object")
    if expected == "audit":
        kind, pattern = "audit", "audit*.png"
        _backfill_confidence(data)
        _check_audit(data, source)
    elif "rows" in data:
        kind, pattern = "study", "study_*.png"
        _check_study(data, source)
    else:
        kind, pattern = "invert", "montage.png"
        _need(data, INVERT_KEYS, source, "the inversion result")
    try:
        figures = tuple((p.name, p.read_bytes())
                        for p in sorted(source.parent.glob(pattern)) if p.is_file())
    except OSError as exc:
        raise FedsegError(f"{source.parent}: cannot read a figure ({exc})") from None
    return LeakageResult(kind, source, data, figures)
