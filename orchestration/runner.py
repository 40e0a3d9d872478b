"""Run one experiment end to end and leave its round log behind.

Steps (each timed into run.json): data (phantoms or existing case folders) -> seed
model -> compute package -> network up (or an existing one) -> package + seed upload
-> clients up -> session -> per-round collection -> final collection -> shutdown.

Output, in ``<runs_dir>/<name>/``::

    rounds.csv            round log (long format, see runlog.py), rewritten per round
    run.json              config snapshot, seed, versions, timings, model ids, failures
    models/round-<k>.npz  global weights after round k
    seed.npz, package.tgz the uploaded seed and compute package
    settings/<clinic>.yaml  each clinic's FEDSEG_SETTINGS
    clients/<clinic>/     working dir, state dir, client.log
    privacy/<clinic>/     the clinic's privacy ledgers, only under ``ledgers: run``
                          (synthetic data); otherwise they live with the data
    network/              the network's logs and state (when this run started it)
    data/                 generated phantom clinics (phantom experiments)

Everything started here is stopped in ``finally`` - also on Ctrl-C (KeyboardInterrupt):
the log written so far stays, and run.json says ``"status": "interrupted"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from fedseg.orchestration import budget, collect, session
from fedseg.orchestration import clients as clients_mod
from fedseg.orchestration.experiment import Experiment
from fedseg.orchestration.network import ports
from fedseg.orchestration.runlog import (
    GLOBAL,
    MODELS_DIR,
    ROUNDS_NAME,
    RoundRecord,
    pivot,
    read_rounds,
    read_run_info,
    write_rounds,
    write_run_info,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_bytes, atomic_write_text
from fedseg_clinic.organs import OrganSet

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
VERSIONED = ("fedseg", "fedn", "tensorflow", "tf-keras", "tensorflow-privacy", "dp-accounting",
             "numpy", "SQLAlchemy")
# A session that ran, but without a clinic or with fewer rounds, for privacy budgets.
BUDGET_LIMITED = "budget-limited"
# After a round is done, how long to wait for its validations before reporting it anyway
# (default of session.validation_timeout). 120 s: on a loaded 2-core machine the demo's
# validation took ~85 s per clinic, and with 30 s the last round was reported (and
# summarised) with one clinic's Dice of three. Real CT (OpenKBP, 16 validation patients
# per clinic) took longer than 120 s, and every round was written without Dice.
VALIDATION_GRACE_S = 120.0
# How a clinic's refusal of a round for its privacy budget reads in the round log
# (fedseg_clinic.privacy.ledger.BudgetExceededError, reported by the callback client).
BUDGET_REFUSAL = "BudgetExceededError"
# The server's per-round secure-aggregation outcomes (orchestration/secure_aggregation.py).
SECAGG_JOURNAL = "secagg.jsonl"


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues (:func:`resume_run`).

    Attributes:
        offset: Rounds logged before the interruption (the new session's round 1 is
            round ``offset + 1`` of the run).
        start_model: The last committed global model (or the seed): the new session's
            starting point.
        earlier_records: rounds.csv as it was.
        earlier_info: run.json as it was.
    """

    offset: int
    start_model: Path
    earlier_records: list[RoundRecord]
    earlier_info: dict[str, Any]


@dataclasses.dataclass
class RunResult:
    """What a run ended with."""

    run_dir: Path
    status: str
    session_id: str | None
    rounds_done: int
    failures: list[dict[str, Any]]


def default_package_dir() -> Path:
    """The project's compute package folder (beside the fedseg_clinic package)."""
    import fedseg_clinic

    return Path(fedseg_clinic.__file__).resolve().parents[1]


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (recorded in run.json)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``MODULE:ATTR`` (dotted ATTR allowed)."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise FedsegError(f"{what} {spec!r}: cannot import ({exc})") from None
    if not callable(target):
        raise FedsegError(f"{what} {spec!r}: not callable")
    return target


def prepare_data(exp: Experiment, run_dir: Path, reuse: bool = False) -> dict[str, Path]:
    """Clinic name -> cases folder: generated phantoms or the experiment's folders.

    ``reuse`` (a resumed run) keeps phantoms generated before, with the ledgers that
    may live beside them.
    """
    if reuse and exp.data.phantoms is not None:
        folders = {n: run_dir / "data" / n for n in exp.data.clinic_names()}
        if all((f / "manifest.json").is_file() for f in folders.values()):
            return folders
    if exp.data.phantoms is None:
        for name, folder in exp.data.clinic_dirs.items():
            if not (folder / "manifest.json").is_file():
                raise FedsegError(f"{folder}: cases folder of {name} has no manifest.json")
        return dict(exp.data.clinic_dirs)
    from fedseg.orchestration import phantoms

    ph = exp.data.phantoms
    options = dict(ph.options)
    known = ("patients", "size", "quantity_skew")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise FedsegError(f"{exp.source or exp.name}: data.phantoms.options.{unknown[0]}: "
                          f"unknown (allowed: {', '.join(known)})")
    spec = phantoms.preset_spec(ph.preset, ph.clinics, int(options.get("patients", 4)),
                                int(options.get("size", 48)), exp.seed,
                                float(options.get("quantity_skew", 1.0)))
    generated = phantoms.generate_benchmark(spec, run_dir / "data", overwrite=True)
    return {g.name: g.folder for g in generated}


