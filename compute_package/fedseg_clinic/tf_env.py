"""The one place that prepares the environment before TensorFlow loads.

TF >= 2.16 ships Keras 3; TF Privacy's DP optimizers need Keras 2 (tf-keras), which
TensorFlow only selects when ``TF_USE_LEGACY_KERAS=1`` is set *before* its first import.
TF Privacy's top-level ``__init__`` imports the Estimator API removed in TF 2.20; it skips
that when ``sys.skip_tf_privacy_import`` is true, after which submodules import fine.

Every module of ours that needs TensorFlow does ``from fedseg_clinic.tf_env import tf,
keras`` so nobody has to set these by hand. Importing this module is the documented
exception to "no globals mutated at import": it has to happen before TensorFlow loads.
"""

from __future__ import annotations

import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "TensorFlow was imported before fedseg_clinic.tf_env set TF_USE_LEGACY_KERAS=1; "
        "import fedseg_clinic.tf_env first"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# Hide TensorFlow C++ logging (the CUDA probe logs an "error" on every CPU-only start);
# a user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.skip_tf_privacy_import = True  # type: ignore[attr-defined]

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf"]
