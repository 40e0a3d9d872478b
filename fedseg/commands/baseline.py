"""``fedseg baseline pooled|local EXPERIMENT.yaml``: training without federation."""

from __future__ import annotations

from pathlib import Path

import click

from fedseg.commands.common import default_runs_dir, sigterm_as_interrupt


@click.command("baseline")
@click.argument("kind", type=click.Choice(["pooled", "local"]))
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent of the run folder <name>-<kind> (default: ./runs, printed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder of that name.")
def baseline(kind: str, experiment: Path, runs_dir: Path | None, overwrite: bool) -> None:
    """Train the pooled (all clinics' data in one place) or local-only baseline.

    Same model, clinic settings, seed model and per-round settings as EXPERIMENT; each
    block is validated on every clinic's own validation set. Results in
    RUNS_DIR/<name>-<kind>/ (rounds.csv, run.json, models/), ready for `fedseg analyze`.
    """
    from fedseg.orchestration.baselines import baseline_name, run_baseline
    from fedseg.orchestration.experiment import load_experiment

    exp = load_experiment(experiment)
    runs = (runs_dir or default_runs_dir()).resolve()
    sigterm_as_interrupt()
    try:
        result = run_baseline(exp, kind, runs, progress=click.echo, overwrite=overwrite)
    except KeyboardInterrupt:
        click.echo(f"interrupted; round log so far in {runs / baseline_name(exp, kind)}",
                   err=True)
        raise SystemExit(130) from None
    click.echo(f"{result.status}: {result.rounds_done} blocks logged in {result.run_dir}")
    click.echo(f"  round log  {result.run_dir / 'rounds.csv'}")
    click.echo(f"  run info   {result.run_dir / 'run.json'}")
    for failure in result.failures:
        click.echo(f"  block {failure['round']}: {failure['client']} {failure['task']} "
                   f"failed: {failure['error']}")


COMMANDS = [baseline]