def check_data_organ_set(exp: Experiment, data_dirs: dict[str, Path]) -> OrganSet:
    """Refuse, before anything starts, clinic data of another organ set than the model's.

    Returns:
        The experiment's organ set (recorded in run.json).

    Raises:
        FedsegError: one line naming the clinic's folder and both organ sets.
    """
    from fedseg_clinic.cases import check_organ_set
    from fedseg_clinic.model.unet import UNetConfig

    organs = UNetConfig.from_dict(dict(exp.model)).organs
    for folder in data_dirs.values():
        check_organ_set(folder, organs)
    return organs


def write_models_record(exp: Experiment, run_dir: Path) -> Path:
    """``models/model.json``: the organ set and config every round's weights follow."""
    from fedseg_clinic.model.record import FOLDER_RECORD_NAME, write_record
    from fedseg_clinic.model.unet import UNetConfig

    return write_record(run_dir / MODELS_DIR / FOLDER_RECORD_NAME,
                        UNetConfig.from_dict(dict(exp.model)))


def write_clinic_settings(exp: Experiment, run_dir: Path, name: str, index: int) -> Path:
    """Write one clinic's FEDSEG_SETTINGS YAML: the experiment's model + clinic sections.

    Unless the experiment sets ``clinic.training.seed``, clinic ``index`` (0-based) gets
    ``seed + index``, so the experiment's seed reaches every clinic and clinics differ.
    """
    settings: dict[str, Any] = {"model": dict(exp.model)}
    settings.update(exp.clinic)
    training = dict(settings.get("training") or {})
    training.setdefault("seed", exp.seed + index)
    settings["training"] = training
    path = run_dir / "settings" / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False))
    return path


def default_seed_weights(model: dict[str, Any]) -> Path | None:
    """The shipped pretrained seed when it was trained for exactly ``model``, else None.

    Why a default: a warm start from it reached 95% of pooled Dice in 1 round where
    FedAvg from a random model took more than 5 (docs/findings.md, rounds study).
    """
    from fedseg.seed.pretrain import DEMO_SEED, read_seed_info

    try:
        read_seed_info(DEMO_SEED, model)
    except FedsegError:
        return None  # another model (or organ set): a random seed model
    return Path(DEMO_SEED)


def prepare_seed(exp: Experiment, seed_path: Path) -> dict[str, Any]:
    """Write the run's seed npz; return what run.json records about it.

    A pretrained ``seed_weights`` file is copied with its checked sidecar (what it was
    trained on, steps, its Dice); so is the shipped pretrained seed when the experiment
    names neither ``seed_weights`` nor ``seed_builder`` and the seed fits its model
    (``default: true`` in the record); otherwise ``seed_builder`` builds a random one.
    """
    weights = exp.seed_weights
    if weights is None and exp.pretrained_default:
        weights = default_seed_weights(exp.model)
    if weights is not None:
        from fedseg.seed.pretrain import read_seed_info, sidecar_path

        seed_info = read_seed_info(weights, exp.model)
        atomic_write_bytes(seed_path, weights.read_bytes())
        atomic_write_text(sidecar_path(seed_path), json.dumps(seed_info, indent=2))
        return {**seed_info, "path": str(weights),
                **({} if exp.seed_weights else {"default": True})}
    builder = resolve_callable(exp.seed_builder, "seed_builder")
    builder(dict(exp.model), seed_path, seed=exp.seed)
    return {"kind": "random_init", "builder": exp.seed_builder, "seed": exp.seed}


def network_config(exp: Experiment, run_dir: Path) -> Any:
    """The NetworkConfig of a run-owned network (hooks on when client settings exist)."""
    from fedseg.orchestration.network import NetworkConfig

    data = dict(exp.network)
    data.setdefault("root", str(run_dir / "network"))
    if exp.client_settings or exp.session.server_hook:
        data["hooks"] = True  # settings, secure aggregation, fedavgm run in ServerFunctions
    source = f"{exp.source or exp.name}: network"
    return NetworkConfig.from_dict(data, source=source, base=run_dir)


