"""A long-lived FEDn callback client: one process per clinic, alive across rounds.

Run as::

    python -m fedseg_clinic.fedn_callback --api-url http://127.0.0.1:8092/ \
        --name clinic-1 --app fedseg_clinic.app:ClinicApp.from_environment

The app factory (``MODULE:FACTORY``, FACTORY may be dotted, e.g.
``ClinicApp.from_environment``) is called once at start and returns an object with
``train(weights, settings) -> (weights, metadata)`` and ``validate(weights) -> metrics``
(numpy weight lists). TensorFlow and the traced model therefore live across rounds,
unlike the package route where every call is a fresh process.

Why a subclass of ``fedn.FednClient``: in fedn 0.33.0 an exception raised by a train or
validate callback leaves the task-stream loop and kills the client process. Here the
failure is caught and reported instead, as a WARNING status whose text starts with
:data:`TRAIN_FAILED` / :data:`VALIDATE_FAILED` and whose data carries the round config,
so the round log can say which client failed in which round; the client stays
connected for the next round. The token (when auth is on) comes from
``$FEDSEG_CLIENT_TOKEN`` so it never shows in the process list. On a TLS network
(``https://`` API URL) the client verifies the server with the CA certificate named by
``$REQUESTS_CA_BUNDLE`` (HTTPS) and ``$FEDN_GRPC_ROOT_CERT_PATH`` (gRPC).

Exit codes: 0 stopped, 1 bad arguments or app start failed (one line on stderr),
2 could not register with the API.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

TRAIN_FAILED = "FEDSEG_TRAIN_FAILED"
VALIDATE_FAILED = "FEDSEG_VALIDATE_FAILED"
TOKEN_ENV = "FEDSEG_CLIENT_TOKEN"
KEEP_UPDATES_ENV = "FEDSEG_KEEP_UPDATES"
# 1/true: this clinic sends masked updates only (secure aggregation) and refuses a round
# whose settings carry no secure-aggregation request, e.g. when the server's hook failed.
REQUIRE_SECAGG_ENV = "FEDSEG_REQUIRE_SECURE_AGGREGATION"


class ClientApp(Protocol):
    """What the callback client needs from a clinic app."""

    def train(self, weights: list[np.ndarray], server_settings: dict[str, Any]
              ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """One round of local training."""

    def validate(self, weights: list[np.ndarray]) -> dict[str, float]:
        """Metrics of the global model on local validation data."""


def new_client_id() -> str:
    """A fresh client id for one client process.

    Why not one id per name: the combiner keeps one task queue per client id, and the
    task stream of a client that just stopped keeps taking tasks from it for up to a
    second (it polls with a 1 s timeout before it notices the closed connection). A
    new process under the same id then lost its first round's request (seen here: a
    second ``fedseg run`` on one network aggregated 0 updates in its round 1). A fresh
    id gets a fresh queue; sessions name the ids of their own clients.
    """
    return str(uuid.uuid4())


def normalise_api_url(url: str) -> str:
    """The API base URL with a scheme and a trailing "/" (fedn appends "api/v1/...")."""
    url = url.strip()
    if not url:
        raise FedsegError("--api-url: empty")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/") else f"{url}/"


def resolve_factory(spec: str) -> Callable[[], ClientApp]:
    """Import ``MODULE:FACTORY`` (FACTORY may be dotted) and return the callable.

    Raises:
        FedsegError: malformed spec, missing module or attribute, not callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise FedsegError(f"--app {spec!r}: expected MODULE:FACTORY")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FedsegError(f"--app {spec!r}: cannot import {module_name} ({exc})") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise FedsegError(f"--app {spec!r}: {module_name} has no {attr_path}") from None
    if not callable(target):
        raise FedsegError(f"--app {spec!r}: {attr_path} is not callable")
    return target


