"""Train entry point of the test package: every weight moves by +1.

Usage: python train.py IN_MODEL OUT_MODEL
"""

import sys

from fedn.utils.helpers.helpers import get_helper, save_metadata


def main(in_path: str, out_path: str) -> None:
    """Read the global weights, add 1, write them with num_examples = 10."""
    helper = get_helper("numpyhelper")
    weights = helper.load(in_path)
    helper.save([w + 1.0 for w in weights], out_path)
    save_metadata({"num_examples": 10, "train_loss": float(weights[0].mean())}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