class RoundReporter:
    """Polls the API during a session; writes and announces each round once it is done."""

    def __init__(self, api_client: Any, session_id: str, seed_model_id: str,
                 clients: list[str], rounds: int, run_dir: Path, validate: bool,
                 progress: Progress | None,
                 dead_combiners: Callable[[], list[str]] | None = None,
                 offset: int = 0, earlier: list[RoundRecord] | None = None,
                 validation_grace_s: float = VALIDATION_GRACE_S) -> None:
        """Track one session (see :meth:`poll`).

        ``validation_grace_s``: how long a done round waits for its validations.

        ``dead_combiners`` names the network's combiners that are not running any more,
        so that a round without a model is attributed to them, not to the clients.
        A resumed run's session continues after ``offset`` logged rounds: its rounds are
        numbered from ``offset + 1`` and written after the ``earlier`` records.
        """
        self.dead_combiners = dead_combiners or (lambda: [])
        self.validation_grace_s = validation_grace_s
        self.offset = offset
        self.earlier = list(earlier or [])
        # Called after new rounds are written (the runner updates run.json there).
        self.on_update: Callable[[], None] | None = None
        self.api = api_client
        self.session_id = session_id
        self.seed_model_id = seed_model_id
        self.clients = clients
        self.rounds = rounds
        self.run_dir = run_dir
        self.validate = validate
        self.progress = progress
        self.reported: set[int] = set()
        self.done_since: dict[int, float] = {}
        self.log: collect.SessionLog | None = None
        self.model_ids: dict[int, str] = {}
        self.collector = collect.SessionCollector(api_client, session_id, seed_model_id,
                                                  clients, validate=validate,
                                                  settle_after_s=validation_grace_s)
        # Session round -> why the runner ended the session during it (budget refusals).
        self.ended: dict[int, str] = {}

    def _validations_complete(self, k: int, log: collect.SessionLog) -> bool:
        table: dict[str, set[str]] = {}
        for rec in log.records:
            if rec.round == k and rec.client != GLOBAL:
                table.setdefault(rec.client, set()).add(rec.metric)
        trained = [c for c in self.clients if "num_examples" in table.get(c, set())]
        return all(any(m.startswith("val_") for m in table.get(c, set())) for c in trained)

    def poll(self, final: bool = False) -> None:
        """Collect; report every done round whose validations are in (or overdue).

        Args:
            final: The session is over: report everything that is done.
        """
        own = self.collector.collect(self.dead_combiners(), self.ended, full=final)
        if not final:
            self._end_on_budget_refusal(own)
        log = collect.shift_log(own, self.offset)
        self.log = log
        now = time.monotonic()
        new = []
        for info in log.rounds:
            if info.index in self.reported or info.status not in session.DONE_ROUND_STATES:
                continue
            self.done_since.setdefault(info.index, now)
            waited = now - self.done_since[info.index]
            ready = (not self.validate or not info.model_id or final
                     or self._validations_complete(info.index, log)
                     or waited > self.validation_grace_s)
            if ready:
                new.append(info)
        if not new and not final:
            return
        for info in sorted(new, key=lambda r: r.index):
            self.reported.add(info.index)
            if info.model_id:
                self.model_ids[info.index] = info.model_id
                session.download_model(self.api, info.model_id,
                                       self.run_dir / MODELS_DIR / f"round-{info.index}.npz")
        write_rounds(self.run_dir, self.earlier + [r for r in log.records
                                                   if r.round in self.reported])
        if new and self.on_update is not None:
            self.on_update()
        for info in sorted(new, key=lambda r: r.index):
            if self.progress is not None:
                self.progress(self.round_line(info, log))

    def _end_on_budget_refusal(self, log: collect.SessionLog) -> None:
        """End the session when a clinic refuses the running round for its budget.

        Its ledger cannot afford the round (e.g. another training on the same data spent
        budget after the run's plan): it will send no update, and fedn would wait out the
        round timeout, then ask again next round. The round is ended now, as a failed
        round whose cause names the clinic and its refusal.
        """
        running = {r.index for r in log.rounds if r.status not in session.DONE_ROUND_STATES}
        refused = [f for f in log.failures
                   if f["task"] == "train" and f["round"] in running
                   and f["round"] not in self.ended
                   and str(f["error"]).startswith(BUDGET_REFUSAL)]
        if not refused:
            return
        k = refused[0]["round"]
        detail = "; ".join(f"{f['client']}: {f['error']}" for f in refused if f["round"] == k)
        self.ended[k] = (f"budget: refused for the privacy budget ({detail}); the runner "
                         "ended the session instead of waiting out the round timeout")
        logger.warning("round %d: %s", k + self.offset, self.ended[k])
        if self.progress is not None:
            self.progress(f"round {k + self.offset}: a clinic refused it for its privacy "
                          f"budget ({detail}); ending the session")
        session.terminate_session(self.api, self.session_id)

    def round_line(self, info: collect.RoundInfo, log: collect.SessionLog) -> str:
        """"round 2/5  clinic-1 dice 0.41 eps 1.20  clinic-2 FAILED  12.3 s"."""
        table: dict[str, dict[str, float]] = {}
        for rec in log.records:
            if rec.round == info.index:
                table.setdefault(rec.client, {})[rec.metric] = rec.value
        parts = [f"round {info.index}/{self.rounds}"]
        if info.index in log.causes:
            parts.append(f"FAILED, no model: {log.causes[info.index]}")
        for client in self.clients:
            row = table.get(client, {})
            if row.get("train_failed", 0.0) >= 1.0:
                parts.append(f"{client} FAILED")
                continue
            text = f"{client} dice {format_metric(row.get('val_dice_mean'))}"
            if "epsilon" in row:
                text += f" eps {format_metric(row['epsilon'], 2)}"
            parts.append(text)
        parts.append(f"{format_metric(info.seconds, 1)} s")
        return "  ".join(parts)


