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

Everything here except :func:`collect_session` and :class:`SessionCollector` is a pure
function of those answers.

Polling during a session is incremental (:class:`SessionCollector`): each list route is
read newest first, a page at a time, only until every item the route counts is known;
rounds not yet over are re-read by id. A poll's HTTP and JSON work is then bounded by
what is new, not by the rounds done so far (a full re-read per poll made the runner's
memory and round time grow with the round count; bench/bench_soak.py). The last poll of
a session re-reads everything (:meth:`SessionCollector.collect` with ``full=True``), so
the final round log does not depend on the incremental bookkeeping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
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


def update_of(status: dict[str, Any]) -> tuple[str, str, dict[str, float]] | None:
    """(fedn round id, client, training metadata) of a completed-update status, else None."""
    if status.get("type") != "MODEL_UPDATE" or status.get("log_level") != "AUDIT":
        return None
    if status.get("status") != UPDATE_DONE_TEXT:
        return None
    update = _json(status.get("data"))
    meta = _json(update.get("meta"))
    round_id = str(_json(meta.get("config")).get("round_id", ""))
    client = (status.get("sender") or {}).get("name") or \
        (update.get("sender") or {}).get("name")
    if not round_id or not client:
        return None
    values = {k: _float(v) for k, v in _json(meta.get("training_metadata")).items()
              if k not in _SKIP_META}
    # fedn's own timing of the callback, as seen by the client process.
    values["client_processing_seconds"] = _float(meta.get("processing_time"))
    return round_id, str(client), values


def training_updates(statuses: Any, round_index: dict[str, int]
                     ) -> dict[tuple[int, str], dict[str, float]]:
    """(round, client) -> training metadata, from AUDIT MODEL_UPDATE statuses.

    Args:
        statuses: ``get_statuses(session_id=...)`` answer.
        round_index: fedn round id -> session round number.
    """
    out: dict[tuple[int, str], dict[str, float]] = {}
    for status in _result(statuses):
        parsed = update_of(status)
        if parsed is None or parsed[0] not in round_index:
            continue
        out[(round_index[parsed[0]], parsed[1])] = parsed[2]
    return out


