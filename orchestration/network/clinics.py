"""Per-clinic credentials: ``fedseg clinic add`` writes a kit, ``revoke`` ends its token.

A kit is a folder (0700) for one clinic's IT:

    fedn-client.yaml   fedn's ``client start --init`` file: API address, name, client
                       id, the clinic's token (mode 0600)
    ca.pem             the network's CA certificate (TLS networks): the clinic verifies
                       the server with it
    run-client.sh      starts the client with the CA set for HTTPS and gRPC
    README.md          what to install, where data and settings go, which ports to open

The token is a client-role JWT with the clinic's name as subject and a random ``jti``;
root/clinics.json (0600) records name -> jti, so ``revoke`` puts exactly that token on
the network's revocation list. Tokens are written to files only, never printed or
logged.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from fedseg.orchestration.network import auth
from fedseg.orchestration.network.config import SECRET_FILE
from fedseg.orchestration.network.revocation import REVOKED_FILE, revoke
from fedseg.orchestration.network.state import load_network_state
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_bytes, atomic_write_text

CLINICS_FILE = "clinics.json"
KIT_CONFIG = "fedn-client.yaml"
KIT_CA = "ca.pem"
KIT_RUN = "run-client.sh"
KIT_README = "README.md"
DEFAULT_KIT_LIFETIME_S = 90 * 24 * 3600.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # fedn's client name rules


def _registry_path(root: Path) -> Path:
    return Path(root) / CLINICS_FILE


def load_clinics(root: Path) -> dict[str, dict]:
    """Name -> {"jti", "client_id", "created_at", "expires_at", "revoked_at"}."""
    path = _registry_path(root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{path}: unreadable clinic list ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("clinics"), dict):
        raise FedsegError(f"{path}: not a clinic list (no mapping 'clinics')")
    return data["clinics"]


def _save_clinics(root: Path, clinics: dict[str, dict]) -> None:
    atomic_write_text(_registry_path(root), json.dumps({"clinics": clinics}, indent=2),
                      PRIVATE_FILE)


def add_clinic(root: Path, name: str, out: Path,
               lifetime_s: float = DEFAULT_KIT_LIFETIME_S) -> Path:
    """Mint a token for clinic ``name`` and write its kit to ``out``.

    Args:
        root: The network folder (the network must be up: its secret signs the token).
        name: The clinic's client name (letters, digits, "_", "-").
        out: The kit folder to create (must not exist or be empty).
        lifetime_s: Seconds until the clinic's token expires.

    Returns:
        The kit folder.

    Raises:
        FedsegError: Bad name, a clinic of that name with a live kit, a kit folder that
            is not empty, or no running network with auth in ``root``.
    """
    root = Path(root).resolve()
    out = Path(out).resolve()
    if not NAME_PATTERN.match(name):
        raise FedsegError(f"clinic name {name!r}: use 1-63 letters, digits, '_' or '-'")
    if not 60 <= lifetime_s <= 366 * 24 * 3600:
        raise FedsegError(f"token lifetime {lifetime_s:g} s must be between 60 s and one year")
    state = load_network_state(root)
    if not state.auth:
        raise FedsegError(f"{root}: the network runs without auth; clinic tokens need "
                          "auth on")
    clinics = load_clinics(root)
    if name in clinics and not clinics[name].get("revoked_at"):
        raise FedsegError(f"clinic {name!r} already has a kit; `fedseg clinic revoke {name}` "
                          "first to issue a new one")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedsegError(f"{out}: kit folder exists and is not empty")
    secret_path = root / SECRET_FILE
    try:
        secret = secret_path.read_text().strip()
    except OSError as exc:
        raise FedsegError(f"{secret_path}: cannot read the network's JWT secret "
                          f"({exc.strerror})") from None
    jti = secrets.token_hex(16)
    token = auth.mint_token(secret, "client", f"clinic:{name}", lifetime_s, jti=jti)
    client_id = str(uuid.uuid4())

    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)
    parts = urlsplit(state.api_url)
    config = {"api_url": f"{parts.scheme}://{parts.hostname}", "api_port": parts.port,
              "name": name, "client_id": client_id, "token": token,
              "preferred_combiner": ""}
    atomic_write_text(out / KIT_CONFIG, yaml.safe_dump(config, sort_keys=False), PRIVATE_FILE)
    if state.tls_ca:
        atomic_write_bytes(out / KIT_CA, Path(state.tls_ca).read_bytes(), 0o644)
    atomic_write_text(out / KIT_RUN, _run_script(name, bool(state.tls_ca)), 0o700)
    atomic_write_text(out / KIT_README, _readme(name, state.api_url,
                                                [(c.host, c.port) for c in state.combiners],
                                                bool(state.tls_ca), time.time() + lifetime_s),
                      0o644)
    now = time.time()
    clinics[name] = {"jti": jti, "client_id": client_id, "created_at": now,
                     "expires_at": now + lifetime_s, "revoked_at": None, "kit": str(out)}
    _save_clinics(root, clinics)
    return out


def revoke_clinic(root: Path, name: str) -> dict:
    """Put clinic ``name``'s token on the network's revocation list.

    The API server and the combiners refuse it from their next check on (a client
    already connected is refused at its next gRPC call: heartbeats every few seconds).

    Returns:
        The clinic's record (with ``revoked_at``).

    Raises:
        FedsegError: No such clinic, or already revoked.
    """
    root = Path(root).resolve()
    clinics = load_clinics(root)
    if name not in clinics:
        known = ", ".join(sorted(clinics)) or "none"
        raise FedsegError(f"{_registry_path(root)}: no clinic {name!r} (known: {known})")
    record = clinics[name]
    if record.get("revoked_at"):
        raise FedsegError(f"clinic {name!r} was already revoked")
    revoke(root / REVOKED_FILE, record["jti"], name)
    record["revoked_at"] = time.time()
    _save_clinics(root, clinics)
    return record


def _run_script(name: str, tls: bool) -> str:
    lines = ["#!/bin/sh",
             "# Starts this clinic's FEDn client with the settings in this folder.",
             "# Run from anywhere; FEDSEG_PYTHON selects the Python that has fedseg installed.",
             "set -eu",
             'KIT="$(cd "$(dirname "$0")" && pwd)"']
    if tls:
        lines += ["# The network's private CA: HTTPS to the API server and gRPC to the combiners.",
                  'export REQUESTS_CA_BUNDLE="$KIT/ca.pem"',
                  'export FEDN_GRPC_ROOT_CERT_PATH="$KIT/ca.pem"']
    lines += ['# The clinic\'s data folder (read only, never sent) and the client\'s own state.',
              ': "${FEDSEG_DATA_DIR:?set FEDSEG_DATA_DIR to the clinic data folder}"',
              'export FEDSEG_DATA_DIR',
              'export FEDSEG_STATE_DIR="${FEDSEG_STATE_DIR:-$KIT/state}"',
              f'export FEDSEG_CLIENT_NAME="{name}"',
              'export FEDN_PACKAGE_EXTRACT_DIR=package',
              'cd "$KIT"',
              'exec "${FEDSEG_PYTHON:-python3}" -m fedseg.orchestration.fedn.launch client '
              '--init "$KIT/fedn-client.yaml"', ""]
    return "\n".join(lines)


def _readme(name: str, api_url: str, combiners: list[tuple[str, int]], tls: bool,
            expires_at: float) -> str:
    api = urlsplit(api_url)
    ports = [f"- {api.hostname} TCP {api.port} (API server, {'HTTPS' if tls else 'HTTP'})"]
    ports += [f"- {host} TCP {port} (combiner, gRPC{' over TLS' if tls else ''})"
              for host, port in combiners]
    expiry = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_at))
    return f"""# fedseg clinic kit: {name}

