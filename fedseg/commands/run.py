"""``fedseg run``, ``fedseg clients up|down|status`` and ``fedseg demo``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError


def _default_runs_dir() -> Path:
    # The one place a default follows the shell's folder; it is printed before use.
    return Path(os.getcwd()) / "runs"


def _echo_progress(line: str) -> None:
    click.echo(line)


def _sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so `kill` also stops the clients and network we started."""
    import signal

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _quiet_fedn() -> None:
    """Keep only warnings of fedn (it logs DEBUG to stdout by itself) unless -v was given."""
    import logging

    import fedn.common.log_config  # noqa: F401 - it configures the "fedn" logger on import

    if logging.getLogger().level >= logging.WARNING:
        logging.getLogger("fedn").setLevel(logging.WARNING)


@click.command("run")
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent of the run folder (default: ./runs, printed).")
@click.option("--network", "network_root", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Use the network already up in this folder.")
@click.option("--overwrite", is_flag=True, help="Reuse an existing run folder of that name.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Continue this crashed or killed run (instead of EXPERIMENT).")
def run(experiment: Path | None, runs_dir: Path | None, network_root: Path | None,
        overwrite: bool, resume_dir: Path | None) -> None:
    """Run EXPERIMENT (YAML) end to end; results in RUNS_DIR/<name>/.

    With --resume RUN_DIR: stop what the interrupted run left running (by recorded pid)
    and run its remaining rounds from its last committed global model, same ledgers.
    """
    from fedseg.orchestration.budget import EXIT_BUDGET, BudgetRefusedError
    from fedseg.orchestration.experiment import load_experiment
    from fedseg.orchestration.runner import resume_run, run_experiment

    if (experiment is None) == (resume_dir is None):
        raise FedsegError("give EXPERIMENT or --resume RUN_DIR (exactly one)")
    if resume_dir is not None and (overwrite or network_root or runs_dir):
        raise FedsegError("--resume takes no --overwrite, --network or --runs-dir "
                          "(the run folder's run.json has them)")
    exp = load_experiment(experiment) if experiment is not None else None
    _quiet_fedn()
    _sigterm_as_interrupt()
    runs = (runs_dir or _default_runs_dir()).resolve()
    where = resume_dir.resolve() if resume_dir is not None else runs / exp.name
    try:
        if resume_dir is not None:
            result = resume_run(resume_dir.resolve(), progress=_echo_progress)
        else:
            result = run_experiment(
                exp, runs, progress=_echo_progress,
                network_root=network_root.resolve() if network_root else None,
                overwrite=overwrite)
    except BudgetRefusedError as exc:
        click.echo(f"fedseg: refused: {exc}", err=True)
        raise SystemExit(EXIT_BUDGET) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted; round log so far in {where} (fedseg run --resume {where})",
                   err=True)
        raise SystemExit(130) from None
    raise SystemExit(_report(result))


def _report(result: object) -> int:
    """Print the outcome; return the exit code (docs/experiments.md, "Exit codes")."""
    from fedseg.orchestration.runner import RunResult

    assert isinstance(result, RunResult)
    click.echo(f"{result.status}: {result.rounds_done} rounds logged in {result.run_dir}")
    click.echo(f"  round log  {result.run_dir / 'rounds.csv'}")
    click.echo(f"  run info   {result.run_dir / 'run.json'}")
    click.echo(f"  models     {result.run_dir / 'models'}")
    for failure in result.failures:
        click.echo(f"  round {failure['round']}: {failure['client']} {failure['task']} "
                   f"failed: {failure['error']}")
    return exit_code(result)


def exit_code(result: object) -> int:
    """0 finished, 3 limited by privacy budgets, 1 anything else (failed, no model)."""
    from fedseg.orchestration.budget import EXIT_BUDGET
    from fedseg.orchestration.runner import BUDGET_LIMITED, RunResult

    assert isinstance(result, RunResult)
    if result.status == "finished":
        return 0
    if result.status == BUDGET_LIMITED:
        return EXIT_BUDGET
    return 1


@click.group()
def clients() -> None:
    """Attach clinic clients to a running network (one process per clinic)."""


