"""Validate entry point of the test package: reports the mean of the first weight.

Usage: python validate.py IN_MODEL OUT_JSON
"""

import json
import sys

from fedn.utils.helpers.helpers import get_helper


def main(in_path: str, out_path: str) -> None:
    """Write {"val_loss": mean of weights[0]}."""
    weights = get_helper("numpyhelper").load(in_path)
    with open(out_path, "w") as handle:
        json.dump({"val_loss": float(weights[0].mean())}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
