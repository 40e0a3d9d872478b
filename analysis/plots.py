"""Figures of round logs (matplotlib object API, Agg canvas; nothing is shown).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so no
global backend or figure registry is touched; :func:`png_bytes` renders one to PNG.
Rounds without a value are NaN and break the line (a gap), and every point has a
marker, so a value between two gaps is still visible.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedseg.analysis import summary
from fedseg.orchestration.runlog import GLOBAL

WIDTH = 11.0
HEIGHT = 4.0
DPI = 100
_COLORS = [f"C{i}" for i in range(10)]


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes with the Agg canvas."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _new_figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH, HEIGHT), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


# Clients often log identical values (same DP schedule -> same epsilon): line style and
# marker vary with the colour so a line hidden under another still shows.
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D")


def _client_style(run: summary.RunLog, client: str) -> dict[str, object]:
    names = list(run.clients)
    i = names.index(client) if client in names else 0
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this log", ha="center", va="center",
            transform=ax.transAxes, color="0.4")


def _finish(ax: Axes, title: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")


def _integer_rounds(ax: Axes, rounds: Sequence[int]) -> None:
    if len(rounds) <= 20:
        ax.set_xticks(list(rounds))


def _plot_clients(ax: Axes, run: summary.RunLog, metric: str) -> bool:
    drawn = False
    for client in run.clients:
        series = summary.metric_series(run, client, metric)
        if np.isfinite(series).any():
            ax.plot(run.rounds, series, markersize=4, linewidth=1.2, label=client,
                    fillstyle="none", **_client_style(run, client))
            drawn = True
    return drawn


def plot_dice(run: summary.RunLog, target: float | None = None) -> Figure:
    """Dice vs round: client mean and each client (left), each organ (right)."""
    fig, (ax_clients, ax_organs) = _new_figure(2)
    rounds = run.rounds
    drawn = run.dice_clients != (GLOBAL,) and _plot_clients(ax_clients, run, summary.DICE_MEAN)
    mean = summary.dice_curve(run)
    if np.isfinite(mean).any():
        ax_clients.plot(rounds, mean, marker="o", markersize=4, linewidth=2.5, color="k",
                        label="client mean")
        weighted = summary.dice_curve(run, weighted=True)
        if np.isfinite(weighted).any() and not np.allclose(weighted, mean, equal_nan=True):
            ax_clients.plot(rounds, weighted, linestyle="--", marker="x", markersize=4,
                            linewidth=1.5, color="0.3", label="mean weighted by n_val")
        drawn = True
    if target is not None:
        ax_clients.axhline(target, color="tab:red", linestyle=":", label=f"target {target:.3f}")
    if not drawn:
        _no_data(ax_clients, "val_dice_mean")
    _finish(ax_clients, f"{run.name}: Dice (val_dice_mean)", "Dice")
    organs = summary.organ_names(run)
    for i, organ in enumerate(organs):
        series = summary.client_mean_curve(run, summary.DICE_PREFIX + organ)
        label = organ if np.isfinite(series).any() else f"{organ} (no client labels it)"
        ax_organs.plot(rounds, series, marker="o", markersize=3, color=_COLORS[i % 10],
                       label=label)
    if not organs:
        _no_data(ax_organs, "per-organ Dice")
    _finish(ax_organs, "Dice per organ (mean over clients that label it)", "Dice")
    for ax in (ax_clients, ax_organs):
        ax.set_ylim(-0.02, 1.02)
        _integer_rounds(ax, rounds)
    return fig


def plot_losses(run: summary.RunLog) -> Figure:
    """Training loss (left) and validation loss (right) of each client vs round."""
    fig, axes = _new_figure(2)
    for ax, metric, title in ((axes[0], "train_loss", "training loss"),
                              (axes[1], "val_loss", "validation loss")):
        if not _plot_clients(ax, run, metric):
            _no_data(ax, metric)
        _finish(ax, f"{run.name}: {title}", metric)
        _integer_rounds(ax, run.rounds)
    return fig


def plot_epsilon(run: summary.RunLog) -> Figure:
    """Cumulative epsilon spent by each client vs round."""
    fig, (ax,) = _new_figure(1)
    if not _plot_clients(ax, run, "epsilon"):
        _no_data(ax, "epsilon (no DP?)")
    _finish(ax, f"{run.name}: privacy spent", "epsilon")
    _integer_rounds(ax, run.rounds)
    return fig


# fedn's combiner times (collect.py): exec training spans the whole training phase at the
# combiner, client training and the combination (aggregation) included.
EXEC_TRAINING = "round_exec_training_seconds"
COMBINATION = "round_combination_seconds"


def round_time_parts(run: summary.RunLog) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Split each round's time into parts that do not overlap (stacked, they add up).

    Clients work in parallel and the round waits for the slowest one, so training and
    validation are the maximum over clients of ``train_seconds`` and
    ``validate_seconds`` (or ``val_seconds``). fedn's combiner reports its whole training
    phase (``round_exec_training_seconds``), which contains the client training and the
    aggregation (``round_combination_seconds``): only what is left of it after those two
    is drawn ("combiner other"). Every other global ``*_seconds`` metric but
    ``round_seconds`` is a part of its own. "waiting/overhead" is ``round_seconds`` minus
    the parts, at least 0.

    Args:
        run: the loaded run.

    Returns:
        (parts: label -> seconds per round (NaN = unknown), round_seconds per round).
    """
    parts: dict[str, np.ndarray] = {}
    for label, metrics in (("training", ("train_seconds",)),
                           ("validation", ("validate_seconds", "val_seconds"))):
        for metric in metrics:
            matrix = summary.client_matrix(run, metric)
            if matrix.size and np.isfinite(matrix).any():
                finite = np.where(np.isfinite(matrix), matrix, -np.inf).max(axis=1)
                parts[label] = np.where(np.isfinite(finite), finite, math.nan)
                break
    global_metrics = sorted({
        metric for (_rnd, client), metrics in run.table.items() if client == GLOBAL
        for metric in metrics if metric.endswith("_seconds") and metric != "round_seconds"
    })
    for metric in global_metrics:
        if metric == EXEC_TRAINING:
            continue
        label = "aggregation" if metric == COMBINATION else \
            metric.removesuffix("_seconds").replace("_", " ")
        parts[label] = summary.metric_series(run, GLOBAL, metric)
    if EXEC_TRAINING in global_metrics:
        exec_s = summary.metric_series(run, GLOBAL, EXEC_TRAINING)
        inside = np.zeros(len(run.rounds))
        for label in ("training", "aggregation"):
            if label in parts:
                inside += np.nan_to_num(parts[label], nan=0.0)
        parts["combiner other"] = np.where(np.isfinite(exec_s),
                                           np.maximum(exec_s - inside, 0.0), math.nan)
    total = summary.metric_series(run, GLOBAL, "round_seconds")
    if np.isfinite(total).any():
        known = np.zeros(len(run.rounds))
        for series in parts.values():
            known += np.nan_to_num(series, nan=0.0)
        parts["waiting/overhead"] = np.where(np.isfinite(total),
                                             np.maximum(total - known, 0.0), math.nan)
    return parts, total


