"""fedn API answers -> round log rows (:class:`fedseg.orchestration.runlog.RoundRecord`).

Where fedn 0.33.0 keeps what a round produced:

- training metadata (epsilon, train_loss, ...): ``get_statuses(session_id)`` entries of
  type MODEL_UPDATE, level AUDIT, text "Model update completed."; ``data`` is the
  ModelUpdate as JSON, whose ``meta`` is a JSON string holding ``training_metadata`` and
  ``config`` (the round config as JSON, with the global ``round_id``);
- failures our callback client reports: WARNING statuses whose text starts with
  ``FEDSEG_TRAIN_FAILED`` / ``FEDSEG_VALIDATE_FAILED``; ``data`` is the TaskRequest;
- validations: ``get_validations()`` entries (``data`` a JSON string of the metrics,
  ``sender.name`` the client). With the SQL stores the session filter is ignored, so
  they are kept only when their ``model_id`` is one of this session's models;
- rounds: ``get_rounds()``; round ids are global across sessions, so a session's rounds
  are those whose ``round_config.session_id`` matches, numbered 1..N by round id.

A round that committed no global model is a **failed round**, whatever its clients did:
``round_failed`` 1 in the log, ``updates_aggregated`` 0 (the combiners' own count stays
in ``updates_received``), and one failure entry (client ``global``, task ``round``) with
its cause (:func:`round_failure_cause`): a combiner died, the clients failed, or no update
came within the round timeout.

Everything here except :func:`collect_session` is a pure function of those answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from fedseg.orchestration.runlog import GLOBAL, RoundRecord
from fedseg_clinic.fedn_callback import TRAIN_FAILED, VALIDATE_FAILED

logger = logging.getLogger(__name__)

UPDATE_DONE_TEXT = "Model update completed."
# Training metadata keys that are bookkeeping, not metrics.
_SKIP_META = frozenset({"config", "trainable", "dp_optimizer",  # non-numeric
                        "dp_mode", "dp_mechanism", "trust"})


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    """One round of a session, as the API reports it.

    Attributes:
        index: 1-based round number within the session.
        round_id: fedn's global round id.
        status: fedn's round status ("Finished", "Failed", ...).
        model_id: The global model this round committed ("" when none).
        seconds: Wall time from the round's creation to its last update (1 s resolution).
        exec_training_s: Combiner time from request to aggregation start (waits included).
        combination_s: Combiner aggregation time.
        expected_updates: Updates the combiner asked for.
        aggregated_updates: Updates it aggregated.
    """

    index: int
    round_id: str
    status: str
    model_id: str
    seconds: float
    exec_training_s: float
    combination_s: float
    expected_updates: float
    aggregated_updates: float


@dataclasses.dataclass
class SessionLog:
    """Everything collected for one session.

    Attributes:
        rounds: The session's rounds.
        records: Round log rows.
        failures: [{round, client, task, error}]: clients' train/validate failures and,
            for rounds without a model, one entry with client "global", task "round".
        causes: Round index -> why it committed no model (failed rounds only).
    """

    rounds: list[RoundInfo]
    records: list[RoundRecord]
    failures: list[dict[str, Any]]
    causes: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def model_ids(self) -> dict[int, str]:
        """Round index -> global model id (rounds that produced one)."""
        return {r.index: r.model_id for r in self.rounds if r.model_id}


def _json(text: Any) -> dict[str, Any]:
    """A dict from a JSON string (or a dict already); {} for anything else."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _result(answer: Any) -> list[dict[str, Any]]:
    """The ``result`` list of an API answer (lists pass through)."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("result"), list):
        return answer["result"]
    return []


def http_time(text: Any) -> float | None:
    """Unix time of fedn's "Thu, 26 Nov 2026 16:11:25 GMT" stamps (None if unparsable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def model_chain(models: Any, seed_model_id: str) -> list[str]:
    """The session's global models in order: first committed, its child, ...

    ``get_models(session_id=...)`` lists them unordered, the first one's parent is None
    (not the seed) in fedn 0.33.0, and round records hold the combiner-level model id,
    not the committed global one: so the chain is rebuilt from the parent links.
    """
    items = [m for m in _result(models) if m.get("model_id")]
    ids = {str(m["model_id"]) for m in items}
    child: dict[str, str] = {}
    roots: list[dict[str, Any]] = []
    for item in items:
        parent = item.get("parent_model")
        if parent and str(parent) in ids:
            child[str(parent)] = str(item["model_id"])
        else:
            roots.append(item)
    if not roots:
        return []
    # Normally one root; prefer the seed's child, else the earliest committed.
    roots.sort(key=lambda m: (str(m.get("parent_model")) != seed_model_id,
                              http_time(m.get("committed_at")) or 0.0))
    chain = [str(roots[0]["model_id"])]
    while chain[-1] in child and len(chain) <= len(items):
        chain.append(child[chain[-1]])
    return chain


