"""The compute package's FEDn entry points (the package route), over :class:`ClinicApp`.

FEDn runs ``python entrypoint.py <entry> <args>`` in the extracted package folder:

- ``build [OUT]``: write seed weights (numpyhelper npz) built from the model settings;
  OUT defaults to ``seed.npz`` beside entrypoint.py.
- ``startup``: start the clinic's warm worker (:mod:`fedseg_clinic.warm_worker`: it
  keeps TensorFlow and the traced model for the calls below), which checks the data
  folder; print a summary.
- ``train IN OUT``: read global weights IN and the server's settings from
  ``IN-metadata``; write the new weights OUT and ``OUT-metadata`` (JSON with
  num_examples, train_loss, local_steps, train_seconds, epsilon, delta,
  noise_multiplier, l2_norm_clip).
- ``validate IN OUT_JSON``: metrics of the weights on the clinic's validation cases.
- ``predict IN OUT_JSON``: predicted masks of the validation cases, written under
  ``<state_dir>/predictions/<case_id>/prediction.npz``; OUT_JSON lists them.

``entrypoint.py`` first tries the warm path (:mod:`fedseg_clinic.warm_client`):
``train`` / ``validate`` / ``predict`` hand their job to the clinic's warm worker, which
calls :func:`run_job` (the same files are read and written). Without one
(``FEDSEG_WARM_WORKER=0``, or it cannot start) this module's :func:`main` does the work
in the entry point's own process.

A user error prints one line on stderr and exits 1; a refused round (privacy budget)
exits 3 so that logs tell the two apart. Outputs are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError

EXIT_USER_ERROR = 1
EXIT_BUDGET = 3
USAGE = (
    "usage: entrypoint.py build [OUT] | startup | train IN OUT | validate IN OUT | predict IN OUT"
)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    from fedseg_clinic.io import atomic_write_json

    atomic_write_json(path, data)


def _read_server_settings(in_path: Path) -> dict[str, Any]:
    meta_path = Path(f"{in_path}-metadata")
    if not meta_path.exists():
        return {}
    try:
        data = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{meta_path}: unreadable server settings ({exc})") from None
    if not isinstance(data, dict):
        raise FedsegError(f"{meta_path}: server settings must be a JSON object")
    return data


def build(out: Path | None = None) -> Path:
    """Write seed weights from the package's model settings; return the path."""
    from fedseg_clinic.model.seed import write_seed_weights
    from fedseg_clinic.settings import default_settings_path, settings_from_mapping

    settings_path = Path(os.environ.get("FEDSEG_SETTINGS") or default_settings_path())
    import yaml

    try:
        raw = yaml.safe_load(settings_path.read_text()) or {}
    except OSError as exc:
        raise FedsegError(f"{settings_path}: cannot read settings ({exc.strerror})") from None
    settings = settings_from_mapping(raw, str(settings_path))
    target = out or Path(__file__).resolve().parent.parent / "seed.npz"
    return write_seed_weights(settings.model, target, seed=settings.training.seed)


def _run(argv: Sequence[str]) -> int:
    if not argv:
        raise FedsegError(USAGE)
    entry, args = argv[0], [Path(a) for a in argv[1:]]
    if entry == "build":
        path = build(args[0] if args else None)
        print(f"seed weights written to {path}")
        return 0
    from fedseg_clinic.app import ClinicApp

    if entry == "startup":
        app = ClinicApp.from_environment()
        print(json.dumps(app.data_summary(), default=str))
        return 0
    if entry not in ("train", "validate", "predict") or len(args) != 2:
        raise FedsegError(USAGE)
    run_job(ClinicApp.from_environment(), entry, args[0], args[1])
    return 0


def run_job(app: Any, entry: str, in_path: Path, out_path: Path) -> None:
    """Do one train / validate / predict job of ``app`` (here or in the warm worker).

    Args:
        app: The clinic app (:class:`fedseg_clinic.app.ClinicApp`).
        entry: "train", "validate" or "predict".
        in_path: The global weights (numpyhelper npz; ``IN-metadata`` for train).
        out_path: Where the result goes (atomically).
    """
    from fedseg_clinic.model.weights import load_weights_npz, save_weights_npz

    weights = load_weights_npz(in_path)
    if entry == "train":
        new_weights, metadata = app.train(weights, _read_server_settings(in_path))
        save_weights_npz(new_weights, out_path)
        _atomic_write_json(Path(f"{out_path}-metadata"), metadata)
    elif entry == "validate":
        _atomic_write_json(out_path, app.validate(weights))
    elif entry == "predict":
        _atomic_write_json(out_path, predict_cases(app, weights))
    else:
        raise FedsegError(USAGE)


def predict_cases(app: Any, weights: list[Any]) -> dict[str, Any]:
    """Predict every validation case; write label maps under the state folder."""
    import numpy as np

    from fedseg_clinic.io import atomic_output
    from fedseg_clinic.model.weights import apply_weights

    apply_weights(app.model, weights, "global model")
    out_dir = app.state_dir / "predictions"
    written = {}
    for case in app.val_cases:
        labels = np.argmax(app.predict_case(case), axis=-1).astype(np.uint8)
        case_dir = out_dir / case.meta.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(case_dir / "prediction.npz") as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, labels=labels)
        written[case.meta.case_id] = str(case_dir / "prediction.npz")
    return {"predictions": written, "n_cases": len(written)}


def main(argv: Sequence[str] | None = None) -> None:
    """Run one entry point; user errors become one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    from fedseg_clinic.privacy.ledger import BudgetExceededError

    try:
        code = _run(args)
    except BudgetExceededError as exc:
        print(f"fedseg: privacy budget: {exc}", file=sys.stderr)
        code = EXIT_BUDGET
    except FedsegError as exc:
        print(f"fedseg: error: {exc}", file=sys.stderr)
        code = EXIT_USER_ERROR
    sys.exit(code)
