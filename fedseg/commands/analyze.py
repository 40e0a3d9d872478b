"""``fedseg analyze RUN_DIR... --out REPORT_DIR``: report, figures and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: report.html, the PNG figures and summary.json go here.")
@click.option("--target-dice", type=float, default=None,
              help="Dice target for rounds/seconds to target (0..1).")
@click.option("--target-fraction", type=float, default=None,
              help="Target = this fraction of the final Dice of the pooled run among the "
                   "inputs.")
@click.option("--attack", "attacks", multiple=True, type=click.Path(path_type=Path),
              help="Result of `fedseg attack study|invert` (study.json / results.json or "
                   "its --out folder), shown as a section; repeatable.")
@click.option("--audit", "audits", multiple=True, type=click.Path(path_type=Path),
              help="Result of `fedseg audit` (audit.json or its --out folder), shown as a "
                   "section; repeatable.")
def analyze(run_dirs: tuple[Path, ...], out_dir: Path, target_dice: float | None,
            target_fraction: float | None, attacks: tuple[Path, ...],
            audits: tuple[Path, ...]) -> None:
    """Summarise and plot the round logs of RUN_DIRS (runs/<name> folders)."""
    # Imported here so `fedseg --help` does not pay for matplotlib.
    from fedseg.analysis.report import write_report

    files = write_report(list(run_dirs), out_dir, target_dice, target_fraction,
                         attacks=list(attacks), audits=list(audits))
    data = json.loads(files.summary.read_text())
    click.echo(f"target: {data['target_source']}")
    click.echo(f"{'run':<24} {'kind':<10} {'rounds':>6} {'final':>7} {'best':>7} "
               f"{'auc':>7} {'to target':>9}")
    for entry in data["runs"]:
        click.echo(f"{entry['name'][:24]:<24} {entry['kind']:<10} {entry['last_round']:>6} "
                   f"{_fmt(entry['final_dice_mean']):>7} {_fmt(entry['best_dice_mean']):>7} "
                   f"{_fmt(entry['dice_auc']):>7} {_fmt(entry['rounds_to_target']):>9}")
    for group in data["groups"]:
        stats = {key: group[key] for key in ("final_dice_mean", "rounds_to_target")}
        text = ", ".join(
            f"{key.replace('_', ' ')} {_fmt(s['mean'])}"
            + ("" if s["ci95"] is None else f" ± {_fmt(s['ci95'])}")
            for key, s in stats.items())
        click.echo(f"over seeds {group['label']} ({len(group['runs'])} runs, "
                   f"{group['reached_target']} reached the target): {text}")
    if attacks or audits:
        click.echo(f"privacy sections: {len(attacks)} attack, {len(audits)} audit")
    click.echo(f"wrote {files.html}, {files.summary} and {len(files.figures)} figures")


COMMANDS: list[click.Command] = [analyze]
