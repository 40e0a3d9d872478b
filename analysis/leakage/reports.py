"""The report folders of ``fedseg attack invert|study`` and ``fedseg audit``.

The attacks return JSON-ready results (:mod:`fedseg.analysis.leakage.inversion`,
:mod:`fedseg.analysis.leakage.audit`); this module turns one result into its folder:
the JSON (the schema :func:`fedseg.analysis.leakage.results.load_leakage` reads back), PNG
figures and a small HTML page, each file written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.analysis.leakage import results as lr
from fedseg.analysis.report import ReportFiles

STUDY_TABLE_KEYS: tuple[str, ...] = (
    "batch_size", "local_steps", "noise_multiplier", "target_epsilon", "psnr", "ssim",
    "correlation", "mask_dice", "recognisable", "seconds")
STUDY_FACTORS: tuple[tuple[str, str], ...] = (
    ("batch_size", "batch size"), ("local_steps", "local steps"),
    ("noise_multiplier", "noise multiplier"))
EPSILON_PLOT_CAP: float = 50.0  # the audit figure caps an infinite/huge epsilon here


def format_row(row: Mapping[str, Any], digits: int = 3) -> str:
    """One table row as ``key=value`` pairs (floats to ``digits`` significant digits)."""
    return "  ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items())


def write_inversion(out: Path, result: Mapping[str, Any], images: np.ndarray,
                    labels: np.ndarray, true_images: np.ndarray | None = None,
                    true_labels: np.ndarray | None = None) -> ReportFiles:
    """results.json, montage.png and report.html of one inversion.

    Args:
        out: the folder (created).
        result: :func:`~fedseg.analysis.leakage.inversion.attack_simulated`'s or
            :func:`~fedseg.analysis.leakage.inversion.attack_stored`'s result.
        images: the reconstructed patches (b, z, y, x), matched to the truth if known.
        labels: the reconstructed label maps.
        true_images: the true patches, None when unknown (a stored round).
        true_labels: their label maps, or None.
    """
    data = lr.write_json(out / lr.INVERT_NAME, result)
    montage = lr.write_png(out / "montage.png",
                           lr.montage(true_images, images, true_labels, labels))
    rows = [{k: v for k, v in result.items() if isinstance(v, int | float | str)}]
    html = lr.write_html(
        out / "report.html", "Update inversion",
        "Geiping-style inversion of one client update (see docs/privacy-leakage.md).",
        {"result": rows}, [montage.name])
    return ReportFiles(html=html, summary=data, figures=(montage,))


def study_rows(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One table row per grid point: quality and the prior-only baseline beside it."""
    return [{k: r[k] for k in STUDY_TABLE_KEYS}
            | {"prior_correlation": r["baseline"]["correlation"],
               "prior_ssim": r["baseline"]["ssim"],
               "prior_mask_dice": r["baseline"]["mask_dice"]}
            for r in study["rows"]]


def _factor_points(rows: Sequence[Mapping[str, Any]], factor: str
                   ) -> list[Mapping[str, Any]]:
    """The grid points that vary ``factor`` alone (the others at batch 1, 1 step, no noise)."""
    centre = {"batch_size": 1, "local_steps": 1, "noise_multiplier": 0.0}
    points = [r for r in rows if all(r[f] == d for f, d in centre.items() if f != factor)]
    return sorted(points, key=lambda r: r[factor])


def write_study(out: Path, study: Mapping[str, Any]) -> ReportFiles:
    """study.json, one quality-vs-factor figure per factor and report.html.

    Args:
        out: the folder (created).
        study: :func:`~fedseg.analysis.leakage.inversion.run_study`'s result.
    """
    from fedseg.analysis.leakage.inversion import CORRELATION_MARGIN, MASK_MARGIN

    data = lr.write_json(out / lr.STUDY_NAME, study)
    mode = ("a new batch at every local step (as ClinicApp)" if study["fresh_batches"]
            else "the same batch at every local step (the attacker's best case)")
    figures = []
    for factor, label in STUDY_FACTORS:
        points = _factor_points(study["rows"], factor)
        xs = [r[factor] for r in points]
        series = {m: (xs, [r[m] for r in points])
                  for m in ("correlation", "ssim", "mask_dice")}
        series["correlation of the prior"] = (
            xs, [r["baseline"]["correlation"] for r in points])
        figures.append(lr.write_png(out / f"study_{factor}.png", lr.line_figure(
            f"quality vs {label}", label, series, "score")))
    html = lr.write_html(
        out / "report.html", "Inversion study",
        f"Client batches: {mode}. Smallest noise multiplier tried whose reconstruction is "
        f"not recognisable: {study['smallest_unrecognisable_sigma']}. Recognisable = "
        f"correlation >= prior + {CORRELATION_MARGIN} or mask Dice >= prior + "
        f"{MASK_MARGIN}.", {"grid": study_rows(study)}, [f.name for f in figures])
    return ReportFiles(html=html, summary=data, figures=tuple(figures))


def write_audit(out: Path, audit: Mapping[str, Any]) -> ReportFiles:
    """audit.json, audit.png (accountant vs empirical epsilon) and report.html.

    Args:
        out: the folder (created).
        audit: :func:`~fedseg.analysis.leakage.audit.run_audit`'s result.
    """
    rows = audit["rows"]
    data = lr.write_json(out / lr.AUDIT_NAME, audit)
    finite = [r for r in rows if isinstance(r["noise_multiplier"], float)]
    noises = [r["noise_multiplier"] for r in finite]
    series = {
        "accountant epsilon (upper)": (
            noises, [min(r["epsilon_accountant"], EPSILON_PLOT_CAP) for r in finite]),
        "empirical lower bound": (noises, [r["epsilon_lower_bound"] for r in finite]),
    }
    figure = lr.write_png(out / "audit.png", lr.line_figure(
        "epsilon: accountant vs one-run audit", "noise multiplier", series,
        f"epsilon (capped at {EPSILON_PLOT_CAP:g})"))
    canary = audit["runs"][0]["canary_audit"]["config"]  # the same for every noise
    html = lr.write_html(
        out / "report.html", "Privacy audit",
        f"One-run canary audit (Steinke et al. 2023) at confidence "
        f"{canary['confidence']} with {canary['n_canaries']} canaries, and "
        "membership inference (loss threshold, offline LiRA); accountant epsilon from "
        "accounting.compute_epsilon for the same schedule. inf = no DP.",
        {"configurations": rows}, [figure.name])
    return ReportFiles(html=html, summary=data, figures=(figure,))
