"""Build the initial global model (the seed) from the compute package's model code.

The seed is the U-Net of :func:`fedseg_clinic.model.unet.build_unet` with a seeded
initialisation, saved as fedn's numpyhelper npz, with a JSON sidecar (``seed.json`` for
``seed.npz``, see fedseg_clinic.model.record) that records the organ set and model
config. Clients must be configured with the same model settings, or their weights will
not load (``apply_weights`` says which array; a head of another organ set is named).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def build_seed(model_config: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """Write seed weights for ``model_config`` (UNetConfig keys) to ``out``.

    Args:
        model_config: UNetConfig fields (levels, base_filters, groups, residual, dropout,
            organ_set).
        out: the npz file to write (atomically); its record goes beside it.
        seed: initialisation seed.

    Returns:
        ``out``.
    """
    import numpy as np

    from fedseg_clinic.model.record import sidecar_path, write_record
    from fedseg_clinic.model.unet import UNetConfig, build_unet
    from fedseg_clinic.model.weights import save_weights_npz

    config = UNetConfig.from_dict(model_config)
    model = build_unet(config, seed=seed)
    weights = [np.asarray(w) for w in model.get_weights()]
    save_weights_npz(weights, out)
    write_record(sidecar_path(out), config)
    logger.info("seed model: %d arrays, %d parameters -> %s", len(weights),
                sum(w.size for w in weights), out)
    return out