def failure_of(status: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """(task, fedn round id or model id, client, error) of a reported failure, else None.

    The key is the round id for a training failure, the model id for a validation one.
    """
    text = str(status.get("status", ""))
    if not text.startswith((TRAIN_FAILED, VALIDATE_FAILED)):
        return None
    request = _json(status.get("data"))
    client = (status.get("sender") or {}).get("name")
    if not client:
        return None
    error = text.split(": ", 1)[1] if ": " in text else text
    if text.startswith(TRAIN_FAILED):
        return "train", str(_json(request.get("data")).get("round_id", "")), str(client), error
    return "validate", str(request.get("modelId", "")), str(client), error


def _failure_rows(parsed: Iterable[tuple[str, str, str, str]], round_index: dict[str, int],
                  model_round: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for task, key, client, error in parsed:
        k = (round_index if task == "train" else model_round).get(key)
        if k is not None:
            out.append({"round": k, "client": client, "task": task, "error": error})
    return out


def reported_failures(statuses: Any, round_index: dict[str, int],
                      model_round: dict[str, int]) -> list[dict[str, Any]]:
    """Failures our clients reported: [{round, client, task, error}]."""
    parsed = (failure_of(s) for s in _result(statuses))
    return _failure_rows((f for f in parsed if f is not None), round_index, model_round)


def validation_of(item: dict[str, Any]) -> tuple[str, str, dict[str, float]] | None:
    """(model id, client, metrics) of a validation, else None."""
    client = (item.get("sender") or {}).get("name")
    if not client:
        return None
    return (str(item.get("model_id", "")), str(client),
            {key: _float(v) for key, v in _json(item.get("data")).items()})


def validation_metrics(validations: Any, model_round: dict[str, int]
                       ) -> dict[tuple[int, str], dict[str, float]]:
    """(round, client) -> validation metrics of that round's global model."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    for item in _result(validations):
        parsed = validation_of(item)
        if parsed is None or parsed[0] not in model_round:
            continue
        out[(model_round[parsed[0]], parsed[1])] = parsed[2]
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
                        dead_combiners: Iterable[str] = (),
                        ended: Mapping[int, str] | None = None) -> str | None:
    """Why a round committed no global model; None when it committed one.

    In order: the runner ended the session during this round (``ended``: round -> why,
    e.g. a clinic refused the round for its privacy budget); a combiner that is not
    running any more (its clients' updates never reach the global model, whatever they
    did); every client reported a training failure; no
    update at all (some clients silent: down, crashed or slower than the round
    timeout); updates arrived but no model was committed.
    """
    if info.model_id:
        return None
    if ended and info.index in ended:
        return ended[info.index]
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
                  ended: Mapping[int, str] | None = None,
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
        ended: Round -> why the runner ended the session during it (its cause).

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
        cause = round_failure_cause(info, clients, updates, failures, dead_combiners, ended)
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
                if ended and k in ended and cause:
                    why = "the session was ended during the round"
                elif dead_combiners and cause:
                    why = "the round's combiner died"
                else:
                    why = "client down, crashed or too slow for the round timeout"
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
             clients: Iterable[str], dead_combiners: Iterable[str] = (),
             ended: Mapping[int, str] | None = None) -> SessionLog:
    """All pure steps together: API answers (+ dead combiners) -> :class:`SessionLog`."""
    infos = session_rounds(rounds_answer, session_id, model_chain(models_answer, seed_model_id))
    round_index = {r.round_id: r.index for r in infos}
    model_round = {r.model_id: r.index for r in infos if r.model_id}
    updates = training_updates(statuses_answer, round_index)
    vals = validation_metrics(validations_answer, model_round)
    failures = reported_failures(statuses_answer, round_index, model_round)
    records, failures, causes = build_records(infos, updates, vals, failures, clients,
                                              dead_combiners, ended)
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


# Round states after which fedn changes a round no more ("Success" is followed by the
# round's data and "Finished").
FINAL_ROUND_STATES = ("Finished", "Failed", "Terminated")
FIRST_PAGE = 10  # most polls find nothing or one round's worth of new items
PAGE = 100
HTTP_TIMEOUT_S = 30.0


def _key(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    return str(value) if value else json.dumps(item, sort_keys=True, default=str)


class NewestFirst:
    """One fedn list route, read newest first, a page at a time.

    :meth:`update` stops as soon as the items known reach the route's ``count`` (or the
    list ends): a poll that finds nothing new costs one request for ``FIRST_PAGE``
    items. Items inserted while paging push older ones down a page, so they are seen
    twice (and kept once), never missed. fedn 0.33.0 never deletes these rows.

    Attributes:
        items: Kept items by key, in the order first seen (those ``keep`` accepts and
            ``on_new`` does not consume).
        requests: HTTP requests made so far.
    """

    def __init__(self, fetch: Callable[[int, int], Any], what: str, key: str,
                 keep: Callable[[dict[str, Any]], bool] | None = None,
                 on_new: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``fetch(limit, skip)`` answers ``{"count": n, "result": [...]}``.

        ``on_new`` (instead of keeping) is handed every new item ``keep`` accepts.
        """
        self.fetch = fetch
        self.what = what
        self.key = key
        self.keep = keep
        self.on_new = on_new
        self.known: set[str] = set()
        self.items: dict[str, dict[str, Any]] = {}
        self.requests = 0

    def update(self) -> None:
        """Read until every item the route counts is known."""
        skip, limit = 0, FIRST_PAGE
        while True:
            answer = _get(lambda limit=limit, skip=skip: self.fetch(limit, skip), self.what)
            self.requests += 1
            page = _result(answer)
            for item in page:
                k = _key(item, self.key)
                if k in self.known:
                    continue
                self.known.add(k)
                if self.keep is None or self.keep(item):
                    if self.on_new is not None:
                        self.on_new(item)
                    else:
                        self.items[k] = item
            count = answer.get("count") if isinstance(answer, dict) else None
            if len(page) < limit or (isinstance(count, int) and len(self.known) >= count):
                return
            skip += len(page)
            limit = PAGE


def _keeps_status(status: dict[str, Any]) -> bool:
    """The statuses the round log reads: completed updates and our clients' failures."""
    text = str(status.get("status", ""))
    return (status.get("type") == "MODEL_UPDATE" and status.get("log_level") == "AUDIT"
            and text == UPDATE_DONE_TEXT) or text.startswith((TRAIN_FAILED, VALIDATE_FAILED))


class SessionCollector:
    """Collects one session's log poll after poll, reading and assembling only what is new.

    Reading: rounds, models, statuses (of this session) and validations are each a
    :class:`NewestFirst` list; this session's rounds that are not over yet (and rounds
    whose config has not been attached yet: fedn creates a round before its config) are
    re-read by id on every poll. Statuses and validations are parsed once, when first
    seen, and kept by fedn round id / model id.

    Assembling: a round is *settled* once its status is final and every client's update
    (or reported failure) and, for a round with a model, validation (or reported
    failure) is in, or ``settle_after_s`` after it became final. A settled round's rows,
    failures and cause are kept and not rebuilt; only open rounds are assembled
    (:func:`build_records`) on each poll. So a poll's work and its transient memory
    depend on what is new, not on the rounds done (rebuilding the whole log each poll
    grew the runner's memory with the round count; bench/bench_soak.py).

    ``collect(full=True)`` forgets all of it and assembles the whole session from full
    answers with :func:`assemble` (the last poll): the final round log is exactly what
    a one-shot collection gives, e.g. a validation that came after its round settled,
    or a combiner that died after an earlier failed round settled.
    """

    def __init__(self, api_client: Any, session_id: str, seed_model_id: str,
                 clients: Iterable[str], validate: bool = True,
                 settle_after_s: float = 120.0) -> None:
        """Collect ``session_id`` (started from ``seed_model_id``) for ``clients``.

        ``validate``: the session validates each global model (else rounds settle
        without validations).
        """
        self.api = api_client
        self.session_id = session_id
        self.seed_model_id = seed_model_id
        self.clients = list(clients)
        self.validate = validate
        self.settle_after_s = settle_after_s
        # One connection for every poll (fedn's APIClient opens one per call).
        self.http = requests.Session()
        self._reset(parsed=True)

    def _reset(self, parsed: bool) -> None:
        sid = self.session_id
        # fedn round id -> client -> training metadata; failures by round id / model id;
        # model id -> client -> validation metrics.
        self._updates: dict[str, dict[str, dict[str, float]]] = {}
        self._train_failures: dict[str, list[tuple[str, str, str, str]]] = {}
        self._val_failures: dict[str, list[tuple[str, str, str, str]]] = {}
        self._validations: dict[str, dict[str, dict[str, float]]] = {}
        # fedn round id -> (index, records, failures, cause) of a settled round.
        self._settled: dict[str, tuple[int, list[RoundRecord], list[dict[str, Any]],
                                       str | None]] = {}
        self._final_since: dict[str, float] = {}
        self.rounds = NewestFirst(self._lister("rounds/"), "get_rounds", "round_id",
                                  keep=self._maybe_mine)
        self.models = NewestFirst(self._lister("models/", session_id=sid), "get_models",
                                  "model_id")
        self.statuses = NewestFirst(self._lister("statuses/", session_id=sid),
                                    "get_statuses", "status_id", keep=_keeps_status,
                                    on_new=self._add_status if parsed else None)
        # The SQL stores ignore the validations' session filter: all are read, and
        # only those of this session's models are used.
        self.validations = NewestFirst(self._lister("validations/"), "get_validations",
                                       "validation_id",
                                       on_new=self._add_validation if parsed else None)

    def _add_status(self, status: dict[str, Any]) -> None:
        update = update_of(status)
        if update is not None:
            self._updates.setdefault(update[0], {})[update[1]] = update[2]
            return
        failure = failure_of(status)
        if failure is not None:
            into = self._train_failures if failure[0] == "train" else self._val_failures
            into.setdefault(failure[1], []).append(failure)

    def _add_validation(self, item: dict[str, Any]) -> None:
        parsed = validation_of(item)
        if parsed is not None:
            self._validations.setdefault(parsed[0], {})[parsed[1]] = parsed[2]

    def _maybe_mine(self, raw: dict[str, Any]) -> bool:
        sid = _json(raw.get("round_config")).get("session_id")
        return not sid or sid == self.session_id

    def _request(self, path: str, headers: dict[str, str] | None = None,
                 params: dict[str, str] | None = None) -> Any:
        answer = self.http.get(self.api._get_url_api_v1(path), params=params,
                               headers={**self.api.headers, **(headers or {})},
                               verify=self.api.verify, timeout=HTTP_TIMEOUT_S)
        return answer.json()

    def _lister(self, path: str, **params: str) -> Callable[[int, int], Any]:
        def fetch(limit: int, skip: int) -> Any:
            return self._request(path, {"X-Limit": str(limit), "X-Skip": str(skip)}, params)
        return fetch

    @property
    def requests(self) -> int:
        """HTTP requests made by the lists so far (round re-reads not counted)."""
        return sum(lst.requests for lst in (self.rounds, self.models, self.statuses,
                                            self.validations))

    def _refresh_open_rounds(self) -> None:
        for key, raw in list(self.rounds.items.items()):
            if str(raw.get("status")) in FINAL_ROUND_STATES:
                continue
            fresh = _get(lambda key=key: self._request(f"rounds/{key}"), "get_round")
            if not isinstance(fresh, dict) or "round_id" not in fresh:
                continue  # not answered this time: the next poll asks again
            if self._maybe_mine(fresh):
                self.rounds.items[key] = fresh
            else:  # another session's round, now that its config is attached
                del self.rounds.items[key]

    def _complete(self, info: RoundInfo) -> bool:
        """Every client's update or failure is in, and its validation or failure."""
        updates = self._updates.get(info.round_id, {})
        failed = {f[2] for f in self._train_failures.get(info.round_id, [])}
        if not all(c in updates or c in failed for c in self.clients):
            return False
        if not info.model_id or not self.validate:
            return True
        validated = set(self._validations.get(info.model_id, {}))
        validated |= {f[2] for f in self._val_failures.get(info.model_id, [])}
        return all(c in validated for c in self.clients)

    def _assemble_incrementally(self, dead_combiners: list[str],
                                ended: Mapping[int, str] | None) -> SessionLog:
        infos = session_rounds(list(self.rounds.items.values()), self.session_id,
                               model_chain(list(self.models.items.values()),
                                           self.seed_model_id))
        now = time.monotonic()
        open_infos = []
        for info in infos:
            kept = self._settled.get(info.round_id)
            if kept is None or kept[0] != info.index:
                open_infos.append(info)
        round_index = {r.round_id: r.index for r in open_infos}
        model_round = {r.model_id: r.index for r in open_infos if r.model_id}
        updates = {(r.index, c): v for r in open_infos
                   for c, v in self._updates.get(r.round_id, {}).items()}
        vals = {(r.index, c): v for r in open_infos if r.model_id
                for c, v in self._validations.get(r.model_id, {}).items()}
        reported = _failure_rows(
            [f for r in open_infos for f in self._train_failures.get(r.round_id, [])]
            + [f for r in open_infos if r.model_id
               for f in self._val_failures.get(r.model_id, [])], round_index, model_round)
        records, failures, causes = build_records(open_infos, updates, vals, reported,
                                                  self.clients, dead_combiners, ended)
        fresh: dict[int, tuple[list[RoundRecord], list[dict[str, Any]]]] = {
            r.index: ([], []) for r in open_infos}
        for rec in records:
            fresh[rec.round][0].append(rec)
        for failure in failures:
            fresh[failure["round"]][1].append(failure)
        all_records: list[RoundRecord] = []
        all_failures: list[dict[str, Any]] = []
        all_causes: dict[int, str] = {}
        for info in infos:
            if info.index in fresh:
                recs, fails = fresh[info.index]
                cause = causes.get(info.index)
                if info.status in FINAL_ROUND_STATES:
                    since = self._final_since.setdefault(info.round_id, now)
                    if self._complete(info) or now - since > self.settle_after_s:
                        self._settled[info.round_id] = (info.index, recs, fails, cause)
            else:
                _, recs, fails, cause = self._settled[info.round_id]
            all_records.extend(recs)
            all_failures.extend(fails)
            if cause is not None:
                all_causes[info.index] = cause
        all_failures.sort(key=lambda f: (f["round"], f["client"], f["task"]))
        return SessionLog(rounds=infos, records=all_records, failures=all_failures,
                          causes=all_causes)

    def collect(self, dead_combiners: Iterable[str] = (),
                ended: Mapping[int, str] | None = None, full: bool = False) -> SessionLog:
        """The session's log as of now.

        Args:
            dead_combiners: Combiners found not running (failed rounds are theirs).
            ended: Round -> why the runner ended the session during it.
            full: Forget what is known, read everything again and assemble the whole
                session from the full answers (:func:`assemble`; the last poll).
        """
        if full:
            self._reset(parsed=False)
        self.rounds.update()
        self._refresh_open_rounds()
        self.models.update()
        self.statuses.update()
        self.validations.update()
        if not full:
            return self._assemble_incrementally(list(dead_combiners), ended)
        log = assemble(list(self.rounds.items.values()), list(self.models.items.values()),
                       list(self.statuses.items.values()),
                       list(self.validations.items.values()),
                       self.session_id, self.seed_model_id, self.clients, dead_combiners,
                       ended)
        self._reset(parsed=True)  # a later incremental poll starts afresh
        return log

    def close(self) -> None:
        """Close the HTTP connection."""
        self.http.close()


def collect_session(api_client: Any, session_id: str, seed_model_id: str,
                    clients: Iterable[str], dead_combiners: Iterable[str] = ()
                    ) -> SessionLog:
    """Read this session's rounds, models, updates, failures and validations (once).

    Args:
        api_client: fedn APIClient.
        session_id: The session.
        seed_model_id: The model the session started from.
        clients: The client names that take part (rows for each, even silent ones).
        dead_combiners: Combiners the caller found not running (failed rounds are
            attributed to them).
    """
    collector = SessionCollector(api_client, session_id, seed_model_id, clients)
    try:
        return collector.collect(dead_combiners, full=True)
    finally:
        collector.close()
