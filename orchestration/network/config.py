"""What a network is made of: NetworkConfig (ports, combiners, stores, auth) and its files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)


STATE_FILE = "network.json"
CONFIG_FILE = "network-config.yaml"
FEDN_SETTINGS_FILE = "fedn-settings.yaml"
SECRET_FILE = "jwt-secret"
DEFAULT_TOKEN_LIFETIME_S = 24 * 3600.0
STATESTORES = ("sqlite", "postgres-managed", "postgres-url")
S3_KINDS = ("moto", "url")

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
        api_request_timeout_s: Seconds one API request (a model upload or download) may
            take before gunicorn kills its worker; gunicorn's own 30 s kills the upload of
            a ~100M-parameter model, or of a 30M one over a slow link.
        startup_timeout_s: Bound on each readiness wait.
        network_id: fedn's network id.
        host: Address the API server and the combiners listen on and advertise to
            clients. Loopback (the default): plain HTTP/gRPC, as on one machine. Any
            other address: TLS (HTTPS, gRPC over TLS) and auth are forced on.
        tls_cert: Operator-supplied server certificate (PEM; its subjectAltNames must
            include ``host``). Without it fedseg creates a private CA in root/tls.
        tls_key: Its private key (PEM).
        tls_ca: The CA certificate clients verify the server with (PEM).
        keep_secret: Keep root/jwt-secret across ``network down``/``up``, so tokens in
            clinic kits stay valid after a restart (off: a fresh secret per ``up``,
            every earlier token worthless). Revoked kits stay revoked either way.
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
    api_request_timeout_s: int = 600
    startup_timeout_s: float = 60.0
    network_id: str = "fedseg"
    host: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    keep_secret: bool = False

    @property
    def tls(self) -> bool:
        """TLS on: every address but loopback (cannot be switched off there)."""
        from fedseg.orchestration.network.tls import is_loopback

        return not is_loopback(self.host)

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
        for key in ("api_port", "s3_port", "postgres_port", "hooks_port", "api_workers",
                    "api_request_timeout_s"):
            if key in values:
                values[key] = _as_int(values[key], key, source)
        for key in ("auth", "hooks", "keep_secret"):
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
                    "s3_secret_key", "s3_region", "network_id", "host"):
            if key in values and values[key] is not None:
                values[key] = str(values[key])
        for key in ("tls_cert", "tls_key", "tls_ca"):
            if values.get(key) is not None:
                tls_path = Path(str(values[key]))
                values[key] = (tls_path if tls_path.is_absolute() else base / tls_path).resolve()
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
        if not self.host or any(c.isspace() or c in "/:[]@" for c in self.host):
            raise FedsegError(f"{source}: host {self.host!r} must be an IPv4 address or a "
                              "host name")
        if self.tls and not self.auth:
            raise FedsegError(f"{source}: host {self.host} is not loopback: auth cannot be "
                              "turned off there (clinics reach it over the network)")
        if self.keep_secret and not self.auth:
            raise FedsegError(f"{source}: keep_secret needs auth on (no secret without it)")
        tls_given = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(self, k)]
        if tls_given and len(tls_given) != 3:
            raise FedsegError(f"{source}: tls_cert, tls_key and tls_ca go together "
                              f"(only {', '.join(tls_given)} given)")
        if tls_given and not self.tls:
            raise FedsegError(f"{source}: tls_cert/tls_key/tls_ca need a non-loopback host "
                              "(on loopback the network runs without TLS)")
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
        if not 30 <= self.api_request_timeout_s <= 24 * 3600:
            raise FedsegError(f"{source}: api_request_timeout_s {self.api_request_timeout_s} "
                              "must be between 30 s and one day")
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
        for key in ("tls_cert", "tls_key", "tls_ca"):
            data[key] = str(data[key]) if data[key] is not None else None
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
