"""A FEDn server side as real local processes: ``network_up``, ``network_down``, status.

One network lives in one folder (its root)::

    root/network.json         state of the running network (pids, ports, tokens; 0600)
    root/jwt-secret           the network's JWT signing secret (auth on; 0600)
    root/network-config.yaml  the NetworkConfig it was started with
    root/fedn-settings.yaml   fedn's store settings (STATESTORE_CONFIG/MODELSTORAGE_CONFIG)
    root/fedn.sqlite          the SQLite state store (statestore: sqlite)
    root/postgres/            managed PostgreSQL data (statestore: postgres-managed)
    root/logs/<name>.log      one log per process
    root/fedn-home/           FEDN_HOME_DIR of the server processes
    root/models/<combiner>/   each combiner's temporary model files (FEDN_MODEL_DIR)

Processes: stores we run (moto, postgres), the hooks service (optional), the API
server, the combiners. fedn's servers are started through
:mod:`fedseg.orchestration.fedn.launch`, which applies our fedn 0.33.0 workarounds
and binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import requests
import yaml

from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg.orchestration.network import auth, ports, stores
from fedseg.orchestration.network.ports import LOCALHOST, ProcessRecord
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_text

logger = logging.getLogger(__name__)

STATE_FILE = "network.json"
CONFIG_FILE = "network-config.yaml"
FEDN_SETTINGS_FILE = "fedn-settings.yaml"
SECRET_FILE = "jwt-secret"
DEFAULT_TOKEN_LIFETIME_S = 24 * 3600.0
STATESTORES = ("sqlite", "postgres-managed", "postgres-url")
S3_KINDS = ("moto", "url")
# Environment variables of ours that must not leak into fedn's processes from the caller.
_FEDN_ENV_DROP = ("STATESTORE_CONFIG", "MODELSTORAGE_CONFIG", "FEDN_JWT_SECRET_KEY",
                  "FEDN_MODEL_DIR", "FEDN_AUTH_TOKEN", "HOOK_SERVICE_HOST", "OTEL_SERVICE_NAME",
                  "FEDN_CUSTOM_URL_PREFIX", "FEDN_AUTH_WHITELIST_URL_PREFIX")


@dataclass
class CombinerSpec:
    """A combiner to start: its name (unique) and gRPC port."""

    name: str
    port: int


def _default_combiners() -> list[CombinerSpec]:
    return [CombinerSpec("combiner-1", 12080)]


@dataclass
class NetworkConfig:
    """How to run one network.

    Attributes:
        root: The network folder (logs, pids, settings, SQLite file, state).
        api_port: Port of fedn's API server.
        combiners: Combiners to start (name, port).
        statestore: "sqlite", "postgres-managed" or "postgres-url".
        postgres_url: postgresql://user:password@host:port/fedn_db (postgres-url only).
        s3: "moto" (local, in memory) or "url" (s3_endpoint and keys).
        s3_endpoint: http(s)://host:port of an S3 service (s3: url only).
        s3_access_key: S3 access key (s3: url).
        s3_secret_key: S3 secret key (s3: url).
        s3_region: S3 region.
        s3_port: Port for moto_server (s3: moto).
        postgres_port: Port for the managed PostgreSQL.
        auth: Require JWTs at the API and at the combiners' gRPC ports (tokens minted
            locally, kept in the state). On by default: a network is closed unless
            opened explicitly.
        token_lifetime_s: Seconds until a minted token expires.
        hooks: Start fedn's hooks service (ServerFunctions: per-round client settings).
        hooks_port: Port of the hooks service.
        api_workers: gunicorn workers of the API server.
        startup_timeout_s: Bound on each readiness wait.
        network_id: fedn's network id.
    """

    root: Path
    api_port: int = 8092
    combiners: list[CombinerSpec] = field(default_factory=_default_combiners)
    statestore: str = "sqlite"
    postgres_url: str | None = None
    s3: str = "moto"
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "eu-west-1"
    s3_port: int = 9000
    postgres_port: int = 5433
    auth: bool = True
    token_lifetime_s: float = DEFAULT_TOKEN_LIFETIME_S
    hooks: bool = False
    hooks_port: int = 12081
    api_workers: int = 2
    startup_timeout_s: float = 60.0
    network_id: str = "fedseg"

    @classmethod
    def default(cls, root: Path) -> NetworkConfig:
        """SQLite + moto, one combiner, auth on, in ``root``."""
        config = cls(root=Path(root).resolve())
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: Path) -> NetworkConfig:
        """Read a config YAML; ``root`` defaults to the file's folder.

        Raises:
            FedsegError: Unreadable file, unknown key, missing key or bad value;
                the message names the file and the key.
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise FedsegError(f"{path}: cannot read network config ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise FedsegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise FedsegError(f"{path}: network config must be a mapping of keys to values")
        return cls.from_dict(data, source=str(path), base=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: dict, source: str, base: Path) -> NetworkConfig:
        """Build from a mapping (keys as the attributes); relative root is against ``base``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedsegError(f"{source}: unknown key {unknown[0]!r} (known: "
                              f"{', '.join(sorted(known))})")
        values: dict[str, Any] = dict(data)
        root = Path(str(values.pop("root", base)))
        values["root"] = (root if root.is_absolute() else base / root).resolve()
        if "combiners" in values:
            values["combiners"] = _parse_combiners(values["combiners"], source)
        for key in ("api_port", "s3_port", "postgres_port", "hooks_port", "api_workers"):
            if key in values:
                values[key] = _as_int(values[key], key, source)
        for key in ("auth", "hooks"):
            if key in values and not isinstance(values[key], bool):
                raise FedsegError(f"{source}: {key} must be true or false, not {values[key]!r}")
        for key in ("startup_timeout_s", "token_lifetime_s"):
            if key in values:
                try:
                    if isinstance(values[key], bool):
                        raise TypeError(key)
                    values[key] = float(values[key])
                except (TypeError, ValueError) as exc:
                    raise FedsegError(f"{source}: {key} must be a number, not "
                                      f"{values[key]!r}") from exc
        for key in ("statestore", "s3", "postgres_url", "s3_endpoint", "s3_access_key",
                    "s3_secret_key", "s3_region", "network_id"):
            if key in values and values[key] is not None:
                values[key] = str(values[key])
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "network config") -> None:
        """Check values and the keys each choice needs; FedsegError names the key."""
        if self.statestore not in STATESTORES:
            raise FedsegError(f"{source}: statestore {self.statestore!r} is not one of "
                              f"{', '.join(STATESTORES)}")
        if self.s3 not in S3_KINDS:
            raise FedsegError(f"{source}: s3 {self.s3!r} is not one of {', '.join(S3_KINDS)}")
        if self.statestore == "postgres-url" and not self.postgres_url:
            raise FedsegError(f"{source}: statestore postgres-url needs the key postgres_url")
        if self.s3 == "url":
            for key in ("s3_endpoint", "s3_access_key", "s3_secret_key"):
                if not getattr(self, key):
                    raise FedsegError(f"{source}: s3 url needs the key {key}")
            if not str(self.s3_endpoint).startswith(("http://", "https://")):
                raise FedsegError(f"{source}: s3_endpoint {self.s3_endpoint!r} must start "
                                  "with http:// or https://")
        if not self.combiners:
            raise FedsegError(f"{source}: combiners must list at least one combiner")
        names = [c.name for c in self.combiners]
        if len(set(names)) != len(names):
            raise FedsegError(f"{source}: combiner names must be unique ({', '.join(names)})")
        for key, port in self.ports().items():
            if not 1 <= port <= 65535:
                raise FedsegError(f"{source}: {key} {port} is not a TCP port (1-65535)")
        if self.api_workers < 1:
            raise FedsegError(f"{source}: api_workers must be at least 1")
        if self.startup_timeout_s <= 0:
            raise FedsegError(f"{source}: startup_timeout_s must be positive")
        if not 60 <= self.token_lifetime_s <= 366 * 24 * 3600:
            raise FedsegError(f"{source}: token_lifetime_s {self.token_lifetime_s:g} must be "
                              "between 60 s and one year")

    def ports(self) -> dict[str, int]:
        """Every local port this config will listen on, by role."""
        result = {"api_port": self.api_port}
        for combiner in self.combiners:
            result[f"port of combiner {combiner.name}"] = combiner.port
        if self.s3 == "moto":
            result["s3_port"] = self.s3_port
        if self.statestore == "postgres-managed":
            result["postgres_port"] = self.postgres_port
        if self.hooks:
            result["hooks_port"] = self.hooks_port
        return result

    def to_dict(self) -> dict:
        """YAML/JSON-ready form (root as a string)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["root"] = str(self.root)
        data["combiners"] = [{"name": c.name, "port": c.port} for c in self.combiners]
        return data


def _parse_combiners(value: Any, source: str) -> list[CombinerSpec]:
    if not isinstance(value, list):
        raise FedsegError(f"{source}: combiners must be a list of {{name, port}}")
    result = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item or "port" not in item:
            raise FedsegError(f"{source}: combiners[{index}] needs the keys name and port")
        extra = sorted(set(item) - {"name", "port"})
        if extra:
            raise FedsegError(f"{source}: combiners[{index}]: unknown key {extra[0]!r}")
        name = str(item["name"]).strip()
        if not name:
            raise FedsegError(f"{source}: combiners[{index}].name is empty")
        result.append(CombinerSpec(name, _as_int(item["port"], f"combiners[{index}].port",
                                                 source)))
    return result


def _as_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FedsegError(f"{source}: {key} must be an integer, not {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise FedsegError(f"{source}: {key} must be an integer, not {value!r}") from exc


@dataclass
class CombinerState:
    """A running combiner as clients see it."""

    name: str
    host: str
    port: int
    pid: int


@dataclass
class NetworkState:
    """A running network, as written to root/network.json.

    Attributes:
        root: The network folder.
        api_port: Port of the API server.
        combiners: The running combiners.
        admin_token: JWT with role admin (None without auth).
        client_token: JWT with role client (None without auth).
        processes: Our name -> pid of every process we started.
        statestore: fedn's statestore config (kind added under "kind").
        storage: fedn's storage config.
        api_host: Host of the API server (always 127.0.0.1).
        hooks_host: "127.0.0.1:PORT" of the hooks service, or None.
        records: Our name -> full process record (pid, creation time, port, log).
        started_at: Unix time when the network was up.
        token_lifetime_s: Lifetime of the tokens minted for this network.
    """

    root: Path
    api_port: int
    combiners: list[CombinerState]
    admin_token: str | None
    client_token: str | None
    processes: dict[str, int]
    statestore: dict
    storage: dict
    api_host: str = LOCALHOST
    hooks_host: str | None = None
    records: dict[str, ProcessRecord] = field(default_factory=dict)
    started_at: float = 0.0
    token_lifetime_s: float = DEFAULT_TOKEN_LIFETIME_S

    @property
    def auth(self) -> bool:
        """Whether the network requires tokens."""
        return self.admin_token is not None

    def fresh_token(self, role: str, subject: str) -> str | None:
        """A newly minted token (full lifetime) for ``role``; None without auth.

        Tokens expire; whoever can read the network folder's secret (its owner) mints
        new ones, so a long run never holds an expired token.

        Raises:
            FedsegError: auth is on but the secret file is unreadable.
        """
        if not self.auth:
            return None
        path = self.root / SECRET_FILE
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise FedsegError(f"{path}: cannot read the network's JWT secret "
                              f"({exc.strerror})") from None
        return auth.mint_token(secret, role, subject, lifetime_s=self.token_lifetime_s)

    @property
    def api_url(self) -> str:
        """The API server's URL, ending in "/" (as fedn's connect_to_api wants)."""
        return f"http://{self.api_host}:{self.api_port}/"

    def api_client(self) -> Any:
        """A fedn APIClient for this network (with the admin token when auth is on)."""
        from fedn.network.api.client import APIClient

        return APIClient(host=self.api_host, port=self.api_port, secure=False,
                         token=self.fresh_token("admin", "fedseg-operator"))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "root": str(self.root), "api_host": self.api_host, "api_port": self.api_port,
            "api_url": self.api_url,
            "combiners": [vars(c) for c in self.combiners],
            "admin_token": self.admin_token, "client_token": self.client_token,
            "processes": dict(self.processes), "statestore": self.statestore,
            "storage": self.storage, "hooks_host": self.hooks_host,
            "records": {name: rec.to_dict() for name, rec in self.records.items()},
            "started_at": self.started_at, "token_lifetime_s": self.token_lifetime_s,
        }

    @classmethod
    def from_dict(cls, data: dict) -> NetworkState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            root=Path(data["root"]), api_port=int(data["api_port"]),
            combiners=[CombinerState(str(c["name"]), str(c["host"]), int(c["port"]),
                                     int(c["pid"])) for c in data["combiners"]],
            admin_token=data.get("admin_token"), client_token=data.get("client_token"),
            processes={str(k): int(v) for k, v in data["processes"].items()},
            statestore=dict(data["statestore"]), storage=dict(data["storage"]),
            api_host=str(data.get("api_host", LOCALHOST)), hooks_host=data.get("hooks_host"),
            records={str(k): ProcessRecord.from_dict(v)
                     for k, v in data.get("records", {}).items()},
            started_at=float(data.get("started_at", 0.0)),
            token_lifetime_s=float(data.get("token_lifetime_s", DEFAULT_TOKEN_LIFETIME_S)),
        )