def secagg_summary(journal: Path) -> dict[str, Any]:
    """run.json's record of a secure session: each FEDn round's outcome, failures named."""
    from fedseg.orchestration.secure_aggregation import read_journal

    rounds = read_journal(journal)
    return {"journal": journal.name, "rounds": rounds,
            "failed_rounds": [r["fedn_round"] for r in rounds if r.get("status") == "failed"]}


def distributed_dp_summary(run_dir: Path) -> dict[str, Any]:
    """run.json's record of a distributed-DP session: each clinic's last epsilon and trust.

    Built from rounds.csv (the clinics' metadata): the epsilon under the trust
    assumption, the epsilon if the clinic's noise share were the only honest one, and
    the trust line (the same text the clinic logs, privacy/skellam.trust_statement).
    """
    from fedseg_clinic.privacy import skellam

    rows = pivot(read_rounds(run_dir)) if (run_dir / ROUNDS_NAME).is_file() else {}
    clients: dict[str, Any] = {}
    for (k, client), values in sorted(rows.items()):
        if client == GLOBAL or values.get("dp_distributed") != 1.0:
            continue
        m, n = int(values["honest_shares"]), int(values["secagg_clinics"])
        eps, alone, delta = values["epsilon"], values["epsilon_if_alone"], values["delta"]
        clients[client] = {"round": k, "epsilon": eps, "epsilon_if_alone": alone,
                           "delta": delta, "honest_shares": m, "clinics": n,
                           "noise_multiplier": values.get("noise_multiplier"),
                           "trust": skellam.trust_statement(eps, alone, m, n, delta)}
    return {"mechanism": skellam.MECHANISM, "clients": clients,
            "doc": "docs/secure-aggregation.md#distributed-dp"}


