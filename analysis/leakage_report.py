"""Small writers for attack and audit results: JSON, PNG figures, one HTML page.

Figures use the matplotlib object API on an Agg canvas (:func:`fedseg.analysis.plots.
png_bytes`); nothing is shown. Every file is written atomically (temporary sibling +
os.replace), so an interrupted command never leaves half a report.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from fedseg.analysis.plots import png_bytes

# Background black, then one colour per organ (body, lungs, heart, cord, esophagus).
LABEL_COLORS = ListedColormap(["black", "0.55", "tab:blue", "tab:cyan", "tab:red",
                               "yellow", "tab:orange"])


def write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes atomically; create the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
