"""Starting and stopping the network's processes: stores, hooks, API server, combiners."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import requests
import yaml

from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg.orchestration.network import auth, ports, stores, tls
from fedseg.orchestration.network.config import (
    CONFIG_FILE,
    FEDN_SETTINGS_FILE,
    SECRET_FILE,
    STATE_FILE,
    NetworkConfig,
)
from fedseg.orchestration.network.ports import LOCALHOST, ProcessRecord
from fedseg.orchestration.network.revocation import REVOKED_FILE, REVOKED_FILE_ENV
from fedseg.orchestration.network.state import CombinerState, NetworkState, load_network_state
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_text

logger = logging.getLogger(__name__)


# Environment variables of ours that must not leak into fedn's processes from the caller.
_FEDN_ENV_DROP = ("STATESTORE_CONFIG", "MODELSTORAGE_CONFIG", "FEDN_JWT_SECRET_KEY",
                  "FEDN_MODEL_DIR", "FEDN_AUTH_TOKEN", "HOOK_SERVICE_HOST", "OTEL_SERVICE_NAME",
                  "FEDN_CUSTOM_URL_PREFIX", "FEDN_AUTH_WHITELIST_URL_PREFIX",
                  "FEDN_GRPC_CERT_PATH", "FEDN_GRPC_ROOT_CERT_PATH", "FEDSEG_REVOKED_TOKENS")

def _fedn_env(root: Path, settings: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FEDN_ENV_DROP}
    env.update({
        "STATESTORE_CONFIG": str(settings), "MODELSTORAGE_CONFIG": str(settings),
        "FEDN_HOME_DIR": str(root / "fedn-home"), "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def combiner_model_dir(root: Path, name: str) -> Path:
    """``<root>/models/<combiner>``: the combiner's temporary model files (FEDN_MODEL_DIR)."""
    return root / "models" / name


def _launch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedseg.orchestration.fedn.launch", *args]


def _http_ok(url: str, headers: dict[str, str] | None = None,
             verify: bool | str = True) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=2, verify=verify).status_code == 200
    except requests.RequestException:
        return False


def _combiner_registered(api_url: str, name: str, headers: dict[str, str],
                         verify: bool | str = True) -> bool:
    try:
        answer = requests.get(f"{api_url}api/v1/combiners/", headers=headers, timeout=2,
                              verify=verify)
        if answer.status_code != 200:
            return False
        return any(item.get("name") == name for item in answer.json().get("result", []))
    except (requests.RequestException, ValueError):
        return False


def _previous_alive(root: Path) -> list[str]:
    """Processes of an earlier network in ``root`` that still run.

    When none does (it crashed), leftovers of their process groups (e.g. gunicorn
    workers of a killed master) are stopped here so they free their ports.
    """
    path = root / STATE_FILE
    if not path.is_file():
        return []
    try:
        state = load_network_state(root)
    except FedsegError:
        return []
    alive = [name for name, rec in state.records.items() if ports.is_alive(rec)]
    if not alive:
        for record in state.records.values():
            if ports.stop(record):
                logger.info("stopped leftovers of %s from an earlier network", record.name)
    return alive


def _kept_secret(root: Path) -> str | None:
    """The secret of an earlier ``up`` with keep_secret (None if absent or too short)."""
    try:
        secret = (root / SECRET_FILE).read_text().strip()
    except OSError:
        return None
    return secret if len(secret.encode()) >= auth.MIN_SECRET_BYTES else None