def format_metric(value: float | None, digits: int = 2) -> str:
    """A metric for a progress line: fixed digits, "-" when missing or NaN."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def utc_now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (run.json timestamps)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_experiment(exp: Experiment, runs_dir: Path, *, progress: Progress | None = None,
                   network_root: Path | None = None, overwrite: bool = False,
                   ready_timeout_s: float = 180.0,
                   client_env: dict[str, dict[str, str]] | None = None,
                   resume: ResumePoint | None = None) -> RunResult:
    """Run ``exp``; results in ``runs_dir/<exp.name>/``.

    Args:
        exp: The validated experiment.
        runs_dir: Parent folder of run folders (absolute or resolved by the caller).
        progress: Called with one human-readable line per step and per round.
        network_root: Use the network already up in this folder (not stopped at the
            end) instead of starting one for the run.
        overwrite: Reuse a non-empty run folder.
        ready_timeout_s: Bound on clients connecting (TF import + model build included).
        client_env: Extra environment variables per client name (on top of
            ``clients.env``), e.g. thread counts or fault injection in tests.
        resume: Continue an interrupted run in its folder (see :func:`resume_run`)
            instead of starting a new one.

    Returns:
        The outcome; ``status`` is "finished", "budget-limited" (a clinic dropped or
        the session shortened for privacy budgets), "interrupted" or "failed: ...".

    Raises:
        BudgetRefusedError: too few clinics can afford round 1 (run.json status
            "refused: ..."; nothing was started).
        FedsegError: bad input or a failure before the session (after cleanup).
        KeyboardInterrupt: re-raised after cleanup, with the log kept.
    """
    say = progress or (lambda _line: None)
    run_dir = Path(runs_dir).resolve() / exp.name
    planned_rounds = exp.session.rounds
    offset = resume.offset if resume else 0
    if resume is None:
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise FedsegError(f"{run_dir}: run folder exists and is not empty "
                              "(choose another name, --overwrite or --resume)")
        if overwrite and run_dir.exists():
            _clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "name": exp.name, "seed": exp.seed, "status": "starting", "started_at": utc_now_iso(),
        "experiment_file": str(exp.source) if exp.source else None, "config": exp.raw,
        "versions": package_versions(), "timings": {}, "model_ids": {}, "failures": [],
    }
    if resume is not None:
        # Keep the record of the interrupted attempt; this attempt adds to it.
        info = {**resume.earlier_info, "status": "starting", "timings": {},
                "versions": package_versions()}
        info["resumed"] = [*resume.earlier_info.get("resumed", []),
                           {"at": utc_now_iso(), "after_round": offset,
                            "from_model": str(resume.start_model),
                            "previous_status": resume.earlier_info.get("status")}]
        exp = remaining_experiment(exp, offset)
        say(f"resuming {run_dir} after round {offset} of {planned_rounds}, from "
            f"{resume.start_model.name}")
    timings: dict[str, float] = info["timings"]
    write_run_info(run_dir, info)
    t_start = time.monotonic()
    own_network_root: Path | None = None
    clients_started = False
    reporter: RoundReporter | None = None

    def step(name: str, fn: Callable[[], Any]) -> Any:
        tic = time.monotonic()
        result = fn()
        timings[f"{name}_seconds"] = round(time.monotonic() - tic, 3)
        return result

    try:
        say(f"run folder {run_dir}")
        data_dirs = step("data", lambda: prepare_data(exp, run_dir, reuse=resume is not None))
        names = list(data_dirs)
        say(f"data: {len(names)} clinics ({', '.join(names)})")
        info["organ_set"] = check_data_organ_set(exp, data_dirs).to_json()
        # Model export reads the clinics' manifests (import spacing) from here.
        info["clinic_data"] = {n: str(Path(d).resolve()) for n, d in data_dirs.items()}
        # The budget is decided before any process starts (orchestration/budget.py).
        budget.check_synthetic(exp, data_dirs)
        settings_files = {n: write_clinic_settings(exp, run_dir, n, i)
                          for i, n in enumerate(names)}
        info["ledgers"] = exp.ledgers
        decision = step("budget", lambda: budget.decide(exp, run_dir, data_dirs,
                                                        settings_files, say))
        info["privacy_budget"] = decision.to_json()
        write_run_info(run_dir, info)
        names = decision.clinics
        if decision.rounds < exp.session.rounds:
            exp = dataclasses.replace(
                exp, session=dataclasses.replace(exp.session, rounds=decision.rounds))
        seed_path = run_dir / "seed.npz"
        if resume is None:
            info["seed_model"] = step("seed", lambda: prepare_seed(exp, seed_path))
        else:
            seed_path = resume.start_model  # the session goes on from the last model
        info["model_bytes"] = seed_path.stat().st_size  # what one transfer moves
        write_models_record(exp, run_dir)
        package = step("package", lambda: session.build_package(
            exp.package or default_package_dir(), run_dir / "package.tgz"))

        from fedseg.orchestration import network as network_mod

        if network_root is None:
            config = network_config(exp, run_dir)
            say(f"network up in {config.root}")
            own_network_root = Path(config.root)
            state = step("network_up", lambda: network_mod.network_up(config))
        else:
            state = network_mod.load_network_state(network_root)
            if (exp.client_settings or exp.session.server_hook) \
                    and not state.hooks_host:
                raise FedsegError(f"{network_root}: the experiment sets client_settings, "
                                  "secure_aggregation or fedavgm but this network has no "
                                  "hooks service (network up with hooks)")
        info["network"] = {"root": str(state.root), "api_url": state.api_url,
                           "owned": network_root is None}
        api = state.api_client()
        seed_id = step("upload", lambda: session.upload_package_and_seed(
            api, package, seed_path, exp.name))
        info["seed_model_id"] = seed_id

        specs = [clients_mod.ClientSpec(
            name=n, data_dir=data_dirs[n], settings_file=settings_files[n],
            env={**exp.clients.env, **budget.client_privacy_env(exp, run_dir, n),
                 # A secure session's clinics never send a plain update, whatever happens.
                 **({"FEDSEG_REQUIRE_SECURE_AGGREGATION": "1"}
                    if exp.session.secure_aggregation else {}),
                 **(client_env or {}).get(n, {})})
            for n in names]
        say(f"clients up ({exp.clients.route} route): {', '.join(names)}")
        clients_started = True
        handles = step("clients_up", lambda: clients_mod.clients_up(
            run_dir, specs, api_url=state.api_url, route=exp.clients.route,
            app=exp.clients.app, token=state.client_token, api_client=api,
            combiner=[c.name for c in state.combiners] if len(state.combiners) > 1 else None,
            ready_timeout_s=ready_timeout_s,
            tls_ca=Path(state.tls_ca) if state.tls_ca else None))
        info["clients"] = {h.name: {"route": h.route, "client_id": h.client_id,
                                    "data_dir": str(data_dirs[h.name]),
                                    "log": str(h.log), "folder": str(h.folder)}
                           for h in handles}
        if exp.client_settings:
            settings_by_round = [exp.settings_for_round(k)
                                 for k in range(1, exp.session.rounds + 1)]
        elif state.hooks_host or exp.session.server_hook:
            # A hooks service keeps the last session's ServerFunctions and the combiner
            # asks it every round: without a fresh, empty one, this session's clients
            # would get the previous session's settings.
            settings_by_round = [{} for _ in range(exp.session.rounds)]
        else:
            settings_by_round = None
        # Only this run's clients train: a network may hold other experiments' clients,
        # or the just-stopped clients of the previous run (active for 10 s more).
        session_id = session.start_session(
            api, exp.session, seed_id, exp.name, settings_by_round, n_clients=len(names),
            client_ids=[h.client_id for h in handles],
            secagg_journal=run_dir / SECAGG_JOURNAL if exp.session.secure_aggregation else None)
        info["session_id"] = session_id
        info["aggregation"] = "secure" if exp.session.secure_aggregation else "plain"
        # Where the DP noise is added: by each clinic in full at every local step
        # ("local"), or shared among the clinics under secure aggregation ("distributed").
        privacy = exp.clinic.get("privacy") if isinstance(exp.clinic.get("privacy"), dict) \
            else {}
        info["privacy_mode"] = "distributed" if privacy.get("distributed") is True else "local"
        info["status"] = "running"
        write_run_info(run_dir, info)
        say(f"session {session_id}: {exp.session.rounds} rounds, {exp.session.aggregator}")
        reporter = RoundReporter(api, session_id, seed_id, names, planned_rounds, run_dir,
                                 exp.session.validate, progress,
                                 dead_combiners=lambda: dead_combiners(state),
                                 offset=offset,
                                 earlier=resume.earlier_records if resume else None,
                                 validation_grace_s=exp.session.validation_timeout)

        def round_reported() -> None:  # run.json follows the log: kill -9 loses nothing
            assert reporter is not None
            record_progress(reporter, info, resume.earlier_info if resume else None)
            write_run_info(run_dir, info)

        reporter.on_update = round_reported
        tic = time.monotonic()
        status = session.wait_session(api, session_id, session.session_timeout(exp.session),
                                      on_poll=reporter.poll)
        # The last round's validations arrive after the session says finished.
        deadline = time.monotonic() + exp.session.validation_timeout
        while (len(reporter.reported) < len(reporter.log.rounds if reporter.log else [])
               and time.monotonic() < deadline):
            time.sleep(1.0)
            reporter.poll()
        reporter.poll(final=True)
        timings["session_seconds"] = round(time.monotonic() - tic, 3)
        info["status"] = "finished" if status.lower() == "finished" else status.lower()
        earlier_models = (resume.earlier_info.get("model_ids") or {}) if resume else {}
        if reporter.ended:  # a clinic refused a round mid-session for its budget
            info["budget_stop"] = [{"round": k + offset, "cause": c}
                                   for k, c in sorted(reporter.ended.items())]
        if not reporter.model_ids and not earlier_models:
            # A session that "finished" without any global model is a failed run.
            causes = reporter.log.causes if reporter.log else {}
            info["status"] = "failed: no round committed a global model" + (
                " (" + "; ".join(f"round {k}: {c}" for k, c in sorted(causes.items())) + ")"
                if causes else "")
        elif reporter.ended:
            # Limited by budgets; budget_stop says which round and why (exit code 3).
            info["status"] = BUDGET_LIMITED
        elif info["status"] == "finished" and decision.limited:
            info["status"] = BUDGET_LIMITED
    except KeyboardInterrupt:
        info["status"] = "interrupted"
        say("interrupted: stopping clients and network, keeping the log so far")
        raise
    except budget.BudgetRefusedError as exc:
        info["status"] = f"refused: {exc}"
        info["privacy_budget"] = exc.record
        raise
    except FedsegError as exc:
        info["status"] = f"failed: {exc}"
        raise
    finally:
        previous = _ignore_sigint()
        try:
            _cleanup(reporter, info, run_dir, clients_started, own_network_root,
                     resume.earlier_info if resume else None)
        finally:
            timings["total_seconds"] = round(time.monotonic() - t_start, 3)
            if exp.session.secure_aggregation:
                info["secure_aggregation"] = secagg_summary(run_dir / SECAGG_JOURNAL)
            if info.get("privacy_mode") == "distributed":
                info["distributed_dp"] = distributed_dp_summary(run_dir)
            info["finished_at"] = utc_now_iso()
            write_run_info(run_dir, info)
            _restore_sigint(previous)
    return RunResult(run_dir=run_dir, status=info["status"],
                     session_id=info.get("session_id"),
                     rounds_done=int(info.get("rounds_done", 0)), failures=info["failures"])


def remaining_experiment(exp: Experiment, done: int) -> Experiment:
    """``exp`` without its first ``done`` rounds (per-round schedules sliced to match)."""
    if done <= 0:
        return exp
    schedules = {k: (v[done:] if isinstance(v, list) else v)
                 for k, v in exp.client_settings.items()}
    return dataclasses.replace(
        exp, client_settings=schedules,
        session=dataclasses.replace(exp.session, rounds=exp.session.rounds - done))


def stop_leftovers(run_dir: Path, network_root: Path | None = None) -> list[str]:
    """Stop what an interrupted run left running: its clients and its own network.

    Only processes recorded in the run folder (``clients/clients.json``,
    ``network/network.json``, or the run's own network at ``network_root``: pid +
    creation time) are signalled; a recorded pid that now belongs to another process is
    left alone.

    Returns:
        The names of the processes that were still running and got stopped.
    """
    from fedseg.orchestration import network as network_mod

    stopped = [f"client {n}" for n in clients_mod.stop_clients(run_dir)]
    net = network_root or run_dir / "network"
    if (net / network_mod.STATE_FILE).exists():
        stopped += network_mod.network_down(net)
    return stopped


def resume_run(run_dir: Path, *, progress: Progress | None = None,
               ready_timeout_s: float = 180.0,
               client_env: dict[str, dict[str, str]] | None = None) -> RunResult:
    """Continue a crashed, killed or interrupted run from its last committed model.

    Stops the processes the interrupted run left behind (:func:`stop_leftovers`), then
    runs the remaining rounds as a new session in the same folder: from the last
    downloaded global model (``models/round-<k>.npz``; the seed if none), with the same
    ledgers (so the budget is re-planned with what was already spent), numbering its
    rounds after the ones in rounds.csv. A run-owned network starts afresh (the old
    network folder is kept as ``network.before-resume-<n>``).

    Args:
        run_dir: The run folder (its run.json holds the experiment).
        progress: As :func:`run_experiment`.
        ready_timeout_s: As :func:`run_experiment`.
        client_env: As :func:`run_experiment`.

    Raises:
        FedsegError: No run there, or it finished already.
    """
    from fedseg.orchestration.experiment import parse_experiment

    say = progress or (lambda _line: None)
    run_dir = Path(run_dir).resolve()
    info = read_run_info(run_dir)
    status = str(info.get("status", ""))
    if status in ("finished", BUDGET_LIMITED):
        raise FedsegError(f"{run_dir}: the run is {status}; nothing to resume")
    source = info.get("experiment_file")
    base = Path(source).parent if source else None
    exp = parse_experiment(info.get("config"), source=source or str(run_dir / "run.json"),
                           base=base)
    if exp.name != run_dir.name:
        raise FedsegError(f"{run_dir}: run.json names run {exp.name!r}, not the folder's "
                          f"name {run_dir.name!r}")
    network = info.get("network") or {}
    owned = bool(network.get("owned", True))
    own_root = Path(network["root"]) if owned and network.get("root") else run_dir / "network"
    stopped = stop_leftovers(run_dir, own_root)
    if stopped:
        say(f"stopped what the interrupted run left running: {', '.join(stopped)}")
    records = read_rounds(run_dir) if (run_dir / ROUNDS_NAME).exists() else []
    done = max((r.round for r in records), default=0)
    models = {int(m.stem.split("-", 1)[1]): m
              for m in (run_dir / MODELS_DIR).glob("round-*.npz")
              if m.stem.split("-", 1)[1].isdigit() and int(m.stem.split("-", 1)[1]) <= done}
    start = models[max(models)] if models else run_dir / "seed.npz"
    if not start.is_file():
        raise FedsegError(f"{run_dir}: no committed model and no seed.npz to resume from")
    if done >= exp.session.rounds:
        raise FedsegError(f"{run_dir}: all {exp.session.rounds} rounds are logged "
                          f"(status {status!r}); nothing to resume")
    network_root = None if owned else Path(network["root"])
    if owned and own_root.exists():
        # A fresh network: the old store lists the dead combiners and the dead session.
        n = 1
        while own_root.with_name(f"{own_root.name}.before-resume-{n}").exists():
            n += 1
        own_root.rename(own_root.with_name(f"{own_root.name}.before-resume-{n}"))
    return run_experiment(exp, run_dir.parent, progress=progress, network_root=network_root,
                          ready_timeout_s=ready_timeout_s, client_env=client_env,
                          resume=ResumePoint(done, start, records, info))


def dead_combiners(state: Any) -> list[str]:
    """The network's combiners whose recorded process is not running any more."""
    return [c.name for c in state.combiners
            if c.name in state.records and not ports.is_alive(state.records[c.name])]


