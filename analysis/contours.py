"""What a Dice looks like: a validation case with ground truth and prediction per organ.

For a run folder with global models (``models/round-K.npz``) and the clinics' data
(``clinic_data`` in run.json), the last round's global model segments the first
validation case of the first clinic that has one, with the run's own model, HU window and
validation patch settings. The figure shows an axial and a coronal slice through the
centre of the labelled organs: the CT in grey, each organ's ground truth as a solid
contour and the prediction as a dashed one, in the organ set's colours.

Nothing here is required for a report: a run without models or whose data has moved gives
no figure (and a log line saying why).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedseg.analysis import plots, summary
from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")


def last_global_model(run_dir: Path) -> tuple[int, Path] | None:
    """(round, path) of the newest ``models/round-K.npz`` of a run, or None."""
    found = []
    for path in (Path(run_dir) / "models").glob("round-*.npz"):
        match = _ROUND_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def _first_val_case(info: dict[str, Any]) -> tuple[str, Any] | None:
    from fedseg_clinic.patches import load_cases

    for clinic, folder in (info.get("clinic_data") or {}).items():
        try:
            cases = load_cases(Path(folder), "val")
        except FedsegError as exc:
            logger.info("contours: %s: %s", clinic, exc)
            continue
        if cases:
            return clinic, cases[0]
    return None


def predict_val_case(run: summary.RunLog) -> dict[str, Any] | None:
    """Segment the run's first validation case with its last global model.

    Returns:
        None without models or data, else a dict with clinic, case, round, the CT (HU),
        ground-truth masks, predicted labels, the organ set and the spacing.
    """
    latest = last_global_model(run.run_dir)
    picked = None if latest is None else _first_val_case(run.info)
    if latest is None or picked is None:
        logger.info("contours: %s has no global model or no validation case", run.run_dir)
        return None
    from fedseg_clinic.model.inference import sliding_window_predict
    from fedseg_clinic.model.unet import UNetConfig, build_unet, check_patch_size
    from fedseg_clinic.model.weights import apply_weights, load_weights_npz
    from fedseg_clinic.patches import normalise_hu
    from fedseg_clinic.settings import TrainingSettings, ValidationSettings

    config = run.info.get("config") or {}
    clinic_section = config.get("clinic") or {}
    training = clinic_section.get("training") or {}
    validation = clinic_section.get("validation") or {}
    model_config = UNetConfig.from_dict(config.get("model") or {})
    patch = check_patch_size(model_config, validation.get(
        "patch_size", ValidationSettings().patch_size))
    window = tuple(training.get("hu_window", TrainingSettings().hu_window))
    model = build_unet(model_config, seed=0)
    apply_weights(model, load_weights_npz(latest[1]), str(latest[1]))
    clinic, case = picked
    probs = sliding_window_predict(
        model, normalise_hu(case.image, window), patch,
        overlap=float(validation.get("overlap", ValidationSettings().overlap)),
        batch_size=int(validation.get("batch_size", ValidationSettings().batch_size)))
    return {"clinic": clinic, "case_id": case.meta.case_id, "round": latest[0],
            "image": case.image, "masks": case.masks,
            "labels": np.argmax(probs, axis=-1).astype(np.uint8),
            "organs": model_config.organs, "spacing": tuple(case.meta.spacing)}


def plot_contours(run: summary.RunLog) -> Figure | None:
    """Axial and coronal slices with ground truth (solid) and prediction (dashed)."""
    try:
        data = predict_val_case(run)
    except (FedsegError, OSError, ValueError) as exc:
        logger.warning("contours of %s left out: %s", run.run_dir, exc)
        return None
    if data is None or not data["masks"]:
        return None
    organs = data["organs"]
    union = np.any(np.stack(list(data["masks"].values())), axis=0)
    zc, yc, _ = (round(float(c)) for c in np.argwhere(union).mean(axis=0))
    dz, dy, dx = data["spacing"]
    fig, (axial, coronal) = plots._new_figure(2)
    views = ((axial, lambda a: a[zc], dy / dx, f"axial, slice {zc}"),
             (coronal, lambda a: a[:, yc, :], dz / dx, f"coronal, row {yc}"))
    handles = []
    for ax, cut, aspect, title in views:
        ax.imshow(cut(data["image"]), cmap="gray", vmin=-400, vmax=400, aspect=aspect,
                  origin="lower" if ax is coronal else "upper", interpolation="nearest")
        for organ, mask in data["masks"].items():
            colour = np.asarray(organs.colours.get(organ, (255, 255, 0))) / 255.0
            truth = cut(mask)
            predicted = cut(data["labels"] == organs.class_index(organ))
            if truth.any():
                ax.contour(truth, levels=[0.5], colors=[colour], linewidths=1.2,
                           origin="lower" if ax is coronal else "upper")
            if predicted.any():
                ax.contour(predicted, levels=[0.5], colors=[colour], linewidths=1.2,
                           linestyles="dashed", origin="lower" if ax is coronal else "upper")
            if ax is axial:
                handles.append(Line2D([], [], color=colour, label=organ))
        ax.set_title(title, fontsize="small")
        ax.set_axis_off()
    handles += [Line2D([], [], color="k", label="ground truth"),
                Line2D([], [], color="k", linestyle="--", label="prediction")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    fig.suptitle(f"{run.name}: {data['clinic']} {data['case_id']}, global model of round "
                 f"{data['round']}", fontsize="medium")
    return fig


__all__ = ["last_global_model", "plot_contours", "predict_val_case"]
