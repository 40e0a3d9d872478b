"""A tiny real clinic app for plumbing tests: linear regression in numpy.

Same interface as fedseg_clinic.app.ClinicApp (from_environment / train /
validate), so the callback client and the whole FEDn path run for real in a fraction
of a second per round. Knobs (environment variables, for failure tests):

- TOY_TRAIN_SLEEP_S: seconds each train call sleeps (to be killed or interrupted mid-round);
- TOY_FAIL_ON_CALL: 1-based train call numbers (comma separated) that raise;
- TOY_FAIL_AT_START: any value makes from_environment raise (app start failure);
- TOY_BUDGET_REFUSE_ON_CALL: 1-based train call numbers that raise the clinic's
  BudgetExceededError (a ledger that cannot afford the round).

With ``privacy.distributed`` in its FEDSEG_SETTINGS it contributes distributed-DP rounds
under secure aggregation through the project's own mechanism, ledger and metadata
(fedseg_clinic.privacy.distributed): per-example gradients clipped to C, truncated to
integers, a Skellam noise share (seeded per clinic and round when the settings turn
secure_randomness off, so a test can replay it).
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedseg_clinic.errors import FedsegError

N_FEATURES = 4
TRUE_W = np.array([1.0, -2.0, 0.5, 3.0])


class ToyApp:
    """Linear regression on the clinic's own random data."""

    def __init__(self, name: str, n_train: int = 40, n_val: int = 10,
                 settings: Any = None) -> None:
        """Data derived from the client name (each clinic differs, runs repeat)."""
        self.settings = settings  # ClinicSettings from FEDSEG_SETTINGS, if any
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.name = name
        self.x_train = rng.normal(size=(n_train, N_FEATURES))
        self.y_train = self.x_train @ TRUE_W + 0.1 * rng.normal(size=n_train)
        self.x_val = rng.normal(size=(n_val, N_FEATURES))
        self.y_val = self.x_val @ TRUE_W
        self.calls = 0
        self.sleep_s = float(os.environ.get("TOY_TRAIN_SLEEP_S", "0"))
        fail = os.environ.get("TOY_FAIL_ON_CALL", "")
        self.fail_on = {int(v) for v in fail.split(",") if v.strip()}
        refuse = os.environ.get("TOY_BUDGET_REFUSE_ON_CALL", "")
        self.refuse_on = {int(v) for v in refuse.split(",") if v.strip()}

    @classmethod
    def from_environment(cls) -> ToyApp:
        """Build from FEDSEG_CLIENT_NAME (and FEDSEG_DATA_DIR, which must exist)."""
        if os.environ.get("TOY_FAIL_AT_START"):
            raise FedsegError("toy app: asked to fail at start")
        data_dir = os.environ.get("FEDSEG_DATA_DIR", "")
        if not data_dir or not os.path.isdir(data_dir):
            raise FedsegError(f"FEDSEG_DATA_DIR={data_dir!r}: not a folder")
        settings = None
        path = os.environ.get("FEDSEG_SETTINGS")
        # Only a distributed-DP clinic needs the settings; every other toy test stays as
        # it was, whatever its clinic section holds.
        if path and "distributed" in Path(path).read_text():
            from fedseg_clinic.settings import load_settings

            settings = load_settings()
        return cls(os.environ.get("FEDSEG_CLIENT_NAME", "toy"), settings=settings)

    def train(self, weights: list[np.ndarray], server_settings: dict[str, Any]
              ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """A few full-batch gradient steps from the global weights."""
        self.calls += 1
        if self.calls in self.fail_on:
            raise FedsegError(f"toy app {self.name}: asked to fail on train call {self.calls}")
        if self.calls in self.refuse_on:
            from fedseg_clinic.privacy.ledger import BudgetExceededError

            raise BudgetExceededError(f"toy app {self.name}: epsilon 9.0 > budget 8.0 "
                                      f"(train call {self.calls})")
        tic = time.monotonic()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        w = np.asarray(weights[0], dtype=float).copy()
        lr = float(server_settings.get("learning_rate", 0.05))
        steps = int(server_settings.get("local_steps", 5))
        for _ in range(steps):
            grad = 2.0 * self.x_train.T @ (self.x_train @ w - self.y_train) / len(self.y_train)
            w -= lr * grad
        loss = float(np.mean((self.x_train @ w - self.y_train) ** 2))
        meta = {"num_examples": len(self.y_train), "train_loss": loss, "local_steps": steps,
                "train_seconds": time.monotonic() - tic, "learning_rate": lr,
                "epsilon": float(self.calls), "delta": 1e-5}
        return [w], meta

    def distributed_dp(self, server_settings: dict[str, Any]) -> bool:
        """True with privacy.distributed in the clinic's settings."""
        return bool(self.settings is not None and self.settings.privacy.distributed)

    def clipped_gradients(self, w: np.ndarray, clip: float) -> list[np.ndarray]:
        """Each example's squared-loss gradient at w, clipped to l2 norm ``clip``."""
        out = []
        for x, y in zip(self.x_train, self.y_train, strict=True):
            g = 2.0 * x * (x @ w - y)
            out.append(g * min(1.0, clip / max(float(np.linalg.norm(g)), 1e-300)))
        return out

    def noise_seed(self, round_index: int) -> int | None:
        """None (secret OS randomness) unless the settings turn secure_randomness off."""
        if self.settings is None or self.settings.privacy.secure_randomness:
            return None
        return zlib.crc32(self.name.encode()) * 1000 + round_index

    def contribute(self, weights: list[np.ndarray], server_settings: dict[str, Any],
                   clinics: int) -> tuple[list[np.ndarray], dict[str, Any]]:
        """One distributed-DP round: the clipped, truncated, noised gradient sum."""
        from fedseg_clinic.privacy import skellam
        from fedseg_clinic.privacy.distributed import noised_sum, reserve_round
        from fedseg_clinic.privacy.ledger import (
            PrivacyLedger,
            data_identity,
            default_privacy_dir,
            ledger_path,
        )
        from fedseg_clinic.settings import with_local_steps, with_server_overrides

        assert self.settings is not None
        self.calls += 1
        if self.calls in self.fail_on:
            raise FedsegError(f"toy app {self.name}: asked to fail on train call {self.calls}")
        n = len(self.y_train)
        settings = with_local_steps(with_server_overrides(self.settings, server_settings), n)
        data_id = data_identity(f"{self.name}-{i}" for i in range(n))
        folder = settings.privacy_dir or default_privacy_dir(Path(str(settings.data_dir)))

        def ledger(delta: float, budget: float | None) -> PrivacyLedger:
            return PrivacyLedger(ledger_path(folder, data_id), data_id, delta, budget)

        index = len(ledger(1e-9, None).entries())
        reserved = reserve_round(settings, ledger, n, clinics,
                                 str(server_settings.get("round_id", f"toy-{index}")),
                                 client=self.name)
        clip = settings.privacy.l2_norm_clip
        w = np.asarray(weights[0], dtype=float)
        total = noised_sum(self.clipped_gradients(w, clip), N_FEATURES, clip,
                           reserved.share_variance, skellam.noise_rng(self.noise_seed(index)))
        lr = float(server_settings.get("learning_rate", settings.training.learning_rate))
        meta = {"num_examples": n, "learning_rate": lr, "local_steps": 1,
                "train_loss": float(np.mean((self.x_train @ w - self.y_train) ** 2)),
                **reserved.metadata()}
        return [total], meta

    def validate(self, weights: list[np.ndarray]) -> dict[str, float]:
        """MSE on held-out data, plus a Dice-like score in (0, 1]."""
        w = np.asarray(weights[0], dtype=float)
        mse = float(np.mean((self.x_val @ w - self.y_val) ** 2))
        return {"val_loss": mse, "val_dice_mean": 1.0 / (1.0 + mse),
                "val_dice_heart": float("nan"), "n_val": float(len(self.y_val))}


def seed_weights() -> list[np.ndarray]:
    """The initial global model."""
    return [np.zeros(N_FEATURES)]


def build_seed(model_config: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """Seed builder with fedseg.seed.build.build_seed's signature."""
    from fedn.utils.helpers.helpers import get_helper

    out.parent.mkdir(parents=True, exist_ok=True)
    get_helper("numpyhelper").save(seed_weights(), str(out))
    return out