def _clear_run_dir(run_dir: Path) -> None:
    """Empty an old run folder; refuses while its clients or network still run.

    The old network's SQLite store must go too: a combiner restarted on a store that
    lists an earlier combiner is reported as "No combiner available" to clients.
    """
    from fedseg.orchestration import network as network_mod

    alive = [h.name for h in clients_mod.load_clients(run_dir) if ports.is_alive(h.record)]
    if (run_dir / "network" / network_mod.STATE_FILE).exists():
        state = network_mod.load_network_state(run_dir / "network")
        alive += [n for n, rec in state.records.items() if ports.is_alive(rec)]
    if alive:
        raise FedsegError(f"{run_dir}: still running ({', '.join(alive)}); stop it first")
    from fedseg_clinic.privacy.ledger import PRIVACY_DIR_NAME, ledgers_in

    # A data set's ledger is never deleted by a rerun, even when its data sits in here.
    kept = [str(d) for d in run_dir.rglob(PRIVACY_DIR_NAME) if ledgers_in(d)]
    if kept:
        raise FedsegError(f"{run_dir}: holds the privacy ledger of a data set ({kept[0]}); "
                          "--overwrite never deletes one: move the data out of the run "
                          "folder (or `fedseg privacy reset` it)")
    shutil.rmtree(run_dir)


