"""What a curious server can make of one clinic's update under secure aggregation.

Under ``session.secure_aggregation`` the server stores, per clinic and round, the
clinic's FedAvg-weighted fixed-point update plus its pair masks with every other clinic
(docs/secure-aggregation.md). :func:`masked_update_view` produces exactly that with the
project's own masking code (the clinic and two peers, fresh keys) and reads it back the
way an attacker who knows the protocol would: as that clinic's fixed-point update. The
inversion attack then runs on this view with the same batch, steps and noise as on the
plain update (``fedseg attack invert --simulate --secure-aggregation``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedseg_clinic.privacy import secagg

ROUND_CONTEXT = "attack|2"


def masked_update_view(global_weights: Sequence[np.ndarray],
                       client_weights: Sequence[np.ndarray], weight: int,
                       peers: int = 2) -> list[np.ndarray]:
    """The client's weights as the server sees them: global + its masked update, decoded.

    Args:
        global_weights: What the client received.
        client_weights: What it trained (its plain update is the difference).
        weight: Its FedAvg weight (example count).
        peers: Other clinics in the round (each adds one mask).
    """
    ids = ["clinic-victim"] + [f"clinic-peer-{i}" for i in range(peers)]
    keys = {i: secagg.new_private_key() for i in ids}
    public = {i: secagg.public_bytes(k) for i, k in keys.items()}
    deltas = [np.asarray(c, np.float64) - np.asarray(g, np.float64)
              for g, c in zip(global_weights, client_weights, strict=True)]
    stored = secagg.quantise(deltas, weight)
    secagg.apply_pair_masks(stored, ids[0], keys[ids[0]], public, ROUND_CONTEXT)
    decoded = secagg.dequantise(stored, weight)
    return [(np.asarray(g, np.float64) + d).astype(np.asarray(g).dtype)
            for g, d in zip(global_weights, decoded, strict=True)]