@clients.command("up")
@click.option("--network", "network_root", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Network folder.")
@click.option("--clinic", "clinic_items", multiple=True, required=True, metavar="NAME=DIR",
              help="A clinic and its cases folder (repeat).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for clients/<name>/ (default: the network folder).")
@click.option("--route", type=click.Choice(["callback", "package"]), default="callback",
              show_default=True)
@click.option("--app", default="fedseg_clinic.app:ClinicApp.from_environment",
              show_default=True, help="MODULE:FACTORY of the clinic app (callback route).")
@click.option("--settings", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Clinic settings YAML for every client (FEDSEG_SETTINGS).")
@click.option("--timeout", type=float, default=180.0, show_default=True,
              help="Seconds to wait for every client to connect.")
def clients_up(network_root: Path, clinic_items: tuple[str, ...], root: Path | None,
               route: str, app: str, settings: Path | None, timeout: float) -> None:
    """Start clients and wait until each is connected."""
    from fedseg.orchestration import clients as clients_mod
    from fedseg.orchestration.network import load_network_state

    state = load_network_state(network_root.resolve())
    specs = []
    for item in clinic_items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise FedsegError(f"--clinic {item!r}: expected NAME=DIR")
        specs.append(clients_mod.ClientSpec(
            name=name, data_dir=Path(folder).expanduser().resolve(),
            settings_file=settings.resolve() if settings else None))
    handles = clients_mod.clients_up((root or network_root).resolve(), specs,
                                     api_url=state.api_url, route=route, app=app,
                                     token=state.client_token, api_client=state.api_client(),
                                     ready_timeout_s=timeout,
                                     tls_ca=Path(state.tls_ca) if state.tls_ca else None)
    for handle in handles:
        click.echo(f"{handle.name}: pid {handle.record.pid} ({handle.route}), log {handle.log}")


@clients.command("down")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding clients/ (the network folder unless --root was given).")
def clients_down(root: Path) -> None:
    """Stop the clients recorded under ROOT."""
    from fedseg.orchestration.clients import stop_clients

    stopped = stop_clients(root.resolve())
    click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (none running)'}")


@clients.command("status")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding clients/.")
def clients_status(root: Path) -> None:
    """List the recorded clients."""
    from fedseg.orchestration.clients import client_status

    rows = client_status(root.resolve())
    if not rows:
        click.echo("no clients recorded")
    for h, alive in rows:
        state = "alive" if alive else "stopped"
        click.echo(f"{h.name:<14} {h.route:<8} {state:<7} id {h.client_id or '-'}  log {h.log}")


def demo_run_name(runs: Path, overwrite: bool) -> str:
    """``demo``, or ``demo-<UTC time>`` when an earlier demo already fills ``runs/demo``.

    A second ``fedseg demo`` therefore just works and keeps the first one; --overwrite
    replaces ``runs/demo`` instead.
    """
    import datetime

    first = runs / "demo"
    if overwrite or not first.exists() or not any(first.iterdir()):
        return "demo"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return f"demo-{stamp}"


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent folder of the demo run (default: ./runs, printed).")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Rounds; each clinic's noise is calibrated to end them at epsilon <= 8.")
@click.option("--overwrite", is_flag=True,
              help="Replace RUNS/demo (default: a new RUNS/demo-<time> if it exists).")
def demo(out: Path | None, rounds: int, overwrite: bool) -> None:
    """Three synthetic clinics fine-tune a pretrained seed with DP (epsilon <= 8) on FEDn."""
    from fedseg.orchestration.runner import demo_experiment, run_experiment

    runs = (out or _default_runs_dir()).resolve()
    name = demo_run_name(runs, overwrite)
    click.echo(f"demo output goes to {runs / name}")
    exp = demo_experiment(rounds=rounds, name=name)
    _quiet_fedn()
    _sigterm_as_interrupt()
    try:
        result = run_experiment(exp, runs, progress=_echo_progress, overwrite=overwrite)
    except KeyboardInterrupt:
        click.echo(f"interrupted; round log so far in {runs / exp.name}", err=True)
        raise SystemExit(130) from None
    code = _report(result)
    ctx = click.get_current_context()
    analyze = ctx.parent.command.get_command(ctx.parent, "analyze") if ctx.parent else None
    if analyze is not None and result.rounds_done:
        click.echo("analysis:")
        try:
            ctx.invoke(analyze, run_dirs=(result.run_dir,),
                       out_dir=result.run_dir / "analysis")
        except TypeError as exc:  # analyze's options differ: say how to run it
            click.echo(f"  (run `fedseg analyze {result.run_dir}` yourself: {exc})")
    if code:
        raise SystemExit(code)


COMMANDS: list[click.Command] = [run, clients, demo]
