"""The seed: the initial global model's weights, built from the model settings alone.

One function serves the operator (``fedseg.seed.build_seed``, ``fedseg run``) and the
compute package's ``build`` entry point, so both write the same weights for the same
settings and seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def write_seed_weights(model_config: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """Build the U-Net for ``model_config`` with a seeded initialisation and save it.

    Args:
        model_config: UNetConfig fields (levels, base_filters, groups, residual, dropout,
            organ_set).
        out: the numpyhelper npz file to write (atomically); its model record (organ set,
            config) goes beside it (``seed.npz`` -> ``seed.json``, model/record.py).
        seed: initialisation seed.

    Returns:
        ``out``.
    """
    from fedseg_clinic.model.record import sidecar_path, write_record
    from fedseg_clinic.model.unet import UNetConfig, build_unet
    from fedseg_clinic.model.weights import save_weights_npz

    config = UNetConfig.from_dict(model_config)
    model = build_unet(config, seed=seed)
    weights = [np.asarray(w) for w in model.get_weights()]
    save_weights_npz(weights, out)
    write_record(sidecar_path(Path(out)), config)  # which organ set the seed is for
    logger.info("seed model: %d arrays, %d parameters -> %s", len(weights),
                sum(w.size for w in weights), out)
    return Path(out)


__all__ = ["write_seed_weights"]
