"""Baselines without federation: pooled (the upper bound) and local-only (today's practice).

Both train with the clinics' own code (:class:`fedseg_clinic.app.ClinicApp`, the
experiment's ``model`` and ``clinic`` sections, every round's ``client_settings``) from
the experiment's seed model, and validate after every block ("round") on *each*
clinic's own validation set with ``ClinicApp.validate``. No FEDn is involved.

- **pooled**: one trainer on a temporary clinic folder (``<run>/pooled-data/``) whose
  manifest lists every clinic's training cases (symlinked case folders). Compute is
  matched to the federated run: block k takes ``local_steps_k x C`` DP-SGD steps of the
  same expected batch size (C = number of clinics), so the whole run processes as many
  per-patient gradients as the federated run (rounds x local steps x clinics x batch
  size). DP settings are the experiment's; the ledger accounts them over the pooled N
  (q = batch_size / N_pooled; delta 1 / (10 N_pooled) unless the experiment sets one).
  Its training metadata is logged as client ``pooled``; validation rows per clinic.
- **local**: every clinic trains alone from the seed for the same rounds x local
  steps, keeping its own weights from round to round, and is validated on its own
  validation set. Rows per clinic, exactly like a federated round.

Output (``<runs_dir>/<name>-<kind>/``): rounds.csv (round log format, plus per round the
global ``round_seconds`` and n_val-weighted means of the validation metrics), run.json
(``kind``, config snapshot, seed, versions, timings, ``baseline`` = what "matched"
means), models/ (``round-<k>.npz``; local: ``<clinic>/round-<k>.npz``; each folder with a
``model.json`` record whose ``organs_trained`` lists the organs contoured in that model's
training data - a local clinic's protocol, the union for pooled - so that scoring and
``fedseg predict`` label only those; run.json ``baseline.organs_trained`` per model), seed.npz,
settings/, clients/<name>/state, data/ (generated phantoms), privacy/<name>/ (privacy
ledgers of the pooled trainer, and of every clinic under ``ledgers: run``; with
``ledgers: data`` a local baseline spends from each clinic's own ledger, with its data).
The pooled baseline is a counterfactual (no clinic pools its patients): its spending is
kept in the run's ledger, not in the clinics' (docs/privacy-model.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.orchestration import budget
from fedseg.orchestration.experiment import DEFAULT_APP, Experiment
from fedseg.orchestration.runlog import (
    GLOBAL,
    MODELS_DIR,
    RoundRecord,
    write_rounds,
    write_run_info,
)
from fedseg.orchestration.runner import (
    format_metric,
    package_versions,
    prepare_data,
    prepare_seed,
    utc_now_iso,
    write_clinic_settings,
)
from fedseg_clinic.cases import Manifest, read_manifest, write_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.settings import (
    ENV_CLIENT_NAME,
    ENV_DATA_DIR,
    ENV_PRIVACY_DIR,
    ENV_RUN_NAME,
    ENV_SETTINGS,
    ENV_STATE_DIR,
    load_settings,
    with_server_overrides,
)

logger = logging.getLogger(__name__)

KINDS = ("pooled", "local")
POOLED_CLIENT = "pooled"
POOLED_DATA_DIR = "pooled-data"
# Key separating clinic and case id in the pooled folder's case names.
_SEP = "--"

Progress = Callable[[str], None]
AppFactory = Callable[[Any], Any]


@dataclasses.dataclass
class BaselineResult:
    """What a baseline run ended with."""

    run_dir: Path
    kind: str
    status: str
    rounds_done: int
    failures: list[dict[str, Any]]


def baseline_name(exp: Experiment, kind: str) -> str:
    """Run folder name of a baseline: ``<experiment name>-<kind>``."""
    return f"{exp.name}-{kind}"


def build_pooled_folder(clinic_dirs: dict[str, Path], out: Path) -> Path:
    """A clinic folder holding every clinic's *training* cases (symlinks), one manifest.

    Case folders are named ``<clinic>--<case id>`` so ids of different clinics cannot
    collide; the cases themselves are not copied.

    Args:
        clinic_dirs: clinic name -> cases folder (with manifest.json).
        out: the folder to create (replaced if it exists).

    Returns:
        ``out``.

    Raises:
        FedsegError: a clinic folder has no (readable) manifest or no training case.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    entries = []
    for clinic, folder in clinic_dirs.items():
        manifest = read_manifest(folder)
        train = manifest.split("train")
        if not train:
            raise FedsegError(f"{folder}: clinic {clinic} has no training cases to pool")
        for entry in train:
            name = f"{clinic}{_SEP}{entry.case_id}"
            os.symlink((folder / entry.case_id).resolve(), out / name,
                       target_is_directory=True)
            entries.append(dataclasses.replace(entry, case_id=name))
    write_manifest(Manifest(clinic=POOLED_CLIENT, cases=entries,
                            extra={"pooled_from": {k: str(v) for k, v in clinic_dirs.items()}}),
                   out)
    return out