def load_network_state(root: Path) -> NetworkState:
    """Read root/network.json.

    Raises:
        FedsegError: No network state there (never started, or brought down).
    """
    path = Path(root) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FedsegError(f"{path}: no network state (is the network up?)") from exc
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{path}: unreadable network state ({exc})") from exc
    try:
        state = NetworkState.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise FedsegError(f"{path}: malformed network state (missing or bad {exc})") from exc
    if state.auth and (state.root / SECRET_FILE).is_file():
        # Tokens expire: whoever loads the state gets tokens with a full lifetime.
        state.admin_token = state.fresh_token("admin", "fedseg-operator")
        state.client_token = state.fresh_token("client", "fedseg-clients")
    return state


def _write_private(path: Path, text: str) -> None:
    """Atomic write, readable by the owner only (it holds passwords and tokens)."""
    atomic_write_text(path, text, PRIVATE_FILE)


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


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _combiner_registered(api_url: str, name: str, headers: dict[str, str]) -> bool:
    try:
        answer = requests.get(f"{api_url}api/v1/combiners/", headers=headers, timeout=2)
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
    (root / SECRET_FILE).unlink(missing_ok=True)  # its tokens are worthless from now on
    ports.require_free_ports(config.ports())
    fedn_compat.check_fedn_version()
    fedn_compat.check_sqlalchemy()
    (root / "logs").mkdir(exist_ok=True)
    (root / "fedn-home").mkdir(exist_ok=True)
    _write_private(root / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))

    started: list[ProcessRecord] = []
    t0 = time.monotonic()
    try:
        state = _bring_up(config, root, started)
    except BaseException:
        for record in reversed(started):
            ports.stop(record)
        raise
    logger.info("network up in %s after %.1f s", root, time.monotonic() - t0)
    return state


