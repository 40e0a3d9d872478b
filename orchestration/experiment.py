"""The experiment file: one YAML that *is* the experiment (docs/experiments.md).

``load_experiment(path)`` reads and validates it into a typed, frozen
:class:`Experiment`. Every problem is a one-line :class:`FedsegError` naming the file
and the key (``experiments/x.yaml: session.rounds: must be an integer >= 1, got 0``).
Relative paths inside the file are resolved against the file's folder, never
against the working directory.

Top-level keys::

    name: demo-dp               # run folder name (letters, digits, . _ -)
    seed: 42                    # seeds phantoms, the seed model and every clinic
    data:                       # exactly one of phantoms | clinics
      phantoms: {preset: non-iid, clinics: 3, options: {...}}
      clinics: {clinic-1: cases/clinic-1, ...}
    model: {...}                # model config for fedseg.seed.build_seed (free-form)
    clinic: {...}               # clinic-side settings (training, privacy), written to
                                # each client's FEDSEG_SETTINGS YAML (free-form)
    client_settings: {...}      # sent every round through a ServerFunctions hook;
                                # a list value is a per-round schedule (len == rounds)
    session: {rounds, aggregator, aggregator_kwargs, round_timeout, min_clients,
              validate, validation_timeout}
    clients: {route: callback|package, app: MODULE:FACTORY, env: {...}}
    network: {...}              # passed to the network layer (NetworkConfig fields)
    ledgers: data | run         # where the clinics' privacy ledgers are kept (below)
    seed_builder: MODULE:FUNC   # builds the seed npz: FUNC(model, out, seed=seed)
    seed_weights: path|random   # a pretrained seed npz (fedseg seed pretrain) whose
                                # sidecar JSON (what it was trained on) goes to run.json;
                                # "random": seed_builder's random model. Unset (and no
                                # seed_builder): the shipped pretrained seed when its model
                                # config equals `model` (the recommended scheme,
                                # docs/findings.md), else a random one
    package: path               # compute package folder (default: the project's)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from fedseg_clinic.errors import FedsegError

AGGREGATORS = ("fedavg", "fedopt", "fedavgm")
FEDOPT_KWARGS = {"serveropt": str, "learning_rate": float, "beta1": float, "beta2": float,
                 "tau": float}
# fedavgm: FedAvg with server momentum, run in a ServerFunctions hook
# (orchestration/server_momentum.py): server learning rate and momentum in [0, 1).
FEDAVGM_KWARGS = {"learning_rate": float, "momentum": float}
SERVEROPTS = ("adam", "yogi", "adagrad")
ROUTES = ("callback", "package")
DEFAULT_APP = "fedseg_clinic.app:ClinicApp.from_environment"
DEFAULT_SEED_BUILDER = "fedseg.seed.build:build_seed"
RANDOM_SEED = "random"  # seed_weights: random = a random seed model, explicitly
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_APP_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TOP_KEYS = ("name", "seed", "data", "model", "clinic", "client_settings", "session",
             "clients", "network", "seed_builder", "package", "ledgers", "seed_weights")
# ledgers: "data" keeps each clinic's privacy ledger with its data (<data>/.fedseg-privacy):
# every run on that data composes. "run" keeps them in <run>/privacy/<clinic>/, so runs
# on shared synthetic data stay independent; only allowed for phantom data (runner
# checks), and the default for experiments that generate phantoms.
LEDGER_SCOPES = ("data", "run")


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """Synthetic clinics to generate (fedseg.orchestration.phantoms)."""

    preset: str = "non-iid"
    clinics: int = 3
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the clinics' cases come from: generated phantoms or existing folders."""

    phantoms: PhantomSpec | None = None
    clinic_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)

    def clinic_names(self) -> list[str]:
        """Client names, in order (clinic-1..N for phantoms)."""
        if self.phantoms is not None:
            return [f"clinic-{i}" for i in range(1, self.phantoms.clinics + 1)]
        return list(self.clinic_dirs)


@dataclasses.dataclass(frozen=True)
class SessionSpec:
    """The FEDn session."""

    rounds: int = 5
    aggregator: str = "fedavg"
    aggregator_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    round_timeout: int = 600
    min_clients: int = 1
    validate: bool = True
    # Seconds to wait, after a round is done, for its validations before the round is
    # written without the missing ones (real CT volumes validate for minutes).
    validation_timeout: int = 120
    # Pairwise-masked aggregation (docs/secure-aggregation.md): the server sees the sum.
    secure_aggregation: bool = False

    @property
    def server_hook(self) -> bool:
        """Whether the server side runs in a ServerFunctions hook (needs the hooks service)."""
        return self.secure_aggregation or self.aggregator == "fedavgm"


