"""One FEDn session: package + seed upload, per-round client settings, start, bounded wait.

fedn 0.33.0 specifics handled here:

- ``set_active_model`` fails until a package was uploaded, even for callback clients:
  :func:`upload_package_and_seed` always uploads the package first.
- Sessions are created and started through
  :func:`fedseg.orchestration.fedn.compat.start_session` (bug 5).
- The session config has no client-settings field: per-round settings travel through a
  ServerFunctions ``client_settings`` hook, whose *source code* is sent with the session
  (:func:`server_functions_source`). The hooks process keeps one ServerFunctions object
  while the code is unchanged, so a per-session nonce in the code resets its round
  counter for every session.
- A session may never finish (a client stuck, a server process gone): :func:`wait_session`
  is bounded.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from fedseg.orchestration.experiment import SessionSpec
from fedseg.orchestration.fedn import compat as fedn_compat
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_output, atomic_write_bytes

logger = logging.getLogger(__name__)

DONE_ROUND_STATES = ("Success", "Finished", "Failed", "Terminated")


def build_package(src: Path, out: Path) -> Path:
    """Pack a compute package folder (fedn.yaml inside, .fednignore honoured) as a tgz.

    Raises:
        FedsegError: no fedn.yaml in ``src``, or the archive could not be written.
    """
    from fedn.cli.package_cmd import create_tar_with_ignore

    if not (src / "fedn.yaml").is_file():
        raise FedsegError(f"{src}: not a compute package (no fedn.yaml)")
    try:
        with atomic_output(out) as tmp:
            # fedn's packer logs errors instead of raising: check the result ourselves.
            # It also logs every file at DEBUG, and fedn's logger is at DEBUG with its own
            # stderr handler from import on: quiet it for this call only.
            fedn_logger = logging.getLogger("fedn")
            level = fedn_logger.level
            fedn_logger.setLevel(max(level, logging.INFO))
            try:
                create_tar_with_ignore(str(src), str(tmp))
            finally:
                fedn_logger.setLevel(level)
            with tarfile.open(tmp, "r:gz") as tar:
                if "fedn.yaml" not in tar.getnames():
                    raise FedsegError(f"{src}: packing failed (no fedn.yaml in {out.name})")
    except (OSError, tarfile.TarError) as exc:
        raise FedsegError(f"{out}: cannot write the package ({exc})") from None
    return out


def _no_answer(path: Path, what: str) -> str:
    size_mb = path.stat().st_size / 2**20 if path.exists() else float("nan")
    return (f"{path}: {what} upload ({size_mb:.0f} MB) got no answer from the API server: "
            "its worker was stopped mid-request (see the network's logs/api.log; a large "
            "model needs a longer api_request_timeout_s)")


def upload_package_and_seed(api_client: Any, package: Path, seed: Path, name: str) -> str:
    """Upload the package, then the seed model; returns the seed's model id.

    Raises:
        FedsegError: the API refused either upload (its answer in the message).
    """
    try:
        answer = api_client.set_active_package(str(package), helper="numpyhelper", name=name)
    except ValueError:  # no JSON: the API worker was killed mid-request (bug 22)
        raise FedsegError(_no_answer(package, "package")) from None
    if "uploaded" not in str(answer.get("message", "")).lower() and not answer.get("success"):
        raise FedsegError(f"{package}: package upload refused: {answer}")
    try:
        answer = api_client.set_active_model(str(seed))
    except ValueError:
        raise FedsegError(_no_answer(seed, "seed model")) from None
    if not answer.get("success"):
        raise FedsegError(f"{seed}: seed model upload refused: {answer}")
    active = api_client.get_active_model()
    model_id = active.get("model_id") if isinstance(active, dict) else None
    if not model_id:
        raise FedsegError(f"{seed}: uploaded, but the API reports no active model: {active}")
    return str(model_id)


def server_functions_source(settings_by_round: list[dict[str, Any]], nonce: str) -> str:
    """Source of a ServerFunctions class that hands out round k's client settings.

    Args:
        settings_by_round: Settings of rounds 1..N (primitive values only); rounds
            beyond N (e.g. a continued session) keep the last entry.
        nonce: Unique per session, so the hooks process builds a fresh object.

    Returns:
        Python source for the hooks process (only fedn's allowed imports).
    """
    if not settings_by_round:
        raise ValueError("settings_by_round must not be empty")
    literal = json.dumps(settings_by_round, sort_keys=True, allow_nan=False)
    return (
        "from fedn.network.combiner.hooks.allowed_import import ServerFunctionsBase\n"
        "\n"
        f"# fedseg session {nonce}\n"
        "class ServerFunctions(ServerFunctionsBase):\n"
        "    def __init__(self):\n"
        f"        self.settings = {literal!r}\n"
        "        self.round = 0\n"
        "\n"
        "    def client_settings(self, global_model):\n"
        "        import json\n"
        "        table = json.loads(self.settings)\n"
        "        self.round += 1\n"
        "        return dict(table[min(self.round, len(table)) - 1])\n"
    )


def delegating_server_functions_source(kind: str, nonce: str, setup: list[str]) -> str:
    """Source of a ServerFunctions class that forwards both hooks to a fedseg server object.

    FedAvgM and secure aggregation run their logic in fedseg classes that the hooks
    process imports (it runs from fedseg's environment); the class FEDn loads only builds
    that object and hands ``client_settings`` and ``aggregate`` to it.

    Args:
        kind: Session kind, for the comment line (e.g. "fedavgm").
        nonce: Unique per session, so the hooks process builds a fresh object.
        setup: Lines of ``__init__`` (without indentation) that assign ``self.server``.

    Returns:
        Python source for the hooks process.
    """
    body = "".join(f"        {line}\n" for line in setup)
    return (
        "from fedn.network.combiner.hooks.allowed_import import ServerFunctionsBase\n"
        "\n"
        f"# fedseg {kind} session {nonce}\n"
        "class ServerFunctions(ServerFunctionsBase):\n"
        "    def __init__(self):\n"
        f"{body}"
        "\n"
        "    def client_settings(self, global_model):\n"
        "        return self.server.client_settings()\n"
        "\n"
        "    def aggregate(self, previous_global, client_updates):\n"
        "        return self.server.aggregate(previous_global, client_updates)\n"
    )


def start_session(api_client: Any, spec: SessionSpec, seed_model_id: str, name: str,
                  settings_by_round: list[dict[str, Any]] | None = None,
                  n_clients: int | None = None, available_wait_s: float = 30.0,
                  client_ids: list[str] | None = None,
                  secagg_journal: Path | None = None) -> str:
    """Create and start a session; returns its id.

    Args:
        api_client: fedn APIClient (admin token when auth is on).
        spec: Rounds, aggregator (+ kwargs), timeout, min clients, validate.
        seed_model_id: The model the first round starts from.
        name: Session name (unique per network: a nonce is added).
        settings_by_round: Per-round client settings (needs the hooks service), or None.
        n_clients: Clients asked per round (None = all connected).
        available_wait_s: How long to retry while the combiner reports fewer connected
            clients than ``spec.min_clients``.
        client_ids: Only these clients train (this run's own), or None for any.
        secagg_journal: With ``spec.secure_aggregation``: the file the server appends
            each round's secure-aggregation outcome to.
    """
    if spec.server_hook and not settings_by_round:
        what = "secure_aggregation" if spec.secure_aggregation else "aggregator: fedavgm"
        raise FedsegError(f"session.{what} needs the hooks service (network up with hooks)")
    deadline = time.monotonic() + available_wait_s
    while True:
        nonce = uuid.uuid4().hex[:8]
        if spec.secure_aggregation:
            from fedseg.orchestration import secure_aggregation

            source = secure_aggregation.server_functions_source(settings_by_round, nonce,
                                                                secagg_journal)
        elif spec.aggregator == "fedavgm":
            from fedseg.orchestration import server_momentum

            kw = spec.aggregator_kwargs
            source = server_momentum.server_functions_source(
                settings_by_round, nonce,
                kw.get("learning_rate", server_momentum.DEFAULT_LEARNING_RATE),
                kw.get("momentum", server_momentum.DEFAULT_MOMENTUM))
        else:
            source = (server_functions_source(settings_by_round, nonce)
                      if settings_by_round else None)
        try:
            session_id = fedn_compat.start_session(
                api_client, spec.rounds, model_id=seed_model_id, name=f"{name}-{nonce}",
                # fedavgm is FEDn's fedavg with the aggregate hook above.
                aggregator="fedavg" if spec.aggregator == "fedavgm" else spec.aggregator,
                aggregator_kwargs=(None if spec.aggregator == "fedavgm"
                                   else spec.aggregator_kwargs or None),
                round_timeout=spec.round_timeout, min_clients=spec.min_clients,
                requested_clients=n_clients, validate=spec.validate, server_functions=source,
                client_ids=client_ids)
            break
        except FedsegError as exc:
            # A client counts as available once its task stream is open, a moment after
            # it registered; the refused session stays behind as "Created" (harmless).
            if "available clients" not in str(exc) or time.monotonic() > deadline:
                raise
            logger.info("not enough clients on the combiner yet; retrying")
            time.sleep(2.0)
    logger.info("session %s started (%d rounds, %s)", session_id, spec.rounds, spec.aggregator)
    return session_id


def session_status(api_client: Any, session_id: str) -> str:
    """The session's status ("Started", "Finished", ...); "" when the API does not answer."""
    try:
        answer = api_client.get_session(session_id)
    except (requests.RequestException, ValueError) as exc:  # transient: poll again
        logger.debug("get_session failed: %s", exc)
        return ""
    return str(answer.get("status", "")) if isinstance(answer, dict) else ""


def wait_session(api_client: Any, session_id: str, timeout_s: float,
                 on_poll: Callable[[], None] | None = None, poll_s: float = 1.0) -> str:
    """Poll until the session finishes, calling ``on_poll`` after every poll.

    Returns:
        The last status seen ("Finished" normally).

    Raises:
        FedsegError: not finished within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last_answer = time.monotonic()
    while True:
        status = session_status(api_client, session_id)
        if status:
            last_answer = time.monotonic()
        if on_poll is not None:
            on_poll()
        if status.lower() in ("finished", "terminated"):
            return status
        if time.monotonic() > deadline:
            silent_s = time.monotonic() - last_answer
            if silent_s > 10 * poll_s:
                # Blame what failed: a dead API server is not the combiner's fault.
                raise FedsegError(f"session {session_id} not finished after "
                                  f"{timeout_s:.0f} s: the API server has not answered "
                                  f"for {silent_s:.0f} s (down?); see the API server log")
            raise FedsegError(f"session {session_id} not finished after {timeout_s:.0f} s "
                              f"(status {status or 'unknown'}); see the combiner log")
        time.sleep(poll_s)


def terminate_session(api_client: Any, session_id: str) -> bool:
    """Ask fedn to end a session now; True when the API took it.

    fedn 0.33.0's controller checks the session status while it waits for a round's
    combiners (every 1-2 s) and before each round: "Terminated" ends the waiting round
    (status "Terminated", no model) and the session, instead of waiting out the round
    timeout.
    """
    url = api_client._get_url_api_v1(f"sessions/{session_id}")
    try:
        answer = requests.patch(url, json={"status": "Terminated"}, headers=api_client.headers,
                                verify=api_client.verify, timeout=30)
    except requests.RequestException as exc:
        logger.warning("could not terminate session %s: %s", session_id, exc)
        return False
    if answer.status_code != 200:
        logger.warning("could not terminate session %s: HTTP %d %s", session_id,
                       answer.status_code, answer.text.strip()[:200])
        return False
    return True


def session_timeout(spec: SessionSpec, slack_s: float = 60.0) -> float:
    """A bound for a whole session: every round may use its timeout, plus validation."""
    return spec.rounds * (2.0 * spec.round_timeout + 10.0) + slack_s


def download_model(api_client: Any, model_id: str, out: Path, attempts: int = 3) -> Path:
    """Download a global model to ``out`` (atomically), retrying transient failures."""
    url = api_client._get_url_api_v1(f"models/{model_id}/download")
    problem = ""
    for attempt in range(attempts):
        try:
            answer = requests.get(url, headers=api_client.headers, timeout=60,
                                  verify=api_client.verify)
        except requests.RequestException as exc:
            problem = str(exc)
        else:
            if answer.status_code == 200:
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out, answer.content)
                return out
            problem = f"HTTP {answer.status_code} {answer.text.strip()[:200]}"
        time.sleep(0.5 * (attempt + 1))
    raise FedsegError(f"model {model_id}: download failed ({problem})")
