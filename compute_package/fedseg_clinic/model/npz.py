"""Model weights on the wire: fedn's numpyhelper npz (keys "0".."n-1"), written plain.

fedn's helper writes ``np.savez_compressed``: 8 % smaller for trained float32 weights, but
14 s instead of 0.5 s for a 29M-parameter U-Net on a loaded core, at every hop of every
round (bench/RESULTS.md, "Model size"). Both forms load the same way (``np.load``).
numpy only: the API server, the combiners and clients without TensorFlow import this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def write_npz(arrays: Sequence[Any], target: Any) -> None:
    """Write weights as fedn's numpyhelper npz, without compression.

    Args:
        arrays: the weights (anything ``np.asarray`` takes).
        target: a binary file object, or a path (numpy appends ".npz" when it lacks it).
    """
    np.savez(target, **{str(i): np.asarray(a) for i, a in enumerate(arrays)})
