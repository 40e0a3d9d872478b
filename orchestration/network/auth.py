"""JWT tokens for a network with authentication on, minted locally with PyJWT.

fedn's API server checks ``Authorization: Bearer <jwt>`` signed with
FEDN_JWT_SECRET_KEY (HS256) and a ``role`` claim: "admin" for management
routes, "client" for client registration and package download; the combiners'
gRPC checks "client" on client calls and "controller" on the Control service.
Tokens carry ``exp`` (the network's token_lifetime_s). fedn's own token commands
call a hosted service, so we mint the tokens ourselves.
"""

from __future__ import annotations

import secrets
import time

import jwt

ALGORITHM = "HS256"  # fedn's default FEDN_JWT_ALGORITHM
# "controller": the API server's own calls to the combiners' Control service.
ROLES = ("admin", "client", "combiner", "controller")
MIN_SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh signing secret (64 hex characters = 32 bytes, as HS256 wants)."""
    return secrets.token_hex(MIN_SECRET_BYTES)


def mint_token(secret: str, role: str, subject: str = "fedseg",
               lifetime_s: float | None = None, jti: str | None = None) -> str:
    """Sign a token for ``role``.

    Args:
        secret: The network's FEDN_JWT_SECRET_KEY.
        role: "admin", "client", "combiner" or "controller".
        subject: Who holds it (the ``sub`` claim), e.g. a client name.
        lifetime_s: Seconds until it expires (negative: already expired, for tests);
            None = no expiry. The network always passes its token_lifetime_s.
        jti: Token id (the ``jti`` claim), by which a clinic's token is revoked.

    Returns:
        The encoded JWT.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"JWT secret must be at least {MIN_SECRET_BYTES} bytes")
    now = int(time.time())
    claims: dict[str, object] = {"role": role, "sub": subject, "iat": now}
    if lifetime_s is not None:
        claims["exp"] = now + int(lifetime_s)
    if jti is not None:
        claims["jti"] = jti
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def token_role(secret: str, token: str) -> str:
    """The role claim of a token signed with ``secret`` (raises jwt.InvalidTokenError)."""
    return str(jwt.decode(token, secret, algorithms=[ALGORITHM])["role"])
