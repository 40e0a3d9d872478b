"""Build the initial global model (the seed) from the compute package's model code.

The seed is the U-Net of :func:`fedseg_clinic.model.unet.build_unet` with a seeded
initialisation, saved as fedn's numpyhelper npz by the compute package's own
:func:`fedseg_clinic.model.seed.write_seed_weights` (the package's ``build`` entry point
calls the same function), with a JSON sidecar (``seed.json`` for ``seed.npz``, see
fedseg_clinic.model.record) recording the organ set and model config. Clients must be
configured with the same model settings, or their weights will not load
(``apply_weights`` says which array; a head of another organ set is named).
"""

from __future__ import annotations

from fedseg_clinic.model.seed import write_seed_weights

# The operator's name for it (experiment files name seed builders as "module:function").
build_seed = write_seed_weights

__all__ = ["build_seed"]