This folder lets the clinic "{name}" join the federation at {api_url}.

## Files

- `fedn-client.yaml`: the FEDn client settings with this clinic's token (keep it
  private: mode 0600, do not copy it anywhere else; it expires {expiry}).
- `ca.pem`: the federation's CA certificate; the client trusts the server only
  with it.{'' if tls else ' (absent: this network runs without TLS, on one machine only)'}
- `run-client.sh`: starts the client.

## Install (clinic machine)

1. Python 3.11 and fedseg with its pinned dependencies
   (`pip install -c constraints.txt -e .` in a fedseg checkout; this installs fedn 0.33.0
   and TensorFlow).
2. Put the imported CT cases (`fedseg data import`) in one data folder on this
   machine; it never leaves the machine. Only model updates and metrics are sent to
   the server. Optional training settings: a YAML named by FEDSEG_SETTINGS.
3. Start: `FEDSEG_DATA_DIR=/path/to/data sh run-client.sh` (set FEDSEG_PYTHON to the
   Python with fedseg if it is not `python3`). The client keeps its own state in
   `state/` next to this file (FEDSEG_STATE_DIR overrides). It downloads the compute
   package from the server and waits for training requests.
   At start it launches one helper process, the warm worker, that keeps TensorFlow
   and the model loaded between rounds; it listens only on a Unix socket (mode 0600)
   in `package/`, never on a network port, and stops when the client stops.

## Network

Only outgoing connections from this machine are needed:

{chr(10).join(ports)}

No incoming port has to be opened at the clinic.

## When something changes

The federation's operator can revoke this kit (`fedseg clinic revoke {name}`); the client
is then refused and stops. Ask the operator for a new kit.
"""
