"""Train entry point of the test package: every weight moves by +step.

step is 1, or the "step" client setting a ServerFunctions hook sent this round
(the client writes the settings as JSON to IN_MODEL-metadata).

Usage: python train.py IN_MODEL OUT_MODEL
"""

import json
import os
import sys

from fedn.utils.helpers.helpers import get_helper, save_metadata


def main(in_path: str, out_path: str) -> None:
    """Read the global weights, add step, write them with num_examples = 10."""
    settings = {}
    if os.path.isfile(in_path + "-metadata"):
        with open(in_path + "-metadata") as handle:
            settings = json.load(handle) or {}
    step = float(settings.get("step", 1.0))
    helper = get_helper("numpyhelper")
    weights = helper.load(in_path)
    helper.save([w + step for w in weights], out_path)
    save_metadata({"num_examples": 10, "train_loss": float(weights[0].mean()), "step": step},
                  out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