def _bring_up(config: NetworkConfig, root: Path, started: list[ProcessRecord]) -> NetworkState:
    timeout = config.startup_timeout_s
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
        statestore, {spec.name: (LOCALHOST, spec.port) for spec in config.combiners})
    if stale:
        logger.info("removed combiners of an earlier network from the store: %s",
                    ", ".join(stale))

    settings = root / FEDN_SETTINGS_FILE
    _write_private(settings, yaml.safe_dump({
        "network_id": config.network_id,
        "controller": {"host": LOCALHOST, "port": config.api_port, "debug": False},
        "statestore": statestore, "storage": storage}, sort_keys=False))

    admin_token = client_token = None
    api_extra: dict[str, str] = {}
    headers: dict[str, str] = {}
    if config.auth:
        secret = auth.new_secret()
        # On disk for the owner only, so tokens can be minted again when they expire.
        _write_private(root / SECRET_FILE, secret + "\n")
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

    api = ports.spawn("api", _launch_argv("api", "--workers", str(config.api_workers)),
                      cwd=root, log=root / "logs" / "api.log",
                      env=_fedn_env(root, settings, api_extra), port=config.api_port)
    started.append(api)
    api_url = f"http://{LOCALHOST}:{config.api_port}/"
    ports.wait_ready(api, lambda: _http_ok(f"{api_url}health"), timeout,
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
        record = ports.spawn(spec.name, _launch_argv("combiner", "--name", spec.name,
                                                     "--port", str(spec.port)),
                             cwd=root, log=root / "logs" / f"{spec.name}.log",
                             env=_fedn_env(root, settings, {**combiner_extra, **api_extra,
                                                            "FEDN_MODEL_DIR": str(models)}),
                             port=spec.port)
        started.append(record)
        combiner_records.append((spec, record))
    for spec, record in combiner_records:
        ports.wait_ready(record, lambda s=spec: ports.port_is_listening(s.port)
                         and _combiner_registered(api_url, s.name, headers),
                         timeout, f"combiner {spec.name} on {LOCALHOST}:{spec.port}")

    records = {rec.name: rec for rec in started}
    state = NetworkState(
        root=root, api_port=config.api_port,
        combiners=[CombinerState(spec.name, LOCALHOST, spec.port, rec.pid)
                   for spec, rec in combiner_records],
        admin_token=admin_token, client_token=client_token,
        processes={name: rec.pid for name, rec in records.items()},
        statestore={"kind": config.statestore, **statestore},
        storage={"kind": config.s3, **storage}, hooks_host=hooks_host, records=records,
        started_at=time.time(), token_lifetime_s=config.token_lifetime_s)
    _write_private(root / STATE_FILE, json.dumps(state.to_dict(), indent=2))
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
