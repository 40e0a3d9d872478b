"""Start and stop N FEDn clients on this machine, each a separate process.

Every client gets its own folder ``<root>/clients/<name>/`` holding:

- ``work/``: the process's working directory (fedn extracts packages here);
- ``state/``: FEDSEG_STATE_DIR (predictions, kept updates; the privacy ledger is not
  here: it lives with the clinic's data, see fedseg_clinic.privacy.ledger);
- ``client.log``: its stdout and stderr;
- ``ready.json``: written by the callback client once it is connected.

and its data folder (FEDSEG_DATA_DIR) where the caller says. ``<root>/clients/clients.json``
records what was started (pid + creation time), so ``fedseg clients down`` in another
shell stops exactly those processes and nothing else.

Two routes:

- ``callback`` (default): ``python -m fedseg_clinic.fedn_callback`` - one
  long-lived process per clinic, TensorFlow imported and the model traced once.
- ``package``: ``fedn client start`` - fedn downloads the compute package and runs its
  train/validate entry points as a fresh subprocess per call (the clinic-side contract).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from fedseg.orchestration.network import ports
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.fedn_callback import TOKEN_ENV, new_client_id
from fedseg_clinic.fedn_tls import GRPC_ROOT_CERT_ENV
from fedseg_clinic.io import atomic_write_text

logger = logging.getLogger(__name__)

CLIENTS_DIR = "clients"
PACKAGE_CLIENT_CONFIG = "fedn-client.yaml"  # package route: fedn's --init file (0600)
STATE_FILE = "clients.json"
ROUTES = ("callback", "package")
# Never hand server-side secrets or store settings to a clinic process.
_SERVER_ONLY_ENV = ("FEDN_JWT_SECRET_KEY", "STATESTORE_CONFIG", "MODELSTORAGE_CONFIG",
                    "FEDN_AUTH_TOKEN", "HOOK_SERVICE_HOST")


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """One clinic to attach.

    Attributes:
        name: Client name (the round log's key; the fedn client id is fresh per start).
        data_dir: The clinic's cases folder (FEDSEG_DATA_DIR).
        settings_file: The clinic settings YAML (FEDSEG_SETTINGS), or None.
        env: Extra environment variables (e.g. thread counts).
    """

    name: str
    data_dir: Path
    settings_file: Path | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClientHandle:
    """A started client."""

    name: str
    route: str
    folder: Path
    record: ports.ProcessRecord
    client_id: str = ""

    @property
    def log(self) -> Path:
        """Its log file."""
        return Path(self.record.log)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "route": self.route, "folder": str(self.folder),
                "client_id": self.client_id, "process": self.record.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientHandle:
        """Inverse of :meth:`to_dict`."""
        return cls(name=str(data["name"]), route=str(data["route"]),
                   folder=Path(data["folder"]),
                   record=ports.ProcessRecord.from_dict(data["process"]),
                   client_id=str(data.get("client_id", "")))


def client_folder(root: Path, name: str) -> Path:
    """``<root>/clients/<name>``."""
    return root / CLIENTS_DIR / name


def client_env(spec: ClientSpec, folder: Path, token: str | None,
               base: dict[str, str] | None = None, tls_ca: Path | None = None
               ) -> dict[str, str]:
    """The complete environment of one client process.

    Args:
        spec: The clinic.
        folder: Its client folder (state/ lives there).
        token: The client JWT, or None without auth.
        base: Environment to start from (default: ours, minus server-only settings).
        tls_ca: The network's CA certificate (a TLS network: ``https://`` API, gRPC over
            TLS); both routes verify the server with it (REQUESTS_CA_BUNDLE for HTTPS,
            FEDN_GRPC_ROOT_CERT_PATH for gRPC, as a clinic kit's run-client.sh does).

    Returns:
        The environment (FEDSEG_* set, server secrets removed).
    """
    env = dict(os.environ if base is None else base)
    for key in _SERVER_ONLY_ENV:
        env.pop(key, None)
    # The package route runs "python ..." from fedn.yaml: make it our interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["FEDSEG_DATA_DIR"] = str(spec.data_dir)
    env["FEDSEG_STATE_DIR"] = str(folder / "state")
    env["FEDSEG_CLIENT_NAME"] = spec.name
    # A fixed folder name instead of fedn's compute-package-<timestamp> per start.
    env["FEDN_PACKAGE_EXTRACT_DIR"] = "package"
    if spec.settings_file is not None:
        env["FEDSEG_SETTINGS"] = str(spec.settings_file)
    else:
        env.pop("FEDSEG_SETTINGS", None)
    if token:
        env[TOKEN_ENV] = token
    else:
        env.pop(TOKEN_ENV, None)
    if tls_ca is not None:
        env["REQUESTS_CA_BUNDLE"] = str(tls_ca)
        env[GRPC_ROOT_CERT_ENV] = str(tls_ca)
    else:
        env.pop(GRPC_ROOT_CERT_ENV, None)  # plain gRPC on a loopback network
    env.update(spec.env)
    return env


def client_argv(route: str, spec: ClientSpec, api_url: str, app: str, folder: Path,
                token: str | None, combiner: str | None = None, client_id: str = ""
                ) -> list[str]:
    """The command line of one client process.

    Args:
        route: "callback" or "package".
        spec: The clinic.
        api_url: API base URL ("http://127.0.0.1:8092/").
        app: MODULE:FACTORY for the callback route.
        folder: The client folder.
        token: Client JWT; never placed on the command line (``ps`` shows argv to
            every user): the callback route reads it from the environment, the
            package route from its 0600 config file (:func:`write_package_config`).
        combiner: Preferred combiner name, or None.
        client_id: The fedn client id (default: a fresh one).
    """
    client_id = client_id or new_client_id()
    if route == "callback":
        argv = [sys.executable, "-m", "fedseg_clinic.fedn_callback",
                "--api-url", api_url, "--name", spec.name, "--client-id", client_id,
                "--app", app, "--ready-file", str(folder / "ready.json")]
        if combiner:
            argv += ["--combiner", combiner]
        return argv
    if route == "package":
        # fedn's `client start` through our launcher (it attaches the token to gRPC
        # calls, fedn bug 15); everything else, the token included, is in the file.
        return [sys.executable, "-m", "fedseg.orchestration.fedn.launch", "client",
                "--init", str(folder / PACKAGE_CLIENT_CONFIG)]
    raise FedsegError(f"client route {route!r}: must be one of {', '.join(ROUTES)}")


def write_package_config(folder: Path, spec: ClientSpec, api_url: str, token: str | None,
                         combiner: str | None, client_id: str) -> Path:
    """Write the package route's fedn client config (``--init`` file), mode 0600.

    Returns:
        Its path (``folder/fedn-client.yaml``).
    """
    import yaml

    parts = urlsplit(api_url if "://" in api_url else f"http://{api_url}")
    config: dict[str, Any] = {
        "api_url": f"{parts.scheme}://{parts.hostname}", "api_port": parts.port or 80,
        "name": spec.name, "client_id": client_id, "token": token or None,
        "preferred_combiner": combiner or "",
    }
    path = folder / PACKAGE_CLIENT_CONFIG
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False), mode=0o600)
    return path


def _state_path(root: Path) -> Path:
    return root / CLIENTS_DIR / STATE_FILE


def load_clients(root: Path) -> list[ClientHandle]:
    """The clients recorded under ``root`` (empty when none)."""
    path = _state_path(root)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [ClientHandle.from_dict(item) for item in data["clients"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedsegError(f"{path}: unreadable client state ({exc})") from None


def _save_clients(root: Path, handles: Iterable[ClientHandle]) -> None:
    atomic_write_text(_state_path(root), json.dumps(
        {"clients": [h.to_dict() for h in handles]}, indent=2))


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def start_client(root: Path, spec: ClientSpec, *, api_url: str, route: str = "callback",
                 app: str, token: str | None = None, combiner: str | None = None,
                 tls_ca: Path | None = None) -> ClientHandle:
    """Start one client process (does not wait for it to connect).

    Args:
        root: Folder that holds ``clients/`` (usually the run or network folder).
        spec: The clinic.
        api_url: API base URL.
        route: "callback" or "package".
        app: MODULE:FACTORY (callback route).
        token: Client JWT, or None without auth.
        combiner: Preferred combiner, or None.
        tls_ca: The network's CA certificate on a TLS network (see :func:`client_env`).

    Returns:
        Its handle (also added to ``clients.json``).
    """
    if route not in ROUTES:
        raise FedsegError(f"client route {route!r}: must be one of {', '.join(ROUTES)}")
    if not spec.data_dir.is_dir():
        raise FedsegError(f"{spec.data_dir}: data folder of client {spec.name} does not exist")
    folder = client_folder(root, spec.name)
    for sub in ("work", "state"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "ready.json").unlink(missing_ok=True)
    client_id = new_client_id()
    if route == "package":
        write_package_config(folder, spec, api_url, token, combiner, client_id)
    record = ports.spawn(spec.name, client_argv(route, spec, api_url, app, folder, token,
                                                combiner, client_id),
                         cwd=folder / "work", log=folder / "client.log",
                         env=client_env(spec, folder, token, tls_ca=tls_ca))
    handle = ClientHandle(name=spec.name, route=route, folder=folder, record=record,
                          client_id=client_id)
    others = [h for h in load_clients(root) if h.name != spec.name]
    _save_clients(root, [*others, handle])
    return handle


def clients_up(root: Path, specs: list[ClientSpec], *, api_url: str,
               route: str = "callback", app: str, token: str | None = None,
               combiner: str | Sequence[str] | None = None, ready_timeout_s: float = 120.0,
               api_client: Any = None, tls_ca: Path | None = None) -> list[ClientHandle]:
    """Start all clients, then wait until each is connected.

    "Connected" is the client's ready file (callback route) and, when ``api_client``
    is given, the API listing the client as online (both routes). ``combiner`` is one
    preferred combiner for all, or a list that the clients are split across in turn
    (client i prefers ``combiner[i % len(combiner)]``: hierarchical FEDn). ``tls_ca``:
    the network's CA certificate on a TLS network (see :func:`client_env`).

    Raises:
        FedsegError: a name twice, a client that exits while starting (the message holds
            its log's last lines), or not connected within ``ready_timeout_s``; clients
            started by this call are stopped again before raising.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise FedsegError(f"client names must be unique, got {names}")
    running = {h.name for h in load_clients(root) if ports.is_alive(h.record)}
    clash = sorted(running & set(names))
    if clash:
        raise FedsegError(f"{_state_path(root)}: clients {clash} already run; "
                          "stop them first (fedseg clients down)")
    handles: list[ClientHandle] = []
    try:
        for i, spec in enumerate(specs):
            preferred = (combiner if combiner is None or isinstance(combiner, str)
                         else combiner[i % len(combiner)])
            handles.append(start_client(root, spec, api_url=api_url, route=route, app=app,
                                        token=token, combiner=preferred, tls_ca=tls_ca))
        wait_connected(handles, ready_timeout_s, api_client)
    except BaseException:
        stop_clients(root, [h.name for h in handles])
        raise
    return handles


def online_client_names(api_client: Any) -> set[str]:
    """Names of the clients the API lists as online."""
    try:
        answer = api_client.get_clients()
    except (requests.RequestException, ValueError) as exc:  # API restarting: none yet
        logger.debug("get_clients failed: %s", exc)
        return set()
    result = answer.get("result", []) if isinstance(answer, dict) else []
    return {str(c.get("name")) for c in result
            if isinstance(c, dict) and str(c.get("status", "")).lower() == "online"}


def wait_connected(handles: list[ClientHandle], timeout_s: float, api_client: Any = None
                   ) -> None:
    """Block until every client is connected; fail early when one exits."""
    deadline = time.monotonic() + timeout_s
    pending = {h.name: h for h in handles}
    while pending:
        online = online_client_names(api_client) if api_client is not None else None
        for name, handle in list(pending.items()):
            if not ports.is_alive(handle.record):
                raise FedsegError(f"client {name} exited while starting; {handle.log}: "
                                  f"{_tail(handle.log)}")
            ready = handle.route != "callback" or (handle.folder / "ready.json").exists()
            if ready and (online is None or name in online):
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(sorted(pending))
            raise FedsegError(f"clients {names} not connected after {timeout_s:.0f} s; "
                              f"read {pending[sorted(pending)[0]].log}")
        time.sleep(0.5)


def stop_clients(root: Path, names: Iterable[str] | None = None,
                 timeout_s: float = 10.0) -> list[str]:
    """Stop recorded clients (all when ``names`` is None); returns who was running.

    Only processes recorded in ``clients.json`` (pid + creation time) are signalled.
    """
    handles = load_clients(root)
    wanted = None if names is None else set(names)
    stopped: list[str] = []
    kept: list[ClientHandle] = []
    for handle in handles:
        if wanted is not None and handle.name not in wanted:
            kept.append(handle)
            continue
        if ports.stop(handle.record, timeout_s=timeout_s):
            stopped.append(handle.name)
    if handles:
        _save_clients(root, kept)
    return stopped


def client_status(root: Path) -> list[tuple[ClientHandle, bool]]:
    """(handle, alive) of every recorded client."""
    return [(h, ports.is_alive(h.record)) for h in load_clients(root)]
