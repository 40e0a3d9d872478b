"""``fedseg sweep SWEEP.yaml``: a grid of experiments (and baselines), resumable."""

from __future__ import annotations

from pathlib import Path

import click

from fedseg.commands.common import default_runs_dir, quiet_fedn, sigterm_as_interrupt


@click.command("sweep")
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent of the sweep folder <name>/ (default: ./runs, printed).")
@click.option("--dry-run", is_flag=True,
              help="Plan only: data, noise calibration and sweep.json; run nothing.")
@click.option("--network", "network_root", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Run the federated points on the network already up in "
                                 "this folder (fedseg network up) instead of one per run.")
def sweep(sweep_file: Path, runs_dir: Path | None, dry_run: bool,
          network_root: Path | None) -> None:
    """Run every point of SWEEP (YAML: base experiment + grid) one after another.

    Each run gets RUNS_DIR/<sweep>/<point>/; sweep.json indexes them. Runs that
    finished before are skipped, so running the same command again resumes.
    """
    from fedseg.orchestration.sweep import load_sweep, run_sweep

    spec = load_sweep(sweep_file)
    runs = (runs_dir or default_runs_dir()).resolve()
    if not dry_run:
        quiet_fedn()
        sigterm_as_interrupt()
    try:
        result = run_sweep(spec, runs, progress=click.echo, dry_run=dry_run,
                           network_root=network_root.resolve() if network_root else None)
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to resume ({runs / spec.name})",
                   err=True)
        raise SystemExit(130) from None
    done = [n for n, s in result.statuses.items() if s in ("finished", "skipped")]
    click.echo(f"sweep {spec.name}: {len(done)}/{len(result.statuses)} runs finished; "
               f"index {result.sweep_dir / 'sweep.json'}")
    for name in result.failed:
        click.echo(f"  {name}: {result.statuses[name]}")
    if done:
        folders = " ".join(str(result.sweep_dir / n) for n in done)
        click.echo(f"report: fedseg analyze {folders} --out {result.sweep_dir / 'report'}")
    if result.failed and not dry_run:
        raise SystemExit(1)


COMMANDS = [sweep]