@dataclasses.dataclass(frozen=True)
class ClientsSpec:
    """How clients run: route, the app factory (callback route) and extra env vars."""

    route: str = "callback"
    app: str = DEFAULT_APP
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A validated experiment file."""

    name: str
    seed: int
    data: DataSpec
    session: SessionSpec
    clients: ClientsSpec
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    clinic: dict[str, Any] = dataclasses.field(default_factory=dict)
    client_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    network: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed_builder: str = DEFAULT_SEED_BUILDER
    package: Path | None = None
    ledgers: str = "data"
    seed_weights: Path | None = None
    # No seed_weights, no seed_builder, not "random": fedseg run starts from the shipped
    # pretrained seed when its model config matches (runner.prepare_seed).
    pretrained_default: bool = False
    source: Path | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def settings_for_round(self, round_index: int) -> dict[str, Any]:
        """Client settings of round ``round_index`` (1-based): schedules resolved."""
        out: dict[str, Any] = {}
        for key, value in self.client_settings.items():
            out[key] = value[round_index - 1] if isinstance(value, list) else value
        return out


class _Checker:
    """Type checks that name the file and the dotted key in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> FedsegError:
        return FedsegError(f"{self.source}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None
                ) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for sub in value:
            if not isinstance(sub, str):
                raise self.fail(key, f"keys must be strings, got {sub!r}")
            if allowed is not None and sub not in allowed:
                raise self.fail(f"{key}.{sub}" if key else sub,
                                f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def integer(self, value: Any, key: str, minimum: int) -> int:
        # bool is an int subclass; `rounds: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def primitive(self, value: Any, key: str) -> None:
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise self.fail(key, f"must be a string, number or boolean, got {value!r}")


def _data(check: _Checker, value: Any, base: Path | None) -> DataSpec:
    data = check.mapping(value, "data", ("phantoms", "clinics"))
    if ("phantoms" in data) == ("clinics" in data):
        raise check.fail("data", "give exactly one of phantoms or clinics")
    if "phantoms" in data:
        ph = check.mapping(data["phantoms"], "data.phantoms", ("preset", "clinics", "options"))
        preset = ph.get("preset", "non-iid")
        if not isinstance(preset, str) or not preset:
            raise check.fail("data.phantoms.preset", f"must be a preset name, got {preset!r}")
        clinics = check.integer(ph.get("clinics", 3), "data.phantoms.clinics", 1)
        options = dict(check.mapping(ph.get("options"), "data.phantoms.options"))
        return DataSpec(phantoms=PhantomSpec(preset, clinics, options))
    clinics_map = check.mapping(data["clinics"], "data.clinics")
    if not clinics_map:
        raise check.fail("data.clinics", "must name at least one clinic")
    dirs: dict[str, Path] = {}
    for name, folder in clinics_map.items():
        if not _NAME_RE.match(name):
            raise check.fail(f"data.clinics.{name}", "client name must be letters, digits, . _ -")
        if not isinstance(folder, str) or not folder:
            raise check.fail(f"data.clinics.{name}", f"must be a folder path, got {folder!r}")
        path = Path(folder).expanduser()
        if not path.is_absolute():
            if base is None:
                raise check.fail(f"data.clinics.{name}", "relative path needs an experiment file")
            path = base / path
        dirs[name] = path.resolve()
    return DataSpec(clinic_dirs=dirs)


def _session(check: _Checker, value: Any) -> SessionSpec:
    s = check.mapping(value, "session", tuple(f.name for f in dataclasses.fields(SessionSpec)))
    default = SessionSpec()
    aggregator = check.choice(s.get("aggregator", default.aggregator), "session.aggregator",
                              AGGREGATORS)
    kwargs = dict(check.mapping(s.get("aggregator_kwargs"), "session.aggregator_kwargs"))
    if kwargs and aggregator == "fedavg":
        raise check.fail("session.aggregator_kwargs", f"{aggregator} takes no kwargs")
    allowed = FEDAVGM_KWARGS if aggregator == "fedavgm" else FEDOPT_KWARGS
    for key, val in kwargs.items():
        full = f"session.aggregator_kwargs.{key}"
        if key not in allowed:
            raise check.fail(full, f"unknown {aggregator} kwarg "
                                   f"(allowed: {', '.join(allowed)})")
        if allowed[key] is str:
            check.choice(val, full, SERVEROPTS)
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0 \
                or val != val or val == float("inf"):
            raise check.fail(full, f"must be a finite non-negative number, got {val!r}")
        else:
            kwargs[key] = float(val)
    if aggregator == "fedavgm" and kwargs.get("momentum", 0.0) >= 1.0:
        raise check.fail("session.aggregator_kwargs.momentum",
                         f"must be below 1, got {kwargs['momentum']!r}")
    return SessionSpec(
        rounds=check.integer(s.get("rounds", default.rounds), "session.rounds", 1),
        aggregator=aggregator,
        aggregator_kwargs=kwargs,
        round_timeout=check.integer(s.get("round_timeout", default.round_timeout),
                                    "session.round_timeout", 1),
        min_clients=check.integer(s.get("min_clients", default.min_clients),
                                  "session.min_clients", 1),
        validate=check.boolean(s.get("validate", default.validate), "session.validate"),
        validation_timeout=check.integer(
            s.get("validation_timeout", default.validation_timeout),
            "session.validation_timeout", 1),
        secure_aggregation=_secure_aggregation(check, s, aggregator),
    )


def _secure_aggregation(check: _Checker, s: dict[str, Any], aggregator: str) -> bool:
    on = check.boolean(s.get("secure_aggregation", False), "session.secure_aggregation")
    if on and aggregator != "fedavg":
        # The server unmasks a weighted sum: that is FedAvg; FedOpt would need the sum
        # handed to a server optimiser, which is not built.
        raise check.fail("session.secure_aggregation", f"works with fedavg only, not {aggregator}")
    return on


def _clients(check: _Checker, value: Any) -> ClientsSpec:
    c = check.mapping(value, "clients", ("route", "app", "env"))
    route = check.choice(c.get("route", "callback"), "clients.route", ROUTES)
    app = c.get("app", DEFAULT_APP)
    if not isinstance(app, str) or not _APP_RE.match(app):
        raise check.fail("clients.app", f"must be MODULE:FACTORY, got {app!r}")
    env_in = check.mapping(c.get("env"), "clients.env")
    env: dict[str, str] = {}
    for key, val in env_in.items():
        check.primitive(val, f"clients.env.{key}")
        env[key] = "" if val is None else str(val)
    return ClientsSpec(route=route, app=app, env=env)


def _client_settings(check: _Checker, value: Any, rounds: int) -> dict[str, Any]:
    settings = dict(check.mapping(value, "client_settings"))
    for key, val in settings.items():
        full = f"client_settings.{key}"
        if isinstance(val, list):
            if len(val) != rounds:
                raise check.fail(full, f"a schedule needs one value per round ({rounds}), "
                                       f"got {len(val)}")
            for item in val:
                check.primitive(item, full)
        else:
            check.primitive(val, full)
    return settings


def _check_clinic_settings(check: _Checker, model: dict[str, Any], clinic: dict[str, Any],
                           client_settings: dict[str, Any], rounds: int) -> None:
    """Validate the clinic section and every round's server settings now, not at a clinic."""
    from fedseg_clinic.settings import SERVER_KEYS, settings_from_mapping, with_server_overrides

    settings = settings_from_mapping({"model": model, **clinic}, f"{check.source}: clinic")
    for key in client_settings:
        if key not in SERVER_KEYS:
            raise check.fail(f"client_settings.{key}",
                             f"not a per-round clinic setting (known: {', '.join(SERVER_KEYS)})")
    for k in range(1, rounds + 1):
        round_settings = {key: (v[k - 1] if isinstance(v, list) else v)
                          for key, v in client_settings.items()}
        try:
            with_server_overrides(settings, round_settings)
        except FedsegError as exc:
            raise check.fail("client_settings", f"round {k}: {exc}") from None


def _path(check: _Checker, top: dict[str, Any], key: str, base: Path | None) -> Path | None:
    """An optional path value, relative ones resolved against the experiment's folder."""
    value = top.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise check.fail(key, f"must be a path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        if base is None:
            raise check.fail(key, "relative path needs an experiment file")
        path = (base / path).resolve()
    return path


def parse_experiment(raw: Any, source: str = "<experiment>", base: Path | None = None
                     ) -> Experiment:
    """Validate an already-loaded YAML document.

    Args:
        raw: The parsed YAML (must be a mapping).
        source: What to call the document in error messages (usually the file path).
        base: Folder that relative paths are resolved against (the file's folder).

    Returns:
        The typed experiment.

    Raises:
        FedsegError: naming the source and the offending key.
    """
    check = _Checker(source)
    if not isinstance(raw, dict):
        raise FedsegError(f"{source}: an experiment must be a YAML mapping")
    top = check.mapping(raw, "", _TOP_KEYS)
    name = top.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise check.fail("name", f"must be 1-64 letters, digits, . _ - (got {name!r})")
    seed = check.integer(top.get("seed", 0), "seed", 0)
    if "data" not in top:
        raise check.fail("data", "missing (phantoms or clinics)")
    data = _data(check, top["data"], base)
    session = _session(check, top.get("session"))
    n_clinics = len(data.clinic_names())
    if session.min_clients > n_clinics:
        raise check.fail("session.min_clients",
                         f"{session.min_clients} is more than the {n_clinics} clinics")
    seed_builder = top.get("seed_builder", DEFAULT_SEED_BUILDER)
    if not isinstance(seed_builder, str) or not _APP_RE.match(seed_builder):
        raise check.fail("seed_builder", f"must be MODULE:FUNC, got {seed_builder!r}")
    package = _path(check, top, "package", base)
    # "random": a random seed model (seed_builder), never the shipped pretrained seed.
    random_seed = top.get("seed_weights") == RANDOM_SEED
    seed_weights = None if random_seed else _path(check, top, "seed_weights", base)
    if (seed_weights is not None or random_seed) and "seed_builder" in top:
        raise check.fail("seed_weights", "give seed_weights or seed_builder, not both")
    clients = _clients(check, top.get("clients"))
    if session.secure_aggregation and clients.route != "callback":
        # Round keys live in the client process between rounds; the package route starts
        # a fresh process per call.
        raise check.fail("session.secure_aggregation", "needs clients.route: callback")
    if session.secure_aggregation and n_clinics < 3:
        raise check.fail("session.secure_aggregation",
                         f"needs at least 3 clinics (the sum of 2 reveals each to the other), "
                         f"got {n_clinics}")
    ledgers = check.choice(top.get("ledgers", "run" if data.phantoms is not None else "data"),
                           "ledgers", LEDGER_SCOPES)
    model = dict(check.mapping(top.get("model"), "model"))
    clinic = dict(check.mapping(top.get("clinic"), "clinic"))
    privacy = clinic.get("privacy")
    distributed = isinstance(privacy, dict) and privacy.get("distributed") is True
    if distributed and not session.secure_aggregation:
        # Each clinic adds only a share of the noise: the server must see only the sum.
        raise check.fail("clinic.privacy.distributed",
                         "needs session.secure_aggregation: true (each clinic adds only a "
                         "share of the noise, so only the masked sum may leave it)")
    if isinstance(privacy, dict) and privacy.get("target_epsilon") is not None \
            and privacy.get("planned_rounds") is None:
        # A target epsilon covers this session's rounds unless the file says otherwise;
        # a distributed-DP session trains in all but its first (key exchange) round.
        planned = max(1, session.rounds - 1) if distributed else session.rounds
        clinic["privacy"] = {**privacy, "planned_rounds": planned}
    client_settings = _client_settings(check, top.get("client_settings"), session.rounds)
    if clients.app == DEFAULT_APP and top.get("package") is None:
        _check_clinic_settings(check, model, clinic, client_settings, session.rounds)
    return Experiment(
        name=name,
        seed=seed,
        data=data,
        session=session,
        clients=clients,
        model=model,
        clinic=clinic,
        client_settings=client_settings,
        network=dict(check.mapping(top.get("network"), "network")),
        seed_builder=seed_builder,
        package=package,
        ledgers=ledgers,
        seed_weights=seed_weights,
        pretrained_default=not random_seed and "seed_builder" not in top,
        source=None if base is None else Path(source),
        raw=raw,
    )


def load_experiment(path: Path) -> Experiment:
    """Read and validate an experiment YAML file.

    Args:
        path: The experiment file.

    Returns:
        The typed experiment (relative paths resolved against the file's folder).

    Raises:
        FedsegError: unreadable file, bad YAML, or a bad key (named with the file).
    """
    path = Path(path).expanduser().resolve()
    return parse_experiment(read_yaml(path, "experiment file"), str(path), path.parent)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a missing, unreadable or invalid file is a one-line FedsegError.

    Args:
        path: The file (already resolved).
        what: How to name it in the error ("experiment file", "sweep file").
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FedsegError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise FedsegError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise FedsegError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
                          ) from None


def with_overrides(exp: Experiment, **changes: Any) -> Experiment:
    """A copy with top-level fields replaced (used by the demo and tests)."""
    return dataclasses.replace(exp, **changes)
