"""A public-pretrained seed: the initial global model trained (without DP) on public data.

DP-SGD from a random initialisation learns little at a useful epsilon on a few hundred
patients (docs/findings.md). The field's answer is transfer: pretrain on data that is
*not* any clinic's, then fine-tune privately (Tramer & Boneh 2021; De et al. 2022;
Berrada et al. 2023). The public data here is either a cases folder given by path (e.g.
part of a public data set imported with ``fedseg data import``) or phantoms from a
distribution different from the clinics': the ``iid`` preset (one reference scanner,
no non-iid scanner archetypes) under its own seed, so no clinic patient is in it.

Pretraining runs the clinic's own training code (:class:`fedseg_clinic.app.ClinicApp`,
privacy off) and measures the seed's Dice on the public set's validation cases. The
result is the seed npz plus a sidecar JSON (``<seed>.json``) that records what it was
trained on, how long, its Dice and the npz's sha256; ``fedseg run`` copies the sidecar
into run.json, so every run says where its initial model came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_json

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1
# The seed shipped for `fedseg demo` (rebuilt by `fedseg seed pretrain --demo`).
DEMO_SEED = Path(__file__).resolve().parent / "pretrained" / "demo-seed.npz"


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """What a seed is pretrained on and how.

    Attributes:
        model: UNetConfig fields; the clinics must use the same.
        cases_dir: a public cases folder (train/val splits); None generates phantoms.
        phantom_preset: preset of the generated public phantoms.
        phantom_seed: their seed; keep it apart from every clinic's (experiment) seed.
        patients: public phantom patients (train + val).
        size: phantom matrix size.
        steps: optimiser steps.
        batch_size: expected patients per step.
        patch_size: training patch (z, y, x).
        learning_rate: Adam step size.
        init_seed: seed of the random initialisation the pretraining starts from.
        init_weights: start from this pretrained seed instead (its sidecar is kept in
            the new one's ``continued_from``), e.g. to extend a seed to more scanners.
        training: further clinic training settings (``TrainingSettings`` fields other
            than the ones above), e.g. ``{"dice_classes": "present",
            "foreground_fraction": 0.9}`` for the clinics' recipe on real CT, where the
            default loss learns background only (docs/findings.md, "OpenKBP").
        val_overlap: tile overlap of the seed's own validation (0 is the cheapest).
    """

    model: dict[str, Any]
    cases_dir: Path | None = None
    phantom_preset: str = "iid"
    phantom_seed: int = 1000
    patients: int = 40
    size: int = 48
    steps: int = 300
    batch_size: int = 4
    patch_size: tuple[int, int, int] = (32, 32, 32)
    learning_rate: float = 0.01
    init_seed: int = 0
    init_weights: Path | None = None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    val_overlap: float = 0.25

    def to_json(self) -> dict[str, Any]:
        """JSON form for the sidecar."""
        data = dataclasses.asdict(self)
        # Fields added after the demo seed shipped: left out at their defaults, so its
        # sidecar still describes the recipe exactly.
        if not data["training"]:
            del data["training"]
        if data["val_overlap"] == 0.25:
            del data["val_overlap"]
        data["cases_dir"] = str(self.cases_dir) if self.cases_dir else None
        data["init_weights"] = str(self.init_weights) if self.init_weights else None
        data["patch_size"] = list(self.patch_size)
        return data


# The demo's seed, in two stages (``fedseg seed pretrain --demo`` runs both):
# 1. the demo U-Net on 40 public iid phantoms (one reference scanner, phantom seed 1000,
#    not the demo clinics' 7): 400 non-DP Adam steps of 4 patients on 24^3 patches;
# 2. continued on 60 public non-iid phantoms (phantom seed 1001: the three scanner types,
#    other patients than any clinic's), 150 steps at learning rate 0.005. Stage 1 alone
#    transferred poorly to the noisy thick-slice clinic (docs/findings.md).
DEMO_PRETRAIN = PretrainSpec(model={"levels": 3, "base_filters": 8, "groups": 4},
                             steps=400, batch_size=4, patch_size=(24, 24, 24))
DEMO_CONTINUE = dataclasses.replace(DEMO_PRETRAIN, phantom_preset="non-iid",
                                    phantom_seed=1001, patients=60, steps=150,
                                    learning_rate=0.005)


# Training settings the spec sets itself (pretraining is plain Adam, no DP).
_SPEC_TRAINING_KEYS = frozenset({"optimizer", "learning_rate", "local_steps", "batch_size",
                                 "patch_size", "seed"})


def pretrain_demo_seed(out: Path, work_dir: Path | None = None,
                       progress: Any = None) -> dict[str, Any]:
    """Rebuild the demo's seed: stage 1 into ``<out>.stage1.npz``, stage 2 into ``out``."""
    stage1 = Path(out).with_suffix(".stage1.npz")
    pretrain_seed(DEMO_PRETRAIN, stage1, work_dir=work_dir, progress=progress)
    return pretrain_seed(dataclasses.replace(DEMO_CONTINUE, init_weights=stage1), out,
                         work_dir=work_dir, progress=progress)


def sidecar_path(seed_path: Path) -> Path:
    """``seed.npz`` -> ``seed.json``."""
    return Path(seed_path).with_suffix(".json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _public_cases(spec: PretrainSpec, work: Path) -> tuple[Path, dict[str, Any]]:
    """The public cases folder and a description of it for the sidecar."""
    if spec.cases_dir is not None:
        folder = Path(spec.cases_dir).expanduser().resolve()
        if not (folder / "manifest.json").is_file():
            raise FedsegError(f"{folder}: public cases folder has no manifest.json")
        return folder, {"kind": "cases", "path": str(folder)}
    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec

    description = {"kind": "phantoms", "preset": spec.phantom_preset,
                   "seed": spec.phantom_seed, "patients": spec.patients, "size": spec.size}
    if spec.phantom_preset != "non-iid":
        bench = preset_spec(spec.phantom_preset, clinics=1, patients=spec.patients,
                            size=spec.size, seed=spec.phantom_seed)
        generate_benchmark(bench, work / "public", overwrite=True)
        return work / "public" / "clinic-1", description
    # non-iid: three scanner archetypes (other patients than any clinic's, by the seed),
    # pooled into one public folder, train and validation splits kept.
    import dataclasses as dc
    import os

    from fedseg_clinic.cases import Manifest, read_manifest, write_manifest

    bench = preset_spec("non-iid", clinics=3, patients=max(1, spec.patients // 3),
                        size=spec.size, seed=spec.phantom_seed, quantity_skew=100.0)
    generate_benchmark(bench, work / "public", overwrite=True)
    pooled = work / "public-pooled"
    shutil.rmtree(pooled, ignore_errors=True)
    pooled.mkdir(parents=True)
    entries = []
    for clinic in sorted(p.name for p in (work / "public").iterdir() if p.is_dir()):
        folder = work / "public" / clinic
        if not (folder / "manifest.json").is_file():
            continue
        for entry in read_manifest(folder).cases:
            name = f"{clinic}--{entry.case_id}"
            os.symlink((folder / entry.case_id).resolve(), pooled / name,
                       target_is_directory=True)
            entries.append(dc.replace(entry, case_id=name))
    write_manifest(Manifest(clinic="public", cases=entries), pooled)
    return pooled, description


def pretrain_seed(spec: PretrainSpec, out: Path, work_dir: Path | None = None,
                  progress: Any = None) -> dict[str, Any]:
    """Pretrain a seed without DP on public data; write ``out`` and its sidecar.

    Args:
        spec: data and schedule.
        out: the seed npz (numpyhelper order); the sidecar goes beside it.
        work_dir: where public phantoms are generated (default: a temporary folder,
            removed afterwards).
        progress: optional callable given one line per stage.

    Returns:
        The sidecar's content.

    Raises:
        FedsegError: bad spec or data.
    """
    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.model.weights import save_weights_npz
    from fedseg_clinic.settings import settings_from_mapping

    say = progress or (lambda _line: None)
    if spec.steps < 1:
        raise FedsegError(f"pretraining steps={spec.steps} must be >= 1")
    clash = sorted(set(spec.training) & _SPEC_TRAINING_KEYS)
    if clash:
        raise FedsegError(f"pretraining training setting {clash[0]!r}: give it as the "
                          "spec's own field (the CLI option), not in training")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fedseg-seed-")) if work_dir is None else None
    work = Path(work_dir) if work_dir is not None else tmp
    assert work is not None
    try:
        folder, data = _public_cases(spec, work)
        say(f"public data: {data}")
        settings = settings_from_mapping({
            "model": dict(spec.model),
            "training": {**spec.training,
                         "optimizer": "adam", "learning_rate": spec.learning_rate,
                         "local_steps": spec.steps, "batch_size": spec.batch_size,
                         "patch_size": list(spec.patch_size), "seed": spec.init_seed},
            "privacy": {"enabled": False},
            "validation": {"patch_size": list(spec.patch_size),
                           "overlap": spec.val_overlap},
            "data_dir": str(folder), "state_dir": str(work / "state"),
            "client_name": "public",
        }, "seed pretraining")
        app = ClinicApp(settings)
        if spec.batch_size > len(app.train_cases):
            raise FedsegError(f"pretraining batch_size {spec.batch_size} exceeds the "
                              f"{len(app.train_cases)} public training patients")
        initial = [w.copy() for w in app.model.get_weights()]
        continued_from = None
        if spec.init_weights is not None:
            from fedseg_clinic.model.weights import load_weights_npz

            continued_from = read_seed_info(spec.init_weights, dict(spec.model))
            initial = load_weights_npz(spec.init_weights)
        tic = time.perf_counter()
        weights, meta = app.train(initial, {})
        train_seconds = time.perf_counter() - tic
        say(f"trained {spec.steps} steps in {train_seconds:.0f} s, loss {meta['train_loss']:.3f}")
        save_weights_npz(weights, out)  # before validation: the long part is never lost
        metrics = app.validate(weights)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    dice = {k.removeprefix("val_dice_"): v for k, v in metrics.items()
            if k.startswith("val_dice_") and k != "val_dice_mean"}
    sidecar = {
        "version": SIDECAR_VERSION,
        "kind": "pretrained",
        "dp": False,
        "public_data": data,
        "n_train": len(app.train_cases),
        "n_val": int(metrics["n_val"]),
        "spec": spec.to_json(),
        "model": dict(spec.model),
        "steps": spec.steps,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "dice_mean": metrics["val_dice_mean"],
        "dice": dice,
        "weights_sha256": file_sha256(out),
        "continued_from": continued_from,
    }
    atomic_write_json(sidecar_path(out), sidecar, indent=2)
    say(f"seed Dice {metrics['val_dice_mean']:.3f} on {sidecar['n_val']} public val cases "
        f"-> {out}")
    return sidecar


def read_seed_info(seed_path: Path, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar of a pretrained seed, checked against its npz (and the model).

    Raises:
        FedsegError: missing npz or sidecar, a sidecar of other weights, or a model
            config other than ``model``.
    """
    seed_path = Path(seed_path)
    side = sidecar_path(seed_path)
    if not seed_path.is_file():
        raise FedsegError(f"{seed_path}: seed weights file does not exist")
    try:
        info = json.loads(side.read_text())
    except FileNotFoundError:
        raise FedsegError(f"{side}: the seed's sidecar is missing (what was it trained "
                          "on?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{side}: unreadable seed sidecar ({exc})") from None
    if not isinstance(info, dict) or info.get("weights_sha256") != file_sha256(seed_path):
        raise FedsegError(f"{side}: does not describe {seed_path.name} (sha256 differs)")
    if model is not None and dict(info.get("model") or {}) != dict(model):
        raise FedsegError(f"{seed_path}: pretrained for model {info.get('model')}, but the "
                          f"experiment's model is {dict(model)}")
    return info
