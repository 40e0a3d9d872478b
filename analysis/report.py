"""The analysis report: report.html (figures embedded), the PNGs beside it, summary.json.

:func:`write_report` reads and checks every run (and every attack or audit result given
with it) first, so bad input raises :class:`FedsegError` before anything is written; each
file is then written through a temporary name and ``os.replace``. The HTML needs nothing
else: the figures are base64 data URIs and the style is inline, so it can be mailed or
archived on its own.

Privacy sections: the results of ``fedseg attack study`` / ``fedseg attack invert`` and
``fedseg audit`` (read back by :func:`fedseg.analysis.leakage.results.load_leakage`) appear
after the runs: reconstruction quality vs batch size, local steps and noise with the
recognisability threshold; per audited configuration the accountant's epsilon beside the
empirical lower bound and the membership attacks' AUC and TPR at low FPR. Their PNG
figures are copied into the report folder (prefixed ``leak<i>_``) and embedded.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedseg.analysis import plots, summary
from fedseg.analysis.contours import plot_contours
from fedseg.analysis.leakage import results as leakage_report
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_bytes

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
    """Write one report file atomically, readable by all (a report is meant to be shared).

    Raises:
        FedsegError: the folder cannot be created or written.
    """
    try:
        atomic_write_bytes(path, data, mode=0o644)
    except OSError as exc:
        raise FedsegError(f"{path.parent}: cannot write the report ({exc.strerror})") from None


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
        contours = plot_contours(run) if run.kind == "federated" else None
        if contours is not None:
            per_run[-1].append(_render(
                f"{slug}_contours.png", "A validation case segmented by the last global "
                "model: ground truth solid, prediction dashed, per organ (axial and "
                "coronal through the organs' centre).", contours))
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


def _ci(stat: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    mean = f"{stat['mean'] / scale:.{digits}f}"
    return mean if stat["ci95"] is None else f"{mean} ± {stat['ci95'] / scale:.{digits}f}"


def _groups(data: dict[str, Any]) -> str:
    rows = [
        (g["label"], g["kind"], len(g["runs"]), f"{g['reached_target']}/{len(g['runs'])}",
         _ci(g["final_dice_mean"]), _ci(g["rounds_to_target"], 1),
         _ci(g["seconds_to_target"], 0), _ci(g["bytes_to_target"], 1, 1e6))
        for g in data["groups"]
    ]
    return _table(("setting", "kind", "seeds", "reached target", "final Dice",
                   "rounds to target", "seconds to target", "MB to target"), rows)


def _run_section(entry: dict[str, Any], info: dict[str, Any], figures: list[FigureFile]) -> str:
    parts = [f"<h2>{html.escape(entry['name'])} <span class='note'>({html.escape(entry['kind'])},"
             f" {html.escape(entry['run_dir'])})</span></h2>"]
    if entry.get("aggregation") == "secure":
        failed = (info.get("secure_aggregation") or {}).get("failed_rounds") or []
        parts.append("<p>Secure aggregation: the server saw only masked updates and their sum"
                     " (docs/secure-aggregation.md); FEDn round 1 exchanged keys only"
                     + (f"; rounds failed: {html.escape(', '.join(map(str, failed)))}"
                        if failed else "") + ".</p>")
    ddp = info.get("distributed_dp") or {}
    if ddp.get("clients"):
        lines = "".join(f"<li>{html.escape(name)}: {html.escape(str(c.get('trust', '')))}</li>"
                        for name, c in sorted(ddp["clients"].items()))
        parts.append("<p>Distributed DP (Skellam noise shared among the clinics under secure "
                     "aggregation, docs/secure-aggregation.md): each clinic's epsilon and the "
                     f"trust it rests on:</p><ul>{lines}</ul>")
    parts.append(f"<p>seed {html.escape(_fmt(entry['seed']))}; rounds "
                 f"{entry['first_round']}..{entry['last_round']}; final round "
                 f"{html.escape(_fmt(entry['final_round']))}; clients "
                 f"{html.escape(', '.join(entry['clients']) or '—')}; organ set "
                 f"{html.escape(entry.get('organ_set') or '—')}.</p>")
    clinic_training = ((info.get("config") or {}).get("clinic") or {}).get("training") or {}
    if clinic_training.get("local_norm"):
        parts.append("<p>Personalised normalisation (training.local_norm): each clinic is "
                     "validated with the global model and its own GroupNorm scale/offset, "
                     "not with the global model alone.</p>")
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


def leakage_figures(results: Sequence[leakage_report.LeakageResult]
                    ) -> list[list[FigureFile]]:
    """Each attack/audit result's PNGs, renamed ``leak<i>_<name>`` for the report folder."""
    captions = {"study": "Inversion study (fedseg attack study)",
                "invert": "Update inversion (fedseg attack invert)",
                "audit": "Privacy audit (fedseg audit)"}
    return [[FigureFile(f"leak{i}_{name}", f"{captions[result.kind]}: {name} from "
                        f"{result.source.parent}", png) for name, png in result.figures]
            for i, result in enumerate(results, start=1)]