def _json_safe(metadata: dict[str, Any], where: str) -> dict[str, Any]:
    """Plain floats/ints/strings only (numpy scalars break json.dumps)."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, (np.generic,)):
            value = value.item()
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise FedsegError(f"{where}: metadata {key}={value!r} is not a number or string")
        out[str(key)] = value
    return out


class CallbackAdapter:
    """Turns an app's numpy interface into FEDn's BytesIO callbacks."""

    def __init__(self, app: ClientApp, keep_updates: Path | None = None,
                 require_secagg: bool = False) -> None:
        """Wrap ``app``.

        Args:
            app: The clinic app (train / validate on numpy weight lists).
            keep_updates: Folder to keep every update this client sends (its weights as
                ``update-<n>.npz`` and the training metadata as ``update-<n>.json``, n =
                1, 2, ... per training call), for attacking real rounds with
                ``fedseg attack invert``. None (the default) keeps nothing: an update
                is exactly what DP protects, so keeping it is a research opt-in.
            require_secagg: Refuse to send an update that is not masked.
        """
        from fedn.utils.helpers.helpers import get_helper

        self.app = app
        self.helper = get_helper("numpyhelper")
        self.keep_updates = keep_updates
        self.trained = 0
        # Set once connected: secure aggregation addresses clinics by their FEDn id.
        self.client_id: str | None = None
        self.secagg: Any = None
        self.require_secagg = require_secagg

    def train(self, in_model: io.BytesIO, client_settings: dict[str, Any]
              ) -> tuple[io.BytesIO, dict[str, Any]]:
        """FEDn train callback: model bytes + server settings -> model bytes + metadata."""
        in_model.seek(0)  # fedn hands over the buffer at its end
        weights = self.helper.load(in_model)
        settings = dict(client_settings or {})
        new_weights, metadata = self._train(weights, settings)
        metadata = _json_safe(dict(metadata), "train")
        if "num_examples" not in metadata:
            raise FedsegError("train: metadata lacks num_examples (FEDn weights by it)")
        from fedseg_clinic.model.npz import write_npz

        out = io.BytesIO()
        write_npz(new_weights, out)  # uncompressed: seconds less per round at large sizes
        out.seek(0)
        self.trained += 1
        if self.keep_updates is not None:
            self._keep(out.getvalue(), metadata, dict(client_settings or {}))
        return out, {"training_metadata": metadata}

    def _train(self, weights: list[np.ndarray], settings: dict[str, Any]
               ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """The app's training, wrapped in the secure-aggregation protocol when asked."""
        from fedseg_clinic.privacy.secagg_clinic import SETTINGS_KEY, SecAggClinic

        payload = settings.pop(SETTINGS_KEY, None)
        if payload is None:
            if self.require_secagg:
                raise FedsegError("this clinic requires secure aggregation and the round's "
                                  "settings carry no request: refusing to send a plain update")
            return self.app.train(weights, settings)
        if self.secagg is None:
            if not self.client_id:
                raise FedsegError("secure aggregation: this client's id is not known yet")
            self.secagg = SecAggClinic(self.client_id)
        contribute = None
        if callable(getattr(self.app, "distributed_dp", None)) and \
                self.app.distributed_dp(settings):
            def contribute(clinics: int) -> tuple[list[np.ndarray], dict[str, Any]]:
                return self.app.contribute(weights, settings, clinics)  # type: ignore[attr-defined]
        return self.secagg.handle(str(payload), weights,
                                  lambda: self.app.train(weights, settings), contribute)

    def _keep(self, update: bytes, metadata: dict[str, Any], settings: dict[str, Any]) -> None:
        """Write this call's update and its metadata atomically into keep_updates."""
        assert self.keep_updates is not None
        stem = self.keep_updates / f"update-{self.trained}"
        self.keep_updates.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stem.with_suffix(".npz"), update)
        record = {"call": self.trained, "training_metadata": metadata,
                  "server_settings": {k: v for k, v in settings.items()
                                      if isinstance(v, int | float | str | bool)}}
        atomic_write_json(stem.with_suffix(".json"), record)

    def validate(self, in_model: io.BytesIO) -> dict[str, Any]:
        """FEDn validate callback: model bytes -> flat metrics dict."""
        in_model.seek(0)
        weights = self.helper.load(in_model)
        metrics = _json_safe(dict(self.app.validate(weights)), "validate")
        # NaN means "organ not contoured here"; keep it, json carries NaN both ways.
        return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v) for k, v in metrics.items()}


def _make_fedn_client(adapter: CallbackAdapter) -> Any:
    """A FednClient that reports callback failures instead of dying (see module doc)."""
    import fedn.network.grpc.fedn_pb2 as fedn_pb2
    from fedn.network.clients.fedn_client import FednClient

    class ReportingFednClient(FednClient):
        def _report(self, prefix: str, request: Any, exc: BaseException) -> None:
            text = " ".join(str(exc).split()) or type(exc).__name__
            try:
                self.send_status(f"{prefix} {self.name}: {type(exc).__name__}: {text}",
                                 log_level=fedn_pb2.LogLevel.WARNING,
                                 type=request.type, request=request,
                                 session_id=request.session_id, sender_name=self.name)
            except Exception:  # the report is best effort; staying alive matters more
                logger.exception("could not report the failure to the combiner")

        def update_local_model(self, request: Any) -> None:
            try:
                super().update_local_model(request)
            except Exception as exc:
                logger.exception("train failed")
                self._report(TRAIN_FAILED, request, exc)

        def validate_global_model(self, request: Any) -> None:
            try:
                super().validate_global_model(request)
            except Exception as exc:
                logger.exception("validate failed")
                self._report(VALIDATE_FAILED, request, exc)

    return ReportingFednClient(train_callback=adapter.train,
                               validate_callback=adapter.validate)