def session_rounds(rounds: Any, session_id: str, chain: list[str] | None = None
                   ) -> list[RoundInfo]:
    """This session's rounds, numbered 1..N in round-id order.

    Args:
        rounds: ``get_rounds()`` answer (all sessions).
        session_id: The session.
        chain: The session's global models in order (:func:`model_chain`); each round
            that succeeded committed the next one.
    """
    mine = [r for r in _result(rounds)
            if _json(r.get("round_config")).get("session_id") == session_id]
    mine.sort(key=lambda r: int(r.get("round_id", 0)))
    infos = []
    committed = 0
    for index, raw in enumerate(mine, start=1):
        combiners = raw.get("combiners") or []
        model_id = ""
        if str(raw.get("status")) in ("Success", "Finished") and chain:
            model_id = chain[committed] if committed < len(chain) else ""
            committed += 1
        exec_s = sum(_float(c.get("time_exec_training")) for c in combiners) if combiners \
            else math.nan
        data = [c.get("data") or {} for c in combiners]
        start, end = http_time(raw.get("committed_at")), http_time(raw.get("updated_at"))
        infos.append(RoundInfo(
            index=index,
            round_id=str(raw.get("round_id")),
            status=str(raw.get("status", "")),
            model_id=model_id,
            seconds=(end - start) if start is not None and end is not None else math.nan,
            exec_training_s=exec_s,
            combination_s=sum(_float(d.get("time_combination")) for d in data) if data
            else math.nan,
            expected_updates=sum(_float(d.get("nr_expected_updates")) for d in data) if data
            else math.nan,
            aggregated_updates=sum(_float((d.get("aggregation_time") or {})
                                          .get("nr_aggregated_models")) for d in data)
            if data else math.nan,
        ))
    return infos


def training_updates(statuses: Any, round_index: dict[str, int]
                     ) -> dict[tuple[int, str], dict[str, float]]:
    """(round, client) -> training metadata, from AUDIT MODEL_UPDATE statuses.

    Args:
        statuses: ``get_statuses(session_id=...)`` answer.
        round_index: fedn round id -> session round number.
    """
    out: dict[tuple[int, str], dict[str, float]] = {}
    for status in _result(statuses):
        if status.get("type") != "MODEL_UPDATE" or status.get("log_level") != "AUDIT":
            continue
        if status.get("status") != UPDATE_DONE_TEXT:
            continue
        update = _json(status.get("data"))
        meta = _json(update.get("meta"))
        round_id = str(_json(meta.get("config")).get("round_id", ""))
        client = (status.get("sender") or {}).get("name") or \
            (update.get("sender") or {}).get("name")
        if round_id not in round_index or not client:
            continue
        values = {k: _float(v) for k, v in _json(meta.get("training_metadata")).items()
                  if k not in _SKIP_META}
        # fedn's own timing of the callback, as seen by the client process.
        values["client_processing_seconds"] = _float(meta.get("processing_time"))
        out[(round_index[round_id], str(client))] = values
    return out


def reported_failures(statuses: Any, round_index: dict[str, int],
                      model_round: dict[str, int]) -> list[dict[str, Any]]:
    """Failures our clients reported: [{round, client, task, error}]."""
    out = []
    for status in _result(statuses):
        text = str(status.get("status", ""))
        if not text.startswith((TRAIN_FAILED, VALIDATE_FAILED)):
            continue
        request = _json(status.get("data"))
        client = (status.get("sender") or {}).get("name")
        if text.startswith(TRAIN_FAILED):
            task = "train"
            k = round_index.get(str(_json(request.get("data")).get("round_id", "")))
        else:
            task = "validate"
            k = model_round.get(str(request.get("modelId", "")))
        if k is None or not client:
            continue
        error = text.split(": ", 1)[1] if ": " in text else text
        out.append({"round": k, "client": str(client), "task": task, "error": error})
    return out