def plot_round_time(run: summary.RunLog) -> Figure:
    """Stacked bars: where each round's wall time went."""
    fig, (ax,) = _new_figure(1)
    parts, total = round_time_parts(run)
    bottom = np.zeros(len(run.rounds))
    for i, (label, series) in enumerate(parts.items()):
        heights = np.nan_to_num(series, nan=0.0)
        ax.bar(run.rounds, heights, bottom=bottom, color=_COLORS[i % 10], label=label)
        bottom += heights
    if np.isfinite(total).any():
        ax.plot(run.rounds, total, linestyle="none", marker="_", markersize=14, color="k",
                label="round_seconds")
    if not parts:
        _no_data(ax, "timing metrics")
    _finish(ax, f"{run.name}: time per round (training/validation = slowest client)",
            "seconds", legend=False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _integer_rounds(ax, run.rounds)
    return fig


def _baseline_label(run: summary.RunLog, value: float) -> str:
    return f"{run.name} ({run.kind}) {value:.3f}"


def plot_compare(runs: Sequence[summary.RunLog], target: float | None = None) -> Figure:
    """Client-mean Dice vs round of several runs; pooled/local runs as horizontal lines."""
    fig, (ax_dice, ax_time) = _new_figure(2)
    drawn = False
    for i, run in enumerate(runs):
        color = _COLORS[i % 10]
        dice = summary.dice_curve(run)
        if not np.isfinite(dice).any():
            continue
        drawn = True
        if run.kind == "federated":
            ax_dice.plot(run.rounds, dice, marker="o", markersize=3, color=color,
                         label=run.name)
            seconds = np.nancumsum(summary.metric_series(run, GLOBAL, "round_seconds"))
            if np.any(seconds > 0):
                ax_time.plot(seconds, dice, marker="o", markersize=3, color=color,
                             label=run.name)
        else:
            final = dice[summary.last_finite_index(dice)]
            for ax in (ax_dice, ax_time):
                ax.axhline(final, color=color, linestyle="--",
                           label=_baseline_label(run, final))
    if target is not None:
        for ax in (ax_dice, ax_time):
            ax.axhline(target, color="tab:red", linestyle=":", label=f"target {target:.3f}")
    if not drawn:
        _no_data(ax_dice, "val_dice_mean")
    _finish(ax_dice, "client-mean Dice per run", "Dice")
    _finish(ax_time, "client-mean Dice vs wall time", "Dice")
    ax_time.set_xlabel("seconds (cumulative round_seconds)")
    return fig


def plot_privacy_utility(runs: Sequence[summary.RunLog]) -> Figure:
    """Final client-mean Dice vs epsilon, one line per technique, error bars over seeds.

    Lines and points come from :func:`fedseg.analysis.summary.privacy_utility` (a run's
    epsilon: config ``target_epsilon``, else its largest final client epsilon). Each
    point is the mean over the seeds at that epsilon with a bar of +- one standard
    deviation (none for a single seed; the seed count is written beside the point).
    Runs without DP sit at an extra "no DP" position right of the largest epsilon; a
    technique measured only without DP (or a local-only or pooled baseline measured at
    one setting) is drawn as a dashed horizontal line at its mean.
    """
    fig, (ax,) = _new_figure(1)
    entries = [summary.summarize_run(run) for run in runs]
    lines = summary.privacy_utility(runs, entries)
    finite = sorted({p["epsilon"] for line in lines for p in line["points"]
                     if p["epsilon"] is not None})
    log_x = bool(finite) and finite[0] > 0 and (len(finite) > 1 and finite[-1] / finite[0] >= 4)
    x_inf = (finite[-1] * (2.0 if log_x else 1.25) if finite else 1.0)
    drawn = False
    for i, line in enumerate(lines):
        color = _COLORS[i % 10]
        pts = line["points"]
        means = [p["dice_mean"]["mean"] for p in pts]
        if len(pts) == 1 and (pts[0]["epsilon"] is None or not finite):
            n = pts[0]["dice_mean"]["n"]
            ax.axhline(means[0], color=color, linestyle="--",
                       label=f"{line['label']} {means[0]:.3f} (n={n}, no DP)"
                       if pts[0]["epsilon"] is None else f"{line['label']} {means[0]:.3f}")
            drawn = True
            continue
        xs = [x_inf if p["epsilon"] is None else p["epsilon"] for p in pts]
        errs = [p["dice_mean"]["std"] or 0.0 for p in pts]
        ax.errorbar(xs, means, yerr=errs, marker="o", markersize=4, capsize=3, color=color,
                    label=line["label"])
        for x, y, p in zip(xs, means, pts, strict=True):
            ax.annotate(f"n={p['dice_mean']['n']}", (x, y), textcoords="offset points",
                        xytext=(4, -10), fontsize="x-small", color=color)
        drawn = True
    if not drawn:
        _no_data(ax, "run with a Dice")
    if log_x:
        ax.set_xscale("log")
    ticks = finite + ([x_inf] if any(p["epsilon"] is None for line in lines
                                     for p in line["points"]) and finite else [])
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in finite] + (["no DP"] if len(ticks) > len(finite)
                                                         else []))
        ax.minorticks_off()
    ax.set_title("privacy-utility: final client-mean Dice vs epsilon per clinic "
                 "(mean +- sd over seeds)")
    ax.set_xlabel("epsilon")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    return fig
