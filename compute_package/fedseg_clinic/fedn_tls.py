"""TLS to a combiner on any port, verified against the network's CA (fedn bug 19).

fedn 0.33.0's ``GrpcHandler._init_channel`` opens a TLS channel only when the combiner's
port is 443, so a combiner serving TLS on its own port (12080) gets a plain-text
connection and the handshake fails. With ``$FEDN_GRPC_ROOT_CERT_PATH`` set (the CA
certificate of a network started on a reachable address; a clinic kit's ``ca.pem``),
:func:`tls_on_any_port` makes every channel TLS verified against that CA. Without the
variable fedn's behaviour is unchanged. The token is not part of the channel: callers
put it in the call metadata (the callback client and the package route's launcher do).

Lives in the compute package because both client routes need it: the callback client
(``fedseg_clinic.fedn_callback``) and the operator-side launcher of ``fedn client start``.
"""

from __future__ import annotations

import os
from typing import Any

#: Environment variable fedn's client reads the CA certificate of the combiners from.
GRPC_ROOT_CERT_ENV = "FEDN_GRPC_ROOT_CERT_PATH"


def tls_on_any_port() -> None:
    """Patch ``GrpcHandler._init_channel`` (idempotent); see the module doc."""
    import grpc
    from fedn.network.clients import grpc_handler

    handler = grpc_handler.GrpcHandler
    original = getattr(handler._init_channel, "__wrapped__", handler._init_channel)

    def _init_channel(self: Any, host: str, port: int, token: str) -> None:
        ca_path = os.environ.get(GRPC_ROOT_CERT_ENV)
        if not ca_path:
            original(self, host, port, token)
            return
        with open(ca_path, "rb") as ca_file:
            credentials = grpc.ssl_channel_credentials(ca_file.read())
        self.channel = grpc.secure_channel(f"{host}:{port}", credentials,
                                           options=grpc_handler.GRPC_OPTIONS)

    _init_channel.__wrapped__ = original  # type: ignore[attr-defined]
    handler._init_channel = _init_channel