def _keeps_secret(root: Path) -> bool:
    try:
        data = yaml.safe_load((root / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("keep_secret") is True


def network_up(config: NetworkConfig) -> NetworkState:
    """Start stores, API server, combiners (and hooks); wait until each is ready.

    Writes root/network.json atomically once everything answers. On any failure
    stops whatever it started and raises.

    Raises:
        FedsegError: Port in use, unreachable store, a process that died or did not
            become ready (the message names its log file), or a network already up.
    """
    config.validate()
    root = Path(config.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    alive = _previous_alive(root)
    if alive:
        raise FedsegError(f"a network is already up in {root} ({', '.join(alive)}); "
                          "run `fedseg network down` first")
    (root / STATE_FILE).unlink(missing_ok=True)
    if not config.keep_secret:
        (root / SECRET_FILE).unlink(missing_ok=True)  # its tokens are worthless from now on
    ports.require_free_ports(config.ports())
    if config.tls:
        # The API server and the combiners listen on the chosen address instead.
        ports.require_free_ports({key: port for key, port in config.ports().items()
                                  if key == "api_port" or key.startswith("port of combiner")},
                                 host=config.host)
    fedn_compat.check_fedn_version()
    fedn_compat.check_sqlalchemy()
    (root / "logs").mkdir(exist_ok=True)
    (root / "fedn-home").mkdir(exist_ok=True)
    atomic_write_text(root / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False),
                      PRIVATE_FILE)

    started: list[ProcessRecord] = []
    t0 = time.monotonic()
    try:
        state = _bring_up(config, root, started)
    except BaseException:
        for record in reversed(started):
            ports.stop(record)
        if not config.keep_secret:
            (root / SECRET_FILE).unlink(missing_ok=True)  # no network: no valid tokens
        raise
    logger.info("network up in %s after %.1f s", root, time.monotonic() - t0)
    return state


def _bring_up(config: NetworkConfig, root: Path, started: list[ProcessRecord]) -> NetworkState:
    timeout = config.startup_timeout_s
    host = config.host if config.tls else LOCALHOST
    tls_files = (tls.prepare_tls(root, config.host, config.tls_cert, config.tls_key,
                                 config.tls_ca) if config.tls else None)
    verify: bool | str = str(tls_files.ca) if tls_files else True
    if config.statestore == "sqlite":
        stores.check_sqlite_statestore(root)  # before anything starts
    # Object store.
    if config.s3 == "moto":
        record, storage = stores.start_moto(root, config.s3_port, config.s3_region, timeout)
        started.append(record)
    else:
        storage = stores.s3_storage(str(config.s3_endpoint), str(config.s3_access_key),
                                    str(config.s3_secret_key), config.s3_region)
        stores.ensure_buckets(storage)
    # State store.
    if config.statestore == "sqlite":
        statestore = stores.sqlite_statestore(root)
    elif config.statestore == "postgres-managed":
        record, statestore = stores.start_managed_postgres(root, config.postgres_port, timeout)
        started.append(record)
    else:
        statestore = stores.parse_postgres_url(str(config.postgres_url))
        stores.check_postgres(statestore)
    fedn_compat.create_schema(statestore)  # once, before gunicorn's workers (bug 3)
    stale = fedn_compat.sync_combiner_registry(  # a kept store may list old ports (bug 9)
        statestore, {spec.name: (host, spec.port) for spec in config.combiners})
    if stale:
        logger.info("removed combiners of an earlier network from the store: %s",
                    ", ".join(stale))

    settings = root / FEDN_SETTINGS_FILE
    atomic_write_text(settings, yaml.safe_dump({
        "network_id": config.network_id,
        "controller": {"host": host, "port": config.api_port, "debug": False},
        "statestore": statestore, "storage": storage}, sort_keys=False), PRIVATE_FILE)

    admin_token = client_token = None
    api_extra: dict[str, str] = {}
    headers: dict[str, str] = {}
    if config.auth:
        secret = _kept_secret(root) if config.keep_secret else None
        secret = secret or auth.new_secret()
        # On disk for the owner only, so tokens can be minted again when they expire.
        atomic_write_text(root / SECRET_FILE, secret + "\n", PRIVATE_FILE)
        lifetime = config.token_lifetime_s
        admin_token = auth.mint_token(secret, "admin", "fedseg-operator", lifetime)
        client_token = auth.mint_token(secret, "client", "fedseg-clients", lifetime)
        # The API server and the combiners get the secret (environment, never argv):
        # fedn's JWTInterceptor then checks the client token on every gRPC call; our
        # clients attach it on the plain local channel (fedn bug 15).
        api_extra["FEDN_JWT_SECRET_KEY"] = secret
        headers = {"Authorization": f"Bearer {admin_token}"}
    else:
        (root / SECRET_FILE).unlink(missing_ok=True)

    hooks_host = None
    if config.hooks:
        hooks = ports.spawn("hooks", _launch_argv("hooks", "--port", str(config.hooks_port)),
                            cwd=root, log=root / "logs" / "hooks.log",
                            env=_fedn_env(root, settings, {}), port=config.hooks_port)
        started.append(hooks)
        ports.wait_ready(hooks, lambda: ports.port_is_listening(config.hooks_port), timeout,
                         f"hooks on {LOCALHOST}:{config.hooks_port}")
        hooks_host = f"{LOCALHOST}:{config.hooks_port}"

    # Revoked clinic tokens (fedseg clinic revoke): the API server and the combiners
    # refuse them; the file is re-read when it changes.
    revoked = {REVOKED_FILE_ENV: str(root / REVOKED_FILE)} if config.auth else {}
    api_args = ["api", "--workers", str(config.api_workers), "--host", host,
                "--request-timeout", str(config.api_request_timeout_s)]
    api_env = {**api_extra, **revoked}
    if tls_files:
        api_args += ["--certfile", str(tls_files.cert), "--keyfile", str(tls_files.key)]
        # fedn's controller opens its channels to the combiners with this CA.
        api_env["FEDN_GRPC_CERT_PATH"] = str(tls_files.ca)
    api = ports.spawn("api", _launch_argv(*api_args),
                      cwd=root, log=root / "logs" / "api.log",
                      env=_fedn_env(root, settings, api_env), port=config.api_port)
    started.append(api)
    api_url = f"{'https' if tls_files else 'http'}://{host}:{config.api_port}/"
    ports.wait_ready(api, lambda: _http_ok(f"{api_url}health", verify=verify), timeout,
                     f"API server on {api_url}")

    combiner_extra = {"HOOK_SERVICE_HOST": hooks_host} if hooks_host else {}
    combiner_records = []
    for spec in config.combiners:
        # Each combiner its own model folder: fedn's default /tmp/models is shared by
        # every combiner on the machine, and a combiner deletes the round's global model
        # file when its round ends - while another one may still be reading it (seen
        # here: FileNotFoundError killed combiner-2's round thread; the session hung).
        models = combiner_model_dir(root, spec.name)
        models.mkdir(parents=True, exist_ok=True)
        combiner_args = ["combiner", "--name", spec.name, "--port", str(spec.port),
                         "--host", host]
        if tls_files:
            init = root / "fedn-home" / f"{spec.name}-tls.yaml"
            atomic_write_text(init, yaml.safe_dump({
                "secure": True, "cert_path": str(tls_files.cert),
                "key_path": str(tls_files.key)}), PRIVATE_FILE)
            combiner_args += ["--init", str(init)]
        record = ports.spawn(spec.name, _launch_argv(*combiner_args),
                             cwd=root, log=root / "logs" / f"{spec.name}.log",
                             env=_fedn_env(root, settings, {**combiner_extra, **api_extra,
                                                            **revoked,
                                                            "FEDN_MODEL_DIR": str(models)}),
                             port=spec.port)
        started.append(record)
        combiner_records.append((spec, record))
    for spec, record in combiner_records:
        ports.wait_ready(record, lambda s=spec: ports.port_is_listening(s.port, host)
                         and _combiner_registered(api_url, s.name, headers, verify),
                         timeout, f"combiner {spec.name} on {host}:{spec.port}")

    records = {rec.name: rec for rec in started}
    state = NetworkState(
        root=root, api_port=config.api_port,
        combiners=[CombinerState(spec.name, host, spec.port, rec.pid)
                   for spec, rec in combiner_records],
        admin_token=admin_token, client_token=client_token,
        processes={name: rec.pid for name, rec in records.items()},
        statestore={"kind": config.statestore, **statestore},
        storage={"kind": config.s3, **storage}, hooks_host=hooks_host, records=records,
        started_at=time.time(), token_lifetime_s=config.token_lifetime_s, api_host=host,
        tls_ca=str(tls_files.ca) if tls_files else None)
    atomic_write_text(root / STATE_FILE, json.dumps(state.to_dict(), indent=2), PRIVATE_FILE)
    return state


def network_down(root: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop exactly what ``network_up`` started in ``root`` (reverse order), by pid.

    Processes that already died are skipped; leftovers of their process groups
    (e.g. gunicorn workers of a crashed master) are stopped too. The state file is
    removed afterwards.

    Returns:
        Names of the processes that were running and got stopped.

    Raises:
        FedsegError: No network state in ``root``.
    """
    root = Path(root).resolve()
    state = load_network_state(root)
    stopped = []
    for name, record in reversed(list(state.records.items())):
        if ports.stop(record, timeout_s=timeout_s):
            stopped.append(name)
            logger.info("stopped %s (pid %d)", name, record.pid)
    (root / STATE_FILE).unlink(missing_ok=True)
    if not _keeps_secret(root):
        (root / SECRET_FILE).unlink(missing_ok=True)  # its tokens are worthless from now on
    return stopped


def network_status(root: Path) -> dict:
    """Each process (pid, alive, port, log) and the stores of the network in ``root``.

    Returns:
        {"root", "api_url", "up" (all alive), "processes": {name: {...}},
        "statestore": {...}, "storage": {...}} with passwords and keys left out.
    """
    state = load_network_state(root)
    processes = {}
    for name, record in state.records.items():
        processes[name] = {"pid": record.pid, "alive": ports.is_alive(record),
                           "port": record.port, "log": record.log}
    statestore = {k: v for k, v in state.statestore.items() if k != "postgres_config"}
    if "postgres_config" in state.statestore:
        pg = state.statestore["postgres_config"]
        statestore["postgres"] = f"{pg['username']}@{pg['host']}:{pg['port']}/fedn_db"
    storage_cfg = state.storage.get("storage_config", {})
    return {
        "root": str(state.root), "api_url": state.api_url,
        "up": all(p["alive"] for p in processes.values()),
        "auth": state.admin_token is not None,
        "combiners": [{"name": c.name, "host": c.host, "port": c.port}
                      for c in state.combiners],
        "processes": processes, "statestore": statestore,
        "storage": {"kind": state.storage.get("kind"),
                    "endpoint": storage_cfg.get("storage_endpoint")},
    }
