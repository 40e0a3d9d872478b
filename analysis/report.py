"""The analysis report: report.html (figures embedded), the PNGs beside it, summary.json.

:func:`write_report` reads and checks every run first, so bad input raises
:class:`FedsegError` before anything is written; each file is then written through a
temporary name and ``os.replace``. The HTML needs nothing else: the figures are
base64 data URIs and the style is inline, so it can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedseg.analysis import plots, summary
from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
td { white-space: nowrap; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .5em 0 1.5em; }
.note { color: #555; font-size: .9em; } pre { background: #f7f7f7; padding: .6em; }
"""


@dataclasses.dataclass(frozen=True)
class FigureFile:
    """One rendered figure: its file name in the report folder, caption and PNG bytes."""

    filename: str
    caption: str
    png: bytes


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    html: Path
    summary: Path
    figures: tuple[Path, ...]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes through a temporary sibling and ``os.replace``.

    Raises:
        FedsegError: the folder cannot be created or written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise FedsegError(f"{path.parent}: cannot write the report ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_slugs(runs: Sequence[summary.RunLog]) -> list[str]:
    """File-name-safe, unique prefixes for the runs' figures (name, then _2, _3 ...)."""
    slugs: list[str] = []
    for run in runs:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", run.name).strip("._") or "run"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}_{n}", n + 1
        slugs.append(slug)
    return slugs


def _render(filename: str, caption: str, fig: Figure) -> FigureFile:
    return FigureFile(filename, caption, plots.png_bytes(fig))


def render_figures(
    runs: Sequence[summary.RunLog], target: float | None
) -> tuple[list[FigureFile], list[list[FigureFile]]]:
    """Render the comparison figures and each run's figures.

    Returns:
        (comparison figures, one list of figures per run).
    """
    comparison: list[FigureFile] = []
    if len(runs) >= 2:
        comparison.append(_render("compare_dice.png", "Client-mean Dice of every run; "
                                  "pooled and local baselines as dashed lines.",
                                  plots.plot_compare(runs, target)))
        if any(summary.run_epsilon(run) is not None for run in runs):
            comparison.append(_render("privacy_utility.png", "Final client-mean Dice vs "
                                      "epsilon; runs without DP and pooled runs as dashed "
                                      "lines.", plots.plot_privacy_utility(runs)))
    per_run: list[list[FigureFile]] = []
    for run, slug in zip(runs, run_slugs(runs), strict=True):
        per_run.append([
            _render(f"{slug}_dice.png", "Dice per round: each client, the client mean "
                    "(bold) and each organ. Gaps are rounds without a value.",
                    plots.plot_dice(run, target)),
            _render(f"{slug}_losses.png", "Training and validation loss per client.",
                    plots.plot_losses(run)),
            _render(f"{slug}_epsilon.png", "Epsilon spent per client.",
                    plots.plot_epsilon(run)),
            _render(f"{slug}_round_time.png", "Where each round's time went.",
                    plots.plot_round_time(run)),
        ])
    return comparison, per_run


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(fig: FigureFile) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    caption = html.escape(fig.caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f'<figcaption class="note">{caption} ({html.escape(fig.filename)})'
            f"</figcaption></figure>")


def _max_epsilon(entry: dict[str, Any]) -> float | None:
    values = [v for v in entry["final_epsilon"].values() if v is not None]
    return max(values) if values else None


def _overview(data: dict[str, Any]) -> str:
    rows = [
        (e["name"], e["kind"], len(e["clients"]), e["last_round"], e["final_dice_mean"],
         e["final_dice_mean_weighted"],
         None if e["best_dice_mean"] is None else f"{e['best_dice_mean']:.3f} "
         f"(r{e['best_round']})",
         e["dice_auc"], e["rounds_to_target"], _fmt(e["seconds_to_target"], 1),
         _max_epsilon(e), _fmt(e["train_seconds_total"], 1))
        for e in data["runs"]
    ]
    return _table(("run", "kind", "clients", "rounds", "final Dice", "final Dice (n_val "
                   "weighted)", "best Dice", "Dice AUC", "rounds to target",
                   "seconds to target", "max final eps", "train s (all clients)"), rows)


def _run_section(entry: dict[str, Any], info: dict[str, Any], figures: list[FigureFile]) -> str:
    parts = [f"<h2>{html.escape(entry['name'])} <span class='note'>({html.escape(entry['kind'])},"
             f" {html.escape(entry['run_dir'])})</span></h2>"]
    parts.append(f"<p>seed {html.escape(_fmt(entry['seed']))}; rounds "
                 f"{entry['first_round']}..{entry['last_round']}; final round "
                 f"{html.escape(_fmt(entry['final_round']))}; clients "
                 f"{html.escape(', '.join(entry['clients']) or '—')}.</p>")
    if entry["organs"]:
        parts.append(_table(
            ("organ", "final Dice", "best Dice", "best round", "final HD95 (mm)",
             "labelled by"),
            [(organ, o["final_dice"], o["best_dice"], o["best_round"], o["final_hd95_mm"],
              ", ".join(o["labelled_by"]) or "nobody") for organ, o in entry["organs"].items()],
        ))
    if entry["final_epsilon"]:
        parts.append(_table(("client", "final epsilon"), list(entry["final_epsilon"].items())))
    if entry["missing_clients"]:
        gaps = "; ".join(f"round {rnd}: {', '.join(names)}"
                         for rnd, names in entry["missing_clients"].items())
        parts.append(f"<p class='note'>Clients without any record: {html.escape(gaps)}.</p>")
    parts.extend(_img(fig) for fig in figures)
    details = {key: info[key] for key in ("config", "versions", "timings") if key in info}
    if details:
        text = json.dumps(details, indent=2, sort_keys=True, default=str)
        parts.append(f"<details><summary>run.json (config, versions, timings)</summary>"
                     f"<pre>{html.escape(text)}</pre></details>")
    return "\n".join(parts)


def render_html(
    data: dict[str, Any],
    runs: Sequence[summary.RunLog],
    comparison: Sequence[FigureFile],
    per_run: Sequence[Sequence[FigureFile]],
) -> str:
    """The self-contained report page."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>fedseg round-log report</h1>",
        f"<p class='note'>Generated {now}. Target: {html.escape(data['target_source'])}. "
        "Dice = mean of val_dice_mean over the clients that reported it (unless stated "
        "n_val weighted); Dice AUC = mean client-mean Dice over rounds 1..R, gaps carried "
        "forward (docs/analysis.md).</p>",
        _overview(data),
    ]
    if comparison:
        body.append("<h2>Comparison</h2>")
        body.extend(_img(fig) for fig in comparison)
        if any(e["epsilon"] is not None for e in data["runs"]):
            body.append(_table(("run", "kind", "epsilon (config target, else max final)",
                                "final Dice"),
                               [(e["name"], e["kind"], e["epsilon"], e["final_dice_mean"])
                                for e in data["runs"]]))
    for entry, run, figures in zip(data["runs"], runs, per_run, strict=True):
        body.append(_run_section(entry, run.info, list(figures)))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<title>fedseg report</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")


def write_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    target_dice: float | None = None,
    target_fraction: float | None = None,
) -> ReportFiles:
    """Read run folders and write report.html, the figures and summary.json to out_dir.

    Args:
        run_dirs: one or more run folders (rounds.csv + run.json).
        out_dir: the report folder (created if needed; files in it are replaced).
        target_dice: absolute Dice target for rounds/seconds to target.
        target_fraction: target as a fraction of the pooled run's final Dice.

    Returns:
        The paths written.

    Raises:
        FedsegError: no runs, a bad run folder or log, or a bad target (nothing written).
    """
    if not run_dirs:
        raise FedsegError("no run folders given")
    runs = [summary.load_run(Path(d)) for d in run_dirs]
    data = summary.summarize_runs(runs, target_dice, target_fraction)
    comparison, per_run = render_figures(runs, data["target_dice"])
    page = render_html(data, runs, comparison, per_run)
    out_dir = Path(out_dir)
    figure_paths = []
    for fig in [*comparison, *(f for figs in per_run for f in figs)]:
        path = out_dir / fig.filename
        _atomic_write_bytes(path, fig.png)
        figure_paths.append(path)
    summary_path = out_dir / SUMMARY_NAME
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(summary_path, text.encode())
    html_path = out_dir / REPORT_NAME
    _atomic_write_bytes(html_path, page.encode())
    logger.info("wrote %s, %s and %d figures", html_path, summary_path, len(figure_paths))
    return ReportFiles(html_path, summary_path, tuple(figure_paths))
