"""``python -m fedseg.orchestration.fedn.launch api|combiner|hooks ...``.

The network starts this module instead of the ``fedn`` console script: it applies
:mod:`fedseg.orchestration.fedn.compat` in the new process, makes the server listen
on 127.0.0.1 only, and then calls fedn's own start function. fedn reads its store
settings from the files named by STATESTORE_CONFIG and MODELSTORAGE_CONFIG, which
the network sets in the environment.
"""

from __future__ import annotations

import argparse
import sys

from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg.orchestration.network.revocation import install_revocation_check

HOST = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedn_launch", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    api = sub.add_parser("api", help="fedn's API server (controller)")
    api.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    api.add_argument("--host", default=HOST, help="address to listen on")
    api.add_argument("--certfile", help="server certificate (PEM): serve HTTPS")
    api.add_argument("--keyfile", help="its private key (PEM)")
    api.add_argument("--request-timeout", type=int, default=fedn_compat.API_REQUEST_TIMEOUT_S,
                     help="seconds one request may take before gunicorn kills its worker")
    combiner = sub.add_parser("combiner", help="a fedn combiner")
    combiner.add_argument("--name", required=True)
    combiner.add_argument("--port", type=int, required=True)
    combiner.add_argument("--max-clients", type=int, default=30)
    combiner.add_argument("--host", default=HOST,
                          help="address to listen on and advertise to clients")
    combiner.add_argument("--init", help="fedn combiner YAML (secure, cert_path, key_path)")
    client = sub.add_parser("client", help="fedn's client (package route)")
    client.add_argument("--init", required=True,
                        help="fedn client config YAML (api_url, token, name, ...)")
    hooks = sub.add_parser("hooks", help="fedn's ServerFunctions hooks service")
    hooks.add_argument("--port", type=int, required=True)
    return parser


def run_api(workers: int, host: str = HOST, certfile: str | None = None,
            keyfile: str | None = None,
            request_timeout_s: int = fedn_compat.API_REQUEST_TIMEOUT_S) -> None:
    """Patch, then run fedn.network.api.server.start_server_api (blocks)."""
    fedn_compat.check_fedn_version()
    fedn_compat.check_sqlalchemy()
    fedn_compat.install_sql_coercion()
    fedn_compat.merge_round_combiners()
    fedn_compat.bound_report_wait()
    fedn_compat.skip_unavailable_combiners()
    fedn_compat.numeric_round_ids()  # bug 21
    fedn_compat.bind_api_server(host, workers, certfile, keyfile, request_timeout_s)
    fedn_compat.uncompressed_models()  # bug 23
    fedn_compat.sign_controller_calls()  # bug 18
    install_revocation_check()  # fedseg clinic revoke
    fedn_compat.shorten_round_polling()
    from fedn.network.api import server

    fedn_compat.install_client_add_alias(server.app)
    fedn_compat.require_token_everywhere(server.app)  # bug 14
    fedn_compat.refuse_empty_bearer(server.app)  # bug 17
    server.start_server_api()


def run_combiner(name: str, port: int, max_clients: int, host: str = HOST,
                 init: str | None = None) -> None:
    """Patch, then run fedn's ``combiner start`` command (blocks).

    ``init`` is fedn's own combiner YAML; the network passes one with ``secure: true``,
    ``cert_path`` and ``key_path`` for gRPC over TLS (fedn's command line has no
    options for the certificate files).
    """
    fedn_compat.check_fedn_version()
    fedn_compat.check_sqlalchemy()
    fedn_compat.install_sql_coercion()
    fedn_compat.merge_round_combiners()
    fedn_compat.bind_grpc_servers(host)
    fedn_compat.install_grpc_auth_guard()  # bug 16; after the binding wrapper
    fedn_compat.uncompressed_models()  # bug 23
    fedn_compat.close_controller_whitelist()  # bug 18
    install_revocation_check()  # fedseg clinic revoke
    fedn_compat.shorten_round_polling()
    from fedn.cli import main as fedn_main

    args = ["combiner", "start", "--name", name, "--host", host, "--port", str(port),
            "--max_clients", str(max_clients)]
    if init:
        args += ["--init", init]
    fedn_main(args=args, prog_name="fedn", standalone_mode=True)


def run_client(init: str) -> None:
    """Patch, then run fedn's ``client start --init FILE`` (the package route; blocks).

    The token is in FILE (mode 0600), never on the command line, and is attached to
    every gRPC call on the plain local channel (bug 15).
    """
    fedn_compat.check_fedn_version()
    fedn_compat.attach_grpc_token()
    fedn_compat.tls_on_any_port()  # bug 19
    fedn_compat.report_train_failures()  # bug 20
    fedn_compat.warm_dispatch()  # jobs to the package's warm worker, no process per call
    fedn_compat.uncompressed_models()  # bug 23
    from fedn.cli import main as fedn_main

    fedn_main(args=["client", "start", "--init", init], prog_name="fedn", standalone_mode=True)


def run_hooks(port: int) -> None:
    """Patch, then run fedn's hooks service (blocks); fedn hard-codes port 12081."""
    fedn_compat.check_fedn_version()
    fedn_compat.bind_grpc_servers(HOST, port)
    from fedn.network.combiner.hooks.hooks import serve

    serve()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parser().parse_args(argv)
    if args.role == "api":
        run_api(args.workers, args.host, args.certfile, args.keyfile, args.request_timeout)
    elif args.role == "combiner":
        run_combiner(args.name, args.port, args.max_clients, args.host, args.init)
    elif args.role == "client":
        run_client(args.init)
    else:
        run_hooks(args.port)


if __name__ == "__main__":
    main(sys.argv[1:])
