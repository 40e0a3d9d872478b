"""Export one round's global model of a run as a self-contained model with a model card.

``export_model(RUN_DIR, K, OUT)`` writes ``OUT/model.keras`` (architecture + weights, no
optimiser) and ``OUT/model_card.json`` (fedseg_clinic.model.bundle.CARD_KEYS), which
``fedseg predict --model OUT`` needs and nothing else. The card says what the model is
and how it was made:

- ``organ_set`` (name, version, organs = output channels 1..n), ``model`` (U-Net config);
- ``patch_size``, ``overlap`` (sliding window), ``hu_window``, ``spacing`` (the clinics'
  import spacing, null when cases kept their native spacing) - how predict feeds the CT;
- ``run`` (name, kind, folder, experiment file, start), ``round`` (K) and ``rounds``
  (the last round in the log), ``clinics``;
- ``privacy``: per clinic, epsilon and delta spent up to round K, noise multiplier,
  clip norm and whether DP was on, as the clinics reported them in the round log
  (epsilon is null where a clinic never reported one; "inf" without DP);
- ``validation_dice``: round K's Dice per organ and mean on the clinics' validation
  splits (n_val-weighted mean over clinics, as the round log's global rows), with
  ``n_val``.

The folder is built beside OUT and renamed into place: no half-written export.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedseg.orchestration.runlog import GLOBAL, MODELS_DIR, RUN_NAME, pivot, read_rounds
from fedseg_clinic.errors import FedsegError

PRIVACY_METRICS: tuple[str, ...] = ("epsilon", "delta", "noise_multiplier", "l2_norm_clip",
                                    "dp")


def _finite(value: float | None) -> float | str | None:
    """JSON-safe number: NaN -> null, inf -> "inf"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def _last_up_to(table: dict[tuple[int, str], dict[str, float]], client: str, metric: str,
                k: int) -> float | None:
    """A client's last logged (non-NaN) value of a metric in rounds <= k."""
    for rnd in range(k, 0, -1):
        value = table.get((rnd, client), {}).get(metric)
        if value is not None and not math.isnan(value):
            return value
    return None


def model_card(run_dir: Path, k: int, loaded: Any) -> dict[str, Any]:
    """The card of round ``k``'s model of a run (see the module docstring)."""
    from fedseg_clinic.model.bundle import card_from_mapping

    try:
        info = json.loads((run_dir / RUN_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{run_dir / RUN_NAME}: unreadable run record ({exc})") from None
    table = pivot(read_rounds(run_dir))
    clients = sorted({c for _r, c in table if c != GLOBAL})
    rounds = max((r for r, _c in table), default=0)
    if k > rounds:
        raise FedsegError(f"{run_dir}: round {k} is not in the round log (last round "
                          f"{rounds})")
    privacy = {c: {m: _finite(_last_up_to(table, c, m, k)) for m in PRIVACY_METRICS}
               for c in clients}
    for values in privacy.values():
        if values["dp"] is not None:
            values["dp"] = bool(values["dp"])
    global_row = table.get((k, GLOBAL), {})
    dice = {o: _finite(global_row.get(f"val_dice_{o}")) for o in loaded.organs.organs}
    dice["mean"] = _finite(global_row.get("val_dice_mean"))
    n_val = sum(table.get((k, c), {}).get("n_val", 0.0) for c in clients)
    return card_from_mapping({
        "organ_set": loaded.organs.to_json(),
        "model": loaded.config.to_dict(),
        "patch_size": list(loaded.patch_size),
        "overlap": loaded.overlap,
        "hu_window": list(loaded.hu_window),
        "spacing": list(loaded.spacing) if loaded.spacing else None,
        "run": {"name": info.get("name"), "kind": info.get("kind", "federated"),
                "folder": str(run_dir.resolve()), "experiment_file": info.get("experiment_file"),
                "started_at": info.get("started_at"), "status": info.get("status"),
                "aggregator": (info.get("config") or {}).get("session", {}).get("aggregator")},
        "round": k,
        "rounds": rounds,
        "clinics": clients,
        "privacy": privacy,
        "validation_dice": {"per_organ": dice, "n_val": n_val},
        # A model of part of its organ set (the weights' record says so) keeps saying so.
        "organs_trained": (list(loaded.organs_trained)
                           if loaded.organs_trained is not None else None),
    })


def export_model(run_dir: Path, k: int, out: Path) -> Path:
    """Write round ``k``'s global model of ``run_dir`` to the folder ``out``.

    Raises:
        FedsegError: missing run/round/weights, an existing non-empty ``out``.
    """
    from fedseg_clinic.model.bundle import CARD_NAME, KERAS_NAME, load_model

    run_dir = Path(run_dir)
    if not (run_dir / RUN_NAME).is_file():
        raise FedsegError(f"{run_dir}: not a run folder (no {RUN_NAME})")
    weights = run_dir / MODELS_DIR / f"round-{k}.npz"
    if not weights.is_file():
        have = sorted(int(p.stem.split("-")[1]) for p in (run_dir / MODELS_DIR).glob("round-*.npz")
                      if p.stem.split("-")[1].isdigit())
        raise FedsegError(f"{weights}: no global model of round {k} (rounds saved: "
                          f"{', '.join(map(str, have)) or 'none'})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedsegError(f"{out}: exists and is not an empty folder")
    loaded = load_model(weights)
    card = model_card(run_dir, k, loaded)
    card["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    card["exported_at"] = datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        loaded.model.save(str(tmp / KERAS_NAME))
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