def _clinic_app(exp: Experiment, run_dir: Path, name: str, index: int, data_dir: Path,
                factory: AppFactory) -> Any:
    """A ClinicApp configured exactly as the clinic's client would be (FEDSEG_* settings).

    ``index`` is the clinic's position (its training seed is ``seed + index`` unless the
    experiment sets one, as in a federated run).
    """
    environ = {
        ENV_SETTINGS: str(write_clinic_settings(exp, run_dir, name, index)),
        ENV_DATA_DIR: str(data_dir),
        ENV_STATE_DIR: str(run_dir / "clients" / name / "state"),
        ENV_CLIENT_NAME: name,
        ENV_RUN_NAME: run_dir.name,
    }
    # Ledgers as in a federated run (orchestration/budget.py); the pooled trainer's data
    # folder is the run's own (symlinks), so its ledger is the run's too.
    if exp.ledgers == "run" or name == POOLED_CLIENT:
        environ[ENV_PRIVACY_DIR] = str(budget.run_privacy_dir(run_dir, name))
    return factory(load_settings(environ))


def _weighted_means(validations: dict[str, dict[str, float]]) -> dict[str, float]:
    """n_val-weighted mean of each validation metric over clinics (NaN values left out)."""
    names = sorted({m for vals in validations.values() for m in vals if m != "n_val"})
    out = {}
    for metric in names:
        total = weight_sum = 0.0
        for vals in validations.values():
            value = vals.get(metric, math.nan)
            weight = vals.get("n_val", 1.0)
            if math.isnan(value):
                continue
            weight = weight if math.isfinite(weight) and weight > 0 else 1.0
            total += value * weight
            weight_sum += weight
        out[metric] = total / weight_sum if weight_sum else math.nan
    return out


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trained_organs(app: Any) -> tuple[str, ...]:
    """The organs contoured in a trainer's training cases, in its organ set's order."""
    labelled = {o for case in app.train_cases for o in case.meta.labelled_organs}
    return tuple(o for o in app.organs.organs if o in labelled)


def _write_model_records(exp: Experiment, run_dir: Path, kind: str,
                         trained: dict[str, tuple[str, ...]]) -> None:
    """``models/model.json`` (pooled) or ``models/<clinic>/model.json`` (local)."""
    from fedseg_clinic.model.record import FOLDER_RECORD_NAME, write_record
    from fedseg_clinic.model.unet import UNetConfig

    config = UNetConfig.from_dict(dict(exp.model))
    for name, organs in trained.items():
        folder = run_dir / MODELS_DIR if kind == "pooled" else run_dir / MODELS_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        write_record(folder / FOLDER_RECORD_NAME, config, organs)


def _save_model(weights: list[np.ndarray], path: Path) -> None:
    from fedseg_clinic.model.weights import save_weights_npz

    save_weights_npz(weights, path)


