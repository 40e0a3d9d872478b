"""``fedseg network up|down|status``: the FEDn server side as local processes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError


@click.group()
def network() -> None:
    """Start, stop and inspect a local FEDn network (stores, API server, combiners)."""


@network.command("up")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Network config YAML (keys as NetworkConfig; root defaults to its folder).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Network folder (without --config: SQLite + moto, one combiner).")
@click.option("--statestore", type=click.Choice(["sqlite", "postgres-managed"]),
              help="State store (overrides the config).")
@click.option("--combiners", "n_combiners", type=click.IntRange(1, 32),
              help="Number of combiners: combiner-1.. on ports 12080, 12082, ...")
@click.option("--api-port", type=click.IntRange(1, 65535), help="API server port.")
@click.option("--auth/--no-auth", default=None,
              help="Require expiring JWTs at the API and the combiners (default: on; "
                   "--no-auth opens the network).")
@click.option("--hooks/--no-hooks", default=None,
              help="Start the hooks service (per-round client settings).")
@click.option("--host", help="Address the API server and combiners listen on and advertise "
                             "(default 127.0.0.1). Any other: TLS and auth, always.")
@click.option("--keep-secret/--new-secret", default=None,
              help="Keep the JWT secret across down/up so clinic kits survive a restart "
                   "(default: a new secret per up).")
def up(config_path: Path | None, root: Path | None, statestore: str | None,
       n_combiners: int | None, api_port: int | None, auth: bool | None,
       hooks: bool | None, host: str | None, keep_secret: bool | None) -> None:
    """Bring a network up and wait until every process answers."""
    from fedseg.orchestration.network import CombinerSpec, NetworkConfig, network_up

    if config_path is None and root is None:
        raise FedsegError("network up needs --config FILE or --root DIR")
    config = (NetworkConfig.from_yaml(config_path) if config_path is not None
              else NetworkConfig.default(root))
    if root is not None:
        config.root = root.resolve()
    if statestore is not None:
        config.statestore = statestore
    if n_combiners is not None:
        # Even ports from 12080: 12081 stays free for the hooks service.
        config.combiners = [CombinerSpec(f"combiner-{i + 1}", 12080 + 2 * i)
                            for i in range(n_combiners)]
    if api_port is not None:
        config.api_port = api_port
    if auth is not None:
        config.auth = auth
    if hooks is not None:
        config.hooks = hooks
    if host is not None:
        config.host = host
    if keep_secret is not None:
        config.keep_secret = keep_secret
    config.validate(str(config_path) if config_path is not None else "command line")
    state = network_up(config)
    click.echo(f"network up in {state.root}")
    click.echo(f"  api       {state.api_url}")
    for combiner in state.combiners:
        click.echo(f"  combiner  {combiner.name} {combiner.host}:{combiner.port}")
    if state.hooks_host:
        click.echo(f"  hooks     {state.hooks_host}")
    if state.tls_ca:
        click.echo(f"  tls       on (CA certificate for clinics: {state.tls_ca})")
    if state.admin_token:
        click.echo(f"  auth      on (tokens in {state.root / 'network.json'}, expire after "
                   f"{state.token_lifetime_s:g} s)")
    else:
        click.echo("  auth      OFF: anyone on this machine can use the API and combiners")


@network.command("down")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Network folder.")
def down(root: Path) -> None:
    """Stop every process the network started (also after a crash).

    The network folder of a run (``RUN/network``): the run's clients, recorded in
    ``RUN/clients/clients.json``, are stopped too (e.g. after ``kill -9`` of fedseg run).
    """
    from fedseg.orchestration.clients import CLIENTS_DIR, STATE_FILE, stop_clients
    from fedseg.orchestration.network import network_down

    stopped = network_down(root)
    run_dir = root.resolve().parent
    if (run_dir / "run.json").is_file() and (run_dir / CLIENTS_DIR / STATE_FILE).is_file():
        stopped += [f"client {n}" for n in stop_clients(run_dir)]
    click.echo(f"stopped {', '.join(stopped) if stopped else 'nothing (all had exited)'}")


@network.command("status")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Network folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(root: Path, as_json: bool) -> None:
    """Show each process (pid, alive, port, log) and the stores."""
    from fedseg.orchestration.network import network_status

    info = network_status(root)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"network {info['root']}: {'up' if info['up'] else 'DEGRADED'}, "
               f"api {info['api_url']}, auth {'on' if info['auth'] else 'off'}")
    for name, proc in info["processes"].items():
        state = "alive" if proc["alive"] else "DEAD"
        click.echo(f"  {name:<14} pid {proc['pid']:<7} {state:<5} port {proc['port']}  "
                   f"log {proc['log']}")
    click.echo(f"  statestore {info['statestore'].get('kind')}; "
               f"object store {info['storage']['kind']} {info['storage']['endpoint']}")


COMMANDS: list[click.Command] = [network]
