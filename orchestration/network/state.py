"""A running network as root/network.json records it, and loading it (fresh tokens)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.orchestration.network import auth
from fedseg.orchestration.network.config import DEFAULT_TOKEN_LIFETIME_S, SECRET_FILE, STATE_FILE
from fedseg.orchestration.network.ports import LOCALHOST, ProcessRecord
from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)


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
        api_host: Host of the API server (the network's ``host``; 127.0.0.1 by default).
        hooks_host: "127.0.0.1:PORT" of the hooks service, or None.
        records: Our name -> full process record (pid, creation time, port, log).
        started_at: Unix time when the network was up.
        token_lifetime_s: Lifetime of the tokens minted for this network.
        tls_ca: Path of the CA certificate that signed the server certificate when the
            network serves TLS (a non-loopback host), else None.
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
    tls_ca: str | None = None

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
        scheme = "https" if self.tls_ca else "http"
        return f"{scheme}://{self.api_host}:{self.api_port}/"

    @property
    def verify(self) -> bool | str:
        """What ``requests`` should verify the API's certificate with (the CA path)."""
        return self.tls_ca if self.tls_ca else True

    def api_client(self) -> Any:
        """A fedn APIClient for this network (with the admin token when auth is on)."""
        from fedn.network.api.client import APIClient

        return APIClient(host=self.api_host, port=self.api_port, secure=bool(self.tls_ca),
                         verify=self.verify, token=self.fresh_token("admin", "fedseg-operator"))

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
            "tls_ca": self.tls_ca,
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
            tls_ca=data.get("tls_ca"),
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