def connect(client: Any, api_url: str, name: str, client_id: str, token: str | None,
            preferred_combiner: str | None, wait_s: float) -> Any:
    """Register with the API (retrying while it starts) and open the gRPC channel.

    Returns:
        The combiner connection options.

    Raises:
        FedsegError: refused (auth, bad URL, config) or no answer within ``wait_s``.
    """
    from fedn.network.clients.fedn_client import ConnectToApiResult

    client.set_name(name)
    client.set_client_id(client_id)
    # fedn's route reads combiner_preferred (bug 4); send both spellings.
    request = {"name": name, "client_id": client_id, "package": "local",
               "preferred_combiner": preferred_combiner or "",
               "combiner_preferred": preferred_combiner or ""}
    deadline = time.monotonic() + wait_s
    while True:
        result, answer = client.connect_to_api(api_url, token or "", request)
        if result == ConnectToApiResult.Assigned:
            break
        # UnMatchedConfig includes "No combiner available" while a combiner starts: retry.
        if result in (ConnectToApiResult.UnAuthorized, ConnectToApiResult.IncorrectUrl) \
                or time.monotonic() > deadline:
            raise FedsegError(f"{api_url}: client {name} not admitted ({result.name}: {answer})")
        time.sleep(1.0)
    config = answer
    # connect_to_api overwrote the id with the server's answer; keep ours.
    client.set_client_id(client_id)
    if not client.init_grpchandler(config=config, client_name=client_id, token=token or ""):
        raise FedsegError(f"{config.host}:{config.port}: cannot open the combiner channel")
    if token:
        # fedn only attaches tokens on TLS (port 443); a local plain channel needs this.
        client.grpc_handler.metadata.append(("authorization", f"Bearer {token}"))
    return config


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedseg_clinic.fedn_callback",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--api-url", required=True, help="FEDn API base URL")
    parser.add_argument("--name", required=True, help="client (clinic) name")
    parser.add_argument("--app", required=True, help="MODULE:FACTORY returning the app")
    parser.add_argument("--client-id", default=None,
                        help="client id (default: a fresh random one)")
    parser.add_argument("--combiner", default=None, help="preferred combiner name")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="written (JSON) once connected to the combiner")
    parser.add_argument("--connect-wait", type=float, default=60.0,
                        help="seconds to keep retrying the API at start")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def keep_updates_dir(environ: Mapping[str, str]) -> Path | None:
    """``$FEDSEG_STATE_DIR/updates`` when ``$FEDSEG_KEEP_UPDATES`` is 1/true, else None."""
    if environ.get(KEEP_UPDATES_ENV, "").lower() not in ("1", "true", "yes"):
        return None
    state = environ.get("FEDSEG_STATE_DIR")
    if not state:
        raise FedsegError(f"{KEEP_UPDATES_ENV} is set but FEDSEG_STATE_DIR is not")
    return Path(state) / "updates"


def main(argv: list[str] | None = None) -> int:
    """Start the app, connect, serve rounds until killed."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV) or None
    # A network on a reachable address: gRPC over TLS on the combiner's own port, verified
    # with $FEDN_GRPC_ROOT_CERT_PATH (HTTPS to the API verifies with $REQUESTS_CA_BUNDLE).
    from fedseg_clinic.fedn_tls import tls_on_any_port

    tls_on_any_port()
    try:
        api_url = normalise_api_url(args.api_url)
        factory = resolve_factory(args.app)
        tic = time.monotonic()
        app = factory()
        logger.info("app %s ready in %.1f s", args.app, time.monotonic() - tic)
        adapter = CallbackAdapter(app, keep_updates_dir(os.environ),
                                  os.environ.get(REQUIRE_SECAGG_ENV, "").lower()
                                  in ("1", "true", "yes"))
        client = _make_fedn_client(adapter)
    except FedsegError as exc:
        print(f"clinic_client: error: {exc}", file=sys.stderr)
        return 1
    try:
        config = connect(client, api_url, args.name, args.client_id or new_client_id(), token,
                         args.combiner, args.connect_wait)
    except FedsegError as exc:
        print(f"clinic_client: error: {exc}", file=sys.stderr)
        return 2
    adapter.client_id = client.client_id
    if args.ready_file is not None:
        from fedseg_clinic.io import atomic_write_text

        atomic_write_text(args.ready_file, json.dumps(
            {"name": args.name, "client_id": client.client_id, "pid": os.getpid(),
             "combiner": f"{config.host}:{config.port}", "time": time.time()}))
    logger.info("client %s serving rounds", args.name)
    # Telemetry (psutil every 5 s) costs CPU on a small machine and nobody reads it.
    client.run(with_telemetry=False, with_heartbeat=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