def record_progress(reporter: RoundReporter, info: dict[str, Any],
                    earlier: dict[str, Any] | None = None) -> None:
    """Put what the reporter logged so far into run.json's ``info`` (in place).

    Called after every reported round as well as at the end, so a run killed with
    ``kill -9`` still leaves its rounds, model ids and failures on record. A resumed
    run's record continues ``earlier`` (run.json before the interruption).
    """
    if reporter.log is None:
        return
    before = earlier or {}
    kept = [f for f in before.get("failures", []) if f["round"] <= reporter.offset]
    info["failures"] = kept + reporter.log.failures
    info["model_ids"] = {**{k: v for k, v in (before.get("model_ids") or {}).items()
                            if int(k) <= reporter.offset},
                         **{str(k): v for k, v in sorted(reporter.model_ids.items())}}
    info["rounds_done"] = reporter.offset + len(reporter.reported)
    # Every round with its outcome: a round without a model is failed, with a cause.
    info["rounds"] = [r for r in before.get("rounds", []) if r["round"] <= reporter.offset]
    info["rounds"] += [{"round": r.index, "round_id": r.round_id, "status": r.status,
                        "model_id": r.model_id or None,
                        "failed": r.index in reporter.log.causes,
                        "cause": reporter.log.causes.get(r.index)}
                       for r in reporter.log.rounds if r.index in reporter.reported]
    info["rounds_failed"] = sum(1 for r in info["rounds"] if r["failed"])


