"""Revoked tokens: a list the API server and the combiners check on every token.

Every clinic token carries a random ``jti`` claim. ``fedseg clinic revoke NAME`` adds
that clinic's jti to root/revoked-tokens.json (0600); the API server and the combiners
(started with FEDSEG_REVOKED_TOKENS naming that file) refuse a token whose jti is on
it, like a forged one ("Invalid token"), from the next request on: the file is read
again whenever its modification time or size changes. fedn decodes tokens with
``jwt.decode`` in ``fedn.network.api.auth`` (REST) and ``fedn.network.grpc.auth``
(gRPC); :func:`install_revocation_check` gives both modules a ``jwt`` whose decode
also checks the list.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import jwt

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_FILE, atomic_write_text

REVOKED_FILE = "revoked-tokens.json"
REVOKED_FILE_ENV = "FEDSEG_REVOKED_TOKENS"


def read_revoked(path: Path) -> dict[str, dict]:
    """Jti -> {"clinic", "revoked_at"} from ``path`` (empty when there is no file).

    Raises:
        FedsegError: The file exists but is not a revocation list.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{path}: unreadable revocation list ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("revoked"), dict):
        raise FedsegError(f"{path}: not a revocation list (no mapping 'revoked')")
    return data["revoked"]


def revoke(path: Path, jti: str, clinic: str) -> None:
    """Add ``jti`` to the list at ``path`` (atomic rewrite, mode 0600)."""
    revoked = read_revoked(path)
    revoked[jti] = {"clinic": clinic, "revoked_at": time.time()}
    atomic_write_text(Path(path), json.dumps({"revoked": revoked}, indent=2), PRIVATE_FILE)


class _RevocationList:
    """The revoked jtis in a file, re-read when the file changes (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._jtis: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def jtis(self) -> frozenset[str]:
        try:
            info = os.stat(self.path)
            stamp = (info.st_mtime, info.st_size)
        except FileNotFoundError:
            return frozenset()
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._jtis = frozenset(read_revoked(self.path))
                except FedsegError:
                    # A damaged list must not open the network: keep the last one read.
                    return self._jtis
                self._stamp = stamp
            return self._jtis


class RevocationAwareJwt:
    """Stands in for the ``jwt`` module in fedn's auth modules; decode checks the list."""

    def __init__(self, revocations: _RevocationList) -> None:
        self._revocations = revocations

    def __getattr__(self, name: str) -> Any:
        return getattr(jwt, name)  # exceptions, encode, ... as the real module

    def decode(self, token: str, *args: Any, **kwargs: Any) -> dict:
        """``jwt.decode``, then InvalidTokenError for a revoked ``jti``."""
        payload = jwt.decode(token, *args, **kwargs)
        if payload.get("jti") in self._revocations.jtis():
            raise jwt.InvalidTokenError("token revoked")
        return payload


def install_revocation_check(path: str | None = None) -> bool:
    """Make fedn's REST and gRPC token checks refuse revoked tokens.

    Args:
        path: The revocation list; default $FEDSEG_REVOKED_TOKENS.

    Returns:
        Whether a check was installed (False without a path).
    """
    path = path or os.environ.get(REVOKED_FILE_ENV)
    if not path:
        return False
    from fedn.network.api import auth as api_auth
    from fedn.network.grpc import auth as grpc_auth

    checker = RevocationAwareJwt(_RevocationList(Path(path)))
    api_auth.jwt = checker  # type: ignore[assignment]
    grpc_auth.jwt = checker  # type: ignore[assignment]
    return True