def run_baseline(exp: Experiment, kind: str, runs_dir: Path, *,
                 progress: Progress | None = None, overwrite: bool = False,
                 app_factory: AppFactory | None = None) -> BaselineResult:
    """Train the pooled or local-only baseline of ``exp``.

    Args:
        exp: the validated experiment (its clinics must use the default clinic app).
        kind: "pooled" or "local".
        runs_dir: parent of the run folder ``<exp.name>-<kind>``.
        progress: called with one line per step and per block.
        overwrite: replace a non-empty run folder.
        app_factory: builds a clinic app from ClinicSettings (default ClinicApp).

    Returns:
        The outcome; ``status`` is "finished" or "failed: ...".

    Raises:
        FedsegError: bad input (unknown kind, existing folder, bad data or settings).
        KeyboardInterrupt: re-raised after run.json says "interrupted".
    """
    if kind not in KINDS:
        raise FedsegError(f"baseline kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if app_factory is None:
        from fedseg_clinic.app import ClinicApp

        if exp.clients.app != DEFAULT_APP:
            raise FedsegError(f"{exp.source or exp.name}: clients.app: baselines train with "
                              f"the clinic app ClinicApp, not {exp.clients.app}")
        app_factory = ClinicApp
    say = progress or (lambda _line: None)
    run_dir = Path(runs_dir).resolve() / baseline_name(exp, kind)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedsegError(f"{run_dir}: run folder exists and is not empty "
                              "(choose another name or --overwrite)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rounds = exp.session.rounds
    info: dict[str, Any] = {
        "name": run_dir.name, "kind": kind, "experiment": exp.name, "seed": exp.seed,
        "status": "starting", "started_at": utc_now_iso(),
        "experiment_file": str(exp.source) if exp.source else None, "config": exp.raw,
        "versions": package_versions(), "timings": {}, "failures": [], "rounds_done": 0,
    }
    timings: dict[str, float] = info["timings"]
    write_run_info(run_dir, info)
    t_start = time.monotonic()
    try:
        tic = time.monotonic()
        data_dirs = prepare_data(exp, run_dir)
        budget.check_synthetic(exp, data_dirs)
        timings["data_seconds"] = round(time.monotonic() - tic, 3)
        names = list(data_dirs)
        say(f"{kind} baseline of {exp.name}: {len(names)} clinics ({', '.join(names)}), "
            f"{rounds} blocks, run folder {run_dir}")
        tic = time.monotonic()
        # The same seed model as the federated run (a pretrained one included).
        info["seed_model"] = prepare_seed(exp, run_dir / "seed.npz")
        from fedseg_clinic.model.weights import load_weights_npz

        seed_weights = load_weights_npz(run_dir / "seed.npz")
        timings["seed_seconds"] = round(time.monotonic() - tic, 3)
        tic = time.monotonic()
        validators = {n: _clinic_app(exp, run_dir, n, i, data_dirs[n], app_factory)
                      for i, n in enumerate(names)}
        if kind == "pooled":
            pooled_dir = build_pooled_folder(data_dirs, run_dir / POOLED_DATA_DIR)
            trainers = {POOLED_CLIENT: _clinic_app(exp, run_dir, POOLED_CLIENT, len(names),
                                                   pooled_dir, app_factory)}
            steps_factor = len(names)
            info["baseline"] = {
                "matched": "same total DP-SGD steps x expected batch size as the federated "
                           "run: each block takes local_steps x clinics steps",
                "steps_per_block_factor": steps_factor,
                "n_train_pooled": len(trainers[POOLED_CLIENT].train_cases),
            }
        else:
            trainers = validators
            steps_factor = 1
            info["baseline"] = {
                "matched": "each clinic alone, rounds x local_steps steps, own weights "
                           "carried from round to round",
                "steps_per_block_factor": 1,
            }
        info["baseline"]["n_train"] = {n: len(validators[n].train_cases) for n in names}
        # The organs each model learns from contours: a local clinic's protocol (a model
        # of clinic-b, which never draws the larynx, must not be asked for larynx).
        trained = {t: trained_organs(app) for t, app in trainers.items()}
        info["baseline"]["organs_trained"] = {t: list(o) for t, o in trained.items()}
        _write_model_records(exp, run_dir, kind, trained)
        timings["apps_seconds"] = round(time.monotonic() - tic, 3)
        weights = {t: [np.array(w) for w in seed_weights] for t in trainers}
        info["status"] = "running"
        write_run_info(run_dir, info)
        records: list[RoundRecord] = []
        for k in range(1, rounds + 1):
            records.extend(_block(exp, kind, k, trainers, validators, weights, steps_factor,
                                  run_dir, info, say))
            write_rounds(run_dir, records)
            info["rounds_done"] = k
            write_run_info(run_dir, info)
        info["status"] = "finished"
    except KeyboardInterrupt:
        info["status"] = "interrupted"
        raise
    except FedsegError as exc:
        info["status"] = f"failed: {exc}"
        raise
    finally:
        timings["total_seconds"] = round(time.monotonic() - t_start, 3)
        info["finished_at"] = utc_now_iso()
        write_run_info(run_dir, info)
    return BaselineResult(run_dir=run_dir, kind=kind, status=info["status"],
                          rounds_done=info["rounds_done"], failures=info["failures"])


def _block(exp: Experiment, kind: str, k: int, trainers: dict[str, Any],
           validators: dict[str, Any], weights: dict[str, list[np.ndarray]],
           steps_factor: int, run_dir: Path, info: dict[str, Any],
           say: Progress) -> list[RoundRecord]:
    """Train every trainer one block, validate on each clinic; the block's records."""
    from fedseg_clinic.privacy.ledger import BudgetExceededError

    tic = time.monotonic()
    round_settings: dict[str, Any] = {**exp.settings_for_round(k),
                                      "round_id": f"{run_dir.name}-{k}"}
    records: list[RoundRecord] = []
    train_meta: dict[str, dict[str, float]] = {}
    for name, app in trainers.items():
        settings = dict(round_settings)
        merged = with_server_overrides(app.settings, round_settings)
        # Equal compute: the pooled trainer takes every clinic's steps; with local epochs
        # its pooled N already scales them.
        if steps_factor != 1 and merged.training.local_epochs <= 0:
            settings["local_steps"] = merged.training.local_steps * steps_factor
        try:
            new, meta = app.train(weights[name], settings)
        except BudgetExceededError as exc:
            # Like a clinic that refuses a federated round: no update, weights unchanged.
            info["failures"].append({"round": k, "client": name, "task": "train",
                                     "error": str(exc)})
            records.append(RoundRecord(k, name, "train_failed", 1.0))
            continue
        weights[name] = new
        meta_f = {key: _as_float(v) for key, v in meta.items()}
        train_meta[name] = meta_f
        records.extend(RoundRecord(k, name, m, v) for m, v in meta_f.items())
        records.append(RoundRecord(k, name, "train_failed", 0.0))
    if kind == "pooled":
        _save_model(weights[POOLED_CLIENT], run_dir / MODELS_DIR / f"round-{k}.npz")
    else:
        for name in trainers:
            _save_model(weights[name], run_dir / MODELS_DIR / name / f"round-{k}.npz")
    validations: dict[str, dict[str, float]] = {}
    if exp.session.validate:
        for name, app in validators.items():
            v_tic = time.monotonic()
            model = weights[POOLED_CLIENT] if kind == "pooled" else weights[name]
            vals = {m: _as_float(v) for m, v in app.validate(model).items()}
            vals["validate_seconds"] = time.monotonic() - v_tic
            validations[name] = vals
            records.extend(RoundRecord(k, name, m, v) for m, v in vals.items())
        records.extend(RoundRecord(k, GLOBAL, m, v)
                       for m, v in _weighted_means(validations).items())
    seconds = time.monotonic() - tic
    records.append(RoundRecord(k, GLOBAL, "round_seconds", seconds))
    say(_block_line(k, exp.session.rounds, kind, trainers, validations, train_meta, seconds))
    return records


def _block_line(k: int, rounds: int, kind: str, trainers: dict[str, Any],
                validations: dict[str, dict[str, float]],
                train_meta: dict[str, dict[str, float]], seconds: float) -> str:
    """"block 2/5  clinic-1 dice 0.41  clinic-2 dice 0.38  pooled eps 1.20  12.3 s"."""
    parts = [f"block {k}/{rounds}"]
    for name in validations or trainers:
        text = f"{name} dice {format_metric(validations.get(name, {}).get('val_dice_mean'))}"
        if kind == "local":
            text += _eps_text(name, train_meta)
        parts.append(text)
    if kind == "pooled":
        parts.append(f"{POOLED_CLIENT}{_eps_text(POOLED_CLIENT, train_meta)}".rstrip())
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def _eps_text(name: str, train_meta: dict[str, dict[str, float]]) -> str:
    meta = train_meta.get(name)
    if meta is None:
        return " FAILED"
    eps = meta.get("epsilon", math.nan)
    return f" eps {format_metric(eps)}" if math.isfinite(eps) else " eps inf"