def _cleanup(reporter: RoundReporter | None, info: dict[str, Any], run_dir: Path,
             clients_started: bool, own_network_root: Path | None,
             earlier: dict[str, Any] | None = None) -> None:
    """Record what was collected, then stop clients and the run's own network.

    A resumed run's record continues ``earlier`` (run.json before the interruption).
    """
    if reporter is not None:
        record_progress(reporter, info, earlier)
        reporter.collector.close()
    if clients_started:
        clients_mod.stop_clients(run_dir)
    if own_network_root is not None:
        from fedseg.orchestration import network as network_mod

        try:
            network_mod.network_down(own_network_root)
        except FedsegError as exc:  # it never came up: nothing to stop
            logger.info("network down: %s", exc)


def _ignore_sigint() -> Any:
    """A second Ctrl-C or SIGTERM must not interrupt the cleanup that stops our processes.

    ``fedseg run`` turns SIGTERM into KeyboardInterrupt too, so a second ``kill`` during
    cleanup used to abort it and leave the S3 process running (issue 13).
    """
    if threading.current_thread() is threading.main_thread():
        return {sig: signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    return None


def _restore_sigint(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo_experiment(rounds: int = 3, name: str = "demo") -> Experiment:
    """The ``fedseg demo`` experiment: DP fine-tuning of a public-pretrained seed.

    Three non-iid phantom clinics (57 / 41 / 22 patients, 80 % of them for training)
    start from the shipped seed (seed/pretrained/demo-seed.npz: pretrained without DP on
    public phantoms of another seed and scanner distribution; ``fedseg seed pretrain
    --demo`` rebuilds it) and fine-tune only its GroupNorm scale/offset and biases (351
    of 85k parameters) with DP-Adam; each clinic's noise is calibrated so that the
    planned rounds end at epsilon <= 8 (delta 1 / (10 N)), and that is also its budget.
    Sized for a few minutes on a 2-core CPU: 24^3 patches of 48^3 volumes, one
    TensorFlow thread per client process. The network listens on free ports picked
    now, so the demo runs beside any other network and can be rerun at once.
    """
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg.seed.pretrain import DEMO_PRETRAIN, DEMO_SEED

    api_port, s3_port, combiner_port = ports.free_ports(3)
    doc = {
        "name": name,
        "seed": 7,
        "data": {"phantoms": {"preset": "non-iid", "clinics": 3,
                              "options": {"patients": 40, "size": 48, "quantity_skew": 3.0}}},
        "model": dict(DEMO_PRETRAIN.model),
        "seed_weights": str(DEMO_SEED),
        "clinic": {
            "training": {"optimizer": "adam", "learning_rate": 0.01, "local_steps": 10,
                         "batch_size": 8, "patch_size": [24, 24, 24],
                         "trainable": "norm_bias"},
            "privacy": {"enabled": True, "target_epsilon": 8.0, "l2_norm_clip": 1.0},
            "validation": {"patch_size": [24, 24, 24], "overlap": 0.25, "batch_size": 4},
        },
        "session": {"rounds": rounds, "aggregator": "fedavg", "round_timeout": 300,
                    "min_clients": 2},
        "clients": {"route": "callback",
                    "env": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                            "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
        "network": {"api_port": api_port, "s3_port": s3_port,
                    "combiners": [{"name": "combiner-1", "port": combiner_port}]},
    }
    return parse_experiment(doc, source="fedseg demo")