def _pair(value: Any, prior: Any) -> str:
    return f"{_fmt(value)} ({_fmt(prior)})"


def _study_section(result: leakage_report.LeakageResult) -> str:
    data = result.data
    threshold = data["threshold"]
    rows = []
    for r in data["rows"]:
        b = r["baseline"]
        # Studies written before per-step batches lack the key: they used one batch.
        fresh = r.get("settings", {}).get("fresh_batches", data.get("fresh_batches", False))
        rows.append((r["batch_size"], r["local_steps"],
                     "new per step" if fresh else "same every step",
                     r["noise_multiplier"], r["target_epsilon"],
                     _pair(r["correlation"], b.get("correlation")),
                     _pair(r["ssim"], b["ssim"]), _pair(r["mask_dice"], b["mask_dice"]),
                     _pair(r["psnr"], b["psnr"]), "yes" if r["recognisable"] else "no"))
    sigma = data["smallest_unrecognisable_sigma"]
    sigmas = data.get("sigma_for_epsilon", {})
    calibrated = ", ".join(f"epsilon {k}: sigma {_fmt(v)}" for k, v in sigmas.items())
    if "correlation_margin" in threshold:
        rule = f"prior + {_fmt(threshold['correlation_margin'], 2)}"
    else:  # studies written before the threshold was relative to the prior
        rule = _fmt(threshold["correlation"], 2)
    return "\n".join([
        f"<p>Recognisable = correlation with the true CT patch &ge; "
        f"{html.escape(rule)} or mask Dice &ge; prior + "
        f"{html.escape(_fmt(threshold['mask_margin'], 2))}. Smallest noise multiplier tried "
        f"whose reconstruction is not recognisable: <b>{html.escape(_fmt(sigma))}</b>"
        + (f"; calibrated noise {html.escape(calibrated)}" if calibrated else "")
        + ". (prior) = the mean patch / most common labels of other patients.</p>",
        _table(("batch", "local steps", "batches", "noise multiplier", "target epsilon",
                "correlation (prior)", "SSIM (prior)", "mask Dice (prior)", "PSNR dB (prior)",
                "recognisable"), rows),
    ])


def _invert_section(result: leakage_report.LeakageResult) -> str:
    data = result.data
    settings = data["settings"]
    rows = [(key, value) for key, value in (
        ("batch size", settings.get("batch_size")),
        ("local steps", settings.get("local_steps")),
        ("patches reconstructed", data.get("n_patches")),
        ("noise multiplier", data.get("noise_multiplier")),
        ("correlation (prior)", _pair(data["correlation"],
                                      data["baseline"].get("correlation"))
         if "correlation" in data else None),
        ("SSIM (prior)", _pair(data["ssim"], data["baseline"]["ssim"]) if "ssim" in data
         else None),
        ("mask Dice (prior)", _pair(data["mask_dice"], data["baseline"]["mask_dice"])
         if "mask_dice" in data else None),
        ("recognisable", data.get("recognisable")),
        ("final objective", data["objective"]), ("attack seconds", data["seconds"]),
    ) if value is not None]
    note = data.get("note")
    return (_table(("quantity", "value"), rows)
            + (f"<p class='note'>{html.escape(str(note))}</p>" if note else ""))


