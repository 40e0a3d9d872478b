"""FedAvgM: FedAvg with server momentum, run inside FEDn's hooks process.

fedn 0.33.0's ``fedopt`` aggregator offers Adam, Yogi and Adagrad but no plain server
momentum (Hsu et al. 2019, "Measuring the effects of non-identical data distribution").
``session.aggregator: fedavgm`` runs it as a ServerFunctions ``aggregate`` hook
(:func:`server_functions_source`); FEDn itself is asked for ``fedavg``, which is what it
falls back to should the hook ever be retired.

Each round, with the global model ``w``, the clinics' models ``w_i`` and their
``num_examples`` ``n_i``::

    delta = sum_i n_i (w_i - w) / sum_i n_i        # FedAvg's step (pseudo-gradient)
    v     = momentum * v + delta                   # v starts at 0 each session
    w'    = w + learning_rate * v

With ``momentum: 0`` and ``learning_rate: 1`` this is FedAvg exactly (tested). The
momentum buffer lives in the hooks object of the session (a per-session nonce in the
source makes FEDn build a fresh one). The hook also hands out the per-round client
settings, like the plain settings hook of :mod:`fedseg.orchestration.session`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from fedseg.orchestration.session import delegating_server_functions_source

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 1.0
DEFAULT_MOMENTUM = 0.9


def weighted_mean(client_updates: dict[str, Any]) -> tuple[list[np.ndarray], int] | None:
    """The ``num_examples``-weighted mean of the clients' models (float64), and the total.

    Args:
        client_updates: FEDn's ``{client_id: [model arrays, training_metadata]}``.

    Returns:
        (mean arrays, total weight), or None when no update carries a positive weight.
    """
    total: list[np.ndarray] | None = None
    weight_sum = 0
    for cid, entry in client_updates.items():
        model, meta = entry[0], entry[1]
        try:
            n = int(meta.get("num_examples", 0))
        except (AttributeError, TypeError, ValueError):
            n = 0
        if n <= 0:
            logger.warning("fedavgm: ignoring client %s (no positive num_examples)", cid)
            continue
        arrays = [np.asarray(a, np.float64) * n for a in model]
        total = arrays if total is None else [t + a for t, a in zip(total, arrays, strict=True)]
        weight_sum += n
    if total is None:
        return None
    return [t / weight_sum for t in total], weight_sum


class FedAvgMServer:
    """One session's FedAvgM state: the momentum buffer and the round's client settings."""

    def __init__(self, settings_by_round: list[dict[str, Any]], learning_rate: float,
                 momentum: float) -> None:
        """Start a session with no momentum yet.

        Args:
            settings_by_round: client settings of rounds 1..N (the last one repeats).
            learning_rate: server learning rate (1 = FedAvg's step size).
            momentum: momentum coefficient in [0, 1).
        """
        self.settings = settings_by_round or [{}]
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.velocity: list[np.ndarray] | None = None
        self.round = 0

    def client_settings(self) -> dict[str, Any]:
        """Round k's client settings (FEDn asks once per round, before training)."""
        self.round += 1
        return dict(self.settings[min(self.round, len(self.settings)) - 1])

    def aggregate(self, previous_global: list[np.ndarray],
                  client_updates: dict[str, Any]) -> list[np.ndarray]:
        """The new global model: a momentum step along the FedAvg pseudo-gradient.

        No usable update (all weights zero) leaves the model unchanged. A model whose
        shapes do not match is a programming error and raises: FEDn then retires the
        hook and averages by itself, which is FedAvg, not a corrupted model.
        """
        mean = weighted_mean(client_updates)
        if mean is None:
            logger.warning("fedavgm: no usable client update; global model unchanged")
            return previous_global
        avg, _ = mean
        delta = [a - np.asarray(g, np.float64)
                 for a, g in zip(avg, previous_global, strict=True)]
        if self.velocity is None:
            self.velocity = delta
        else:
            self.velocity = [self.momentum * v + d
                             for v, d in zip(self.velocity, delta, strict=True)]
        return [(np.asarray(g, np.float64) + self.learning_rate * v).astype(np.asarray(g).dtype)
                for g, v in zip(previous_global, self.velocity, strict=True)]


def server_functions_source(settings_by_round: list[dict[str, Any]], nonce: str,
                            learning_rate: float = DEFAULT_LEARNING_RATE,
                            momentum: float = DEFAULT_MOMENTUM) -> str:
    """Source of the ServerFunctions class FEDn's hooks process runs for a FedAvgM session.

    The hooks process imports fedseg (it runs from fedseg's environment); the class
    only forwards to :class:`FedAvgMServer`.
    """
    literal = json.dumps(settings_by_round or [{}], sort_keys=True, allow_nan=False)
    return delegating_server_functions_source("fedavgm", nonce, [
        "import json",
        "from fedseg.orchestration.server_momentum import FedAvgMServer",
        f"self.server = FedAvgMServer(json.loads({literal!r}), {float(learning_rate)!r},",
        f"                            {float(momentum)!r})",
    ])