def validation_metrics(validations: Any, model_round: dict[str, int]
                       ) -> dict[tuple[int, str], dict[str, float]]:
    """(round, client) -> validation metrics of that round's global model."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    for item in _result(validations):
        k = model_round.get(str(item.get("model_id", "")))
        client = (item.get("sender") or {}).get("name")
        if k is None or not client:
            continue
        out[(k, str(client))] = {key: _float(v) for key, v in _json(item.get("data")).items()}
    return out


def _weighted_nanmean(values: list[tuple[float, float]]) -> float:
    """Mean of (value, weight) pairs, ignoring NaN values; NaN when nothing is left."""
    pairs = [(v, w if math.isfinite(w) and w > 0 else 1.0) for v, w in values
             if not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def round_failure_cause(info: RoundInfo, clients: list[str],
                        updates: dict[tuple[int, str], dict[str, float]],
                        failures: list[dict[str, Any]],
                        dead_combiners: Iterable[str] = ()) -> str | None:
    """Why a round committed no global model; None when it committed one.

    In order: a combiner that is not running any more (its clients' updates never reach
    the global model, whatever they did); every client reported a training failure; no
    update at all (some clients silent: down, crashed or slower than the round
    timeout); updates arrived but no model was committed.
    """
    if info.model_id:
        return None
    dead = sorted(dead_combiners)
    if dead:
        return (f"combiner died ({', '.join(dead)}): no global model committed (round "
                f"status {info.status or 'unknown'})")
    k = info.index
    sent = [c for c in clients if (k, c) in updates]
    reported = {f["client"]: f["error"] for f in failures
                if f["round"] == k and f["task"] == "train"}
    if not sent and clients and all(c in reported for c in clients):
        detail = "; ".join(f"{c}: {reported[c]}" for c in clients)
        return f"clients failed: every client reported a training failure ({detail})"
    if not sent:
        silent = [c for c in clients if c not in reported]
        text = f"timeout: no update arrived within the round timeout (silent: {', '.join(silent)}"
        if reported:
            text += f"; failed: {', '.join(sorted(reported))}"
        return text + ")"
    return (f"no global model committed although {len(sent)} update(s) arrived "
            f"({', '.join(sent)}; round status {info.status or 'unknown'})")


def build_records(rounds: list[RoundInfo],
                  updates: dict[tuple[int, str], dict[str, float]],
                  validations: dict[tuple[int, str], dict[str, float]],
                  failures: list[dict[str, Any]],
                  clients: Iterable[str],
                  dead_combiners: Iterable[str] = (),
                  ) -> tuple[list[RoundRecord], list[dict[str, Any]], dict[int, str]]:
    """Round log rows, the full failure list and the causes of failed rounds.

    Per client and round: its training metadata, its validation metrics and
    ``train_failed`` (1 when it sent no update: reported failure, crash or timeout).
    Per round (client "global"): ``round_failed`` (1 when no global model was committed),
    round_seconds, combiner times, updates expected / received (by the combiners) /
    aggregated (into the global model: 0 in a failed round), and the n_val-weighted
    mean of each validation metric.

    Args:
        rounds: The session's rounds (:func:`session_rounds`).
        updates: (round, client) -> training metadata (:func:`training_updates`).
        validations: (round, client) -> validation metrics.
        failures: Reported client failures (:func:`reported_failures`).
        clients: The clients that take part.
        dead_combiners: Combiners found not running: a round without a model is then
            attributed to them, not to the clients.

    Returns:
        (records, failures, causes): failures adds "no update" entries for silent
        clients and one "round" entry per failed round; causes maps failed rounds to
        :func:`round_failure_cause`.
    """
    clients = list(clients)
    dead_combiners = list(dead_combiners)
    records: list[RoundRecord] = []
    all_failures = list(failures)
    causes: dict[int, str] = {}
    reported = {(f["round"], f["client"]) for f in failures if f["task"] == "train"}
    for info in rounds:
        k = info.index
        cause = round_failure_cause(info, clients, updates, failures, dead_combiners)
        if cause is not None:
            causes[k] = cause
            all_failures.append({"round": k, "client": GLOBAL, "task": "round",
                                 "error": cause})
        for metric, value in (("round_failed", 0.0 if cause is None else 1.0),
                              ("round_seconds", info.seconds),
                              ("round_exec_training_seconds", info.exec_training_s),
                              ("round_combination_seconds", info.combination_s),
                              ("updates_expected", info.expected_updates),
                              ("updates_received", info.aggregated_updates),
                              ("updates_aggregated",
                               info.aggregated_updates if cause is None else 0.0)):
            records.append(RoundRecord(k, GLOBAL, metric, value))
        metric_names: set[str] = set()
        for client in clients:
            meta = updates.get((k, client))
            if meta is not None:
                records.extend(RoundRecord(k, client, m, v) for m, v in meta.items())
            failed = meta is None
            records.append(RoundRecord(k, client, "train_failed", 1.0 if failed else 0.0))
            if failed and (k, client) not in reported:
                why = ("the round's combiner died" if dead_combiners and cause
                       else "client down, crashed or too slow for the round timeout")
                all_failures.append({"round": k, "client": client, "task": "train",
                                     "error": f"no update ({why})"})
            vals = validations.get((k, client), {})
            records.extend(RoundRecord(k, client, m, v) for m, v in vals.items())
            metric_names.update(vals)
        for metric in sorted(metric_names):
            if metric == "n_val":
                continue
            pairs = [(validations[(k, c)].get(metric, math.nan),
                      validations[(k, c)].get("n_val", 1.0))
                     for c in clients if (k, c) in validations]
            records.append(RoundRecord(k, GLOBAL, metric, _weighted_nanmean(pairs)))
    all_failures.sort(key=lambda f: (f["round"], f["client"], f["task"]))
    return records, all_failures, causes


def assemble(rounds_answer: Any, models_answer: Any, statuses_answer: Any,
             validations_answer: Any, session_id: str, seed_model_id: str,
             clients: Iterable[str], dead_combiners: Iterable[str] = ()) -> SessionLog:
    """All pure steps together: API answers (+ dead combiners) -> :class:`SessionLog`."""
    infos = session_rounds(rounds_answer, session_id, model_chain(models_answer, seed_model_id))
    round_index = {r.round_id: r.index for r in infos}
    model_round = {r.model_id: r.index for r in infos if r.model_id}
    updates = training_updates(statuses_answer, round_index)
    vals = validation_metrics(validations_answer, model_round)
    failures = reported_failures(statuses_answer, round_index, model_round)
    records, failures, causes = build_records(infos, updates, vals, failures, clients,
                                              dead_combiners)
    return SessionLog(rounds=infos, records=records, failures=failures, causes=causes)


def shift_log(log: SessionLog, offset: int) -> SessionLog:
    """The same log with every round number moved up by ``offset``.

    A resumed run's new session numbers its rounds 1..R; in the run's log they follow the
    ``offset`` rounds logged before the interruption.
    """
    if offset == 0:
        return log
    return SessionLog(
        rounds=[dataclasses.replace(r, index=r.index + offset) for r in log.rounds],
        records=[dataclasses.replace(r, round=r.round + offset) for r in log.records],
        failures=[{**f, "round": f["round"] + offset} for f in log.failures],
        causes={k + offset: c for k, c in log.causes.items()})


def _get(call: Any, what: str, attempts: int = 5) -> Any:
    """Call the API, retrying its transient 500s (e.g. GET /rounds/ while a round runs)."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            answer = call()
            if isinstance(answer, dict) and "result" not in answer and "message" in answer:
                raise RuntimeError(str(answer["message"]))
            return answer
        except (requests.RequestException, ValueError, RuntimeError) as exc:  # 500 pages
            last = exc
            time.sleep(0.5 * (attempt + 1))
    logger.warning("%s failed after %d tries: %s", what, attempts, last)
    return {"result": []}


def collect_session(api_client: Any, session_id: str, seed_model_id: str,
                    clients: Iterable[str], dead_combiners: Iterable[str] = ()
                    ) -> SessionLog:
    """Read this session's rounds, models, updates, failures and validations.

    Args:
        api_client: fedn APIClient.
        session_id: The session.
        seed_model_id: The model the session started from.
        clients: The client names that take part (rows for each, even silent ones).
        dead_combiners: Combiners the caller found not running (failed rounds are
            attributed to them).
    """
    return assemble(
        _get(api_client.get_rounds, "get_rounds"),
        _get(lambda: api_client.get_models(session_id=session_id), "get_models"),
        _get(lambda: api_client.get_statuses(session_id=session_id), "get_statuses"),
        _get(api_client.get_validations, "get_validations"),
        session_id, seed_model_id, clients, dead_combiners)