def _audit_section(result: leakage_report.LeakageResult) -> str:
    rows = []
    violated = []
    for r in result.data["rows"]:
        confidence = r["confidence"]
        bound = f"{_fmt(r['epsilon_lower_bound'])} ({_fmt(100 * confidence, 0)} %)"
        member = [r.get(f"{attack}_{key}") for attack in leakage_report.MEMBERSHIP_ATTACKS
                  for key in leakage_report.MEMBERSHIP_KEYS]
        rows.append((r["noise_multiplier"], r["epsilon_accountant"], bound,
                     r["canary_correct"], r["canary_auc"], *member))
        accountant = r["epsilon_accountant"]
        if isinstance(accountant, int | float) and r["epsilon_lower_bound"] > accountant:
            violated.append(r["noise_multiplier"])
    parts = [
        "<p>Per configuration: the accountant's epsilon (an upper bound) beside the "
        "one-run canary audit's empirical lower bound (Steinke et al. 2023) at the "
        "stated confidence, and the membership attacks' AUC and TPR at 0.1 % / 1 % FPR "
        "(— = not run). inf = no DP.</p>",
        _table(("noise multiplier", "accountant epsilon", "empirical lower bound "
                "(confidence)", "canaries correct/guessed", "canary AUC",
                "loss-threshold AUC", "TPR @0.1 % FPR", "TPR @1 % FPR",
                "LiRA (offline) AUC", "TPR @0.1 % FPR", "TPR @1 % FPR"), rows),
    ]
    if violated:
        parts.append(f"<p><b>Warning:</b> the empirical lower bound exceeds the "
                     f"accountant's epsilon at noise {html.escape(str(violated))}: check "
                     "the DP code.</p>")
    return "\n".join(parts)


def _leakage_section(result: leakage_report.LeakageResult, figures: list[FigureFile]
                     ) -> str:
    titles = {"study": "Inversion study", "invert": "Update inversion",
              "audit": "Privacy audit"}
    render = {"study": _study_section, "invert": _invert_section, "audit": _audit_section}
    return "\n".join([
        f"<h2>{titles[result.kind]} <span class='note'>({html.escape(str(result.source))})"
        "</span></h2>", render[result.kind](result), *(_img(fig) for fig in figures)])


def render_html(
    data: dict[str, Any],
    runs: Sequence[summary.RunLog],
    comparison: Sequence[FigureFile],
    per_run: Sequence[Sequence[FigureFile]],
    leakage: Sequence[leakage_report.LeakageResult] = (),
    leakage_figs: Sequence[Sequence[FigureFile]] = (),
) -> str:
    """The self-contained report page (runs, then the attack and audit sections)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>fedseg round-log report</h1>",
        f"<p class='note'>Generated {now}. Target: {html.escape(data['target_source'])}. "
        "Dice = mean of val_dice_mean over the clients that reported it (unless stated "
        "n_val weighted); Dice AUC = mean client-mean Dice over rounds 1..R, gaps carried "
        "forward (docs/analysis.md).</p>",
        _overview(data),
    ]
    if data.get("groups"):
        body.append("<h2>Over seeds</h2><p class='note'>Runs with the same settings but for "
                    "the seed; mean ± 95% confidence half-width (Student t) over the seeds, "
                    "to-target columns over the seeds that reached the target.</p>")
        body.append(_groups(data))
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
    for result, figures in zip(leakage, leakage_figs, strict=True):
        body.append(_leakage_section(result, list(figures)))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<title>fedseg report</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")


def write_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    target_dice: float | None = None,
    target_fraction: float | None = None,
    attacks: Sequence[Path] = (),
    audits: Sequence[Path] = (),
) -> ReportFiles:
    """Read run folders and write report.html, the figures and summary.json to out_dir.

    Args:
        run_dirs: one or more run folders (rounds.csv + run.json).
        out_dir: the report folder (created if needed; files in it are replaced).
        target_dice: absolute Dice target for rounds/seconds to target.
        target_fraction: target as a fraction of the pooled run's final Dice.
        attacks: results of ``fedseg attack study`` or ``invert`` (their JSON or --out
            folder), shown as sections after the runs.
        audits: results of ``fedseg audit`` (audit.json or its folder).

    Returns:
        The paths written.

    Raises:
        FedsegError: no runs, a bad run folder or log, a bad target, or a missing or
            malformed attack/audit JSON (nothing written).
    """
    if not run_dirs:
        raise FedsegError("no run folders given")
    runs = [summary.load_run(Path(d)) for d in run_dirs]
    leakage = ([leakage_report.load_leakage(Path(p), "attack") for p in attacks]
               + [leakage_report.load_leakage(Path(p), "audit") for p in audits])
    data = summary.summarize_runs(runs, target_dice, target_fraction)
    comparison, per_run = render_figures(runs, data["target_dice"])
    leakage_figs = leakage_figures(leakage)
    page = render_html(data, runs, comparison, per_run, leakage, leakage_figs)
    out_dir = Path(out_dir)
    figure_paths = []
    for fig in [*comparison, *(f for figs in [*per_run, *leakage_figs] for f in figs)]:
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
