"""What a clinic does in a FEDn round: local DP training and validation of global weights.

:class:`ClinicApp` holds the clinic's data, the model and the privacy ledger. Both client
routes use it: the long-lived callback client (one object across rounds, so TensorFlow,
the model and its traced step functions are paid for once) and the compute package's
``entrypoint.py`` (a fresh object per FEDn call).

Privacy unit: the patient. Each local step samples patients by Poisson sampling
(each independently with q = batch_size / N, the accountant's assumption) and takes one
random patch per sampled patient, so one patient contributes at most one clipped
gradient per step. Before training, the data set's ledger reserves the whole planned
round (check and record in one locked step); if it would exceed the clinic's epsilon
budget, :class:`BudgetExceededError` is raised and no weights leave the clinic.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedseg_clinic.cases import Case, check_organ_set
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_output
from fedseg_clinic.model.inference import sliding_window_predict
from fedseg_clinic.model.losses import loss_for
from fedseg_clinic.model.metrics import organ_metrics
from fedseg_clinic.model.unet import (
    UNetConfig,
    build_unet,
    check_patch_size,
    class_known,
    count_parameters,
    labels_from_masks,
    norm_variables,
    trainable_subset,
)
from fedseg_clinic.model.weights import apply_weights
from fedseg_clinic.patches import PatchSampler, load_cases, normalise_hu
from fedseg_clinic.privacy import skellam
from fedseg_clinic.privacy.accounting import compute_epsilon, default_delta
from fedseg_clinic.privacy.budget import check_privacy_floor, resolve_noise
from fedseg_clinic.privacy.distributed import noised_sum, reserve_round
from fedseg_clinic.privacy.dp_sgd import (
    DPConfig,
    DPTrainer,
    patient_gradient_fn,
    poisson_sample,
)
from fedseg_clinic.privacy.ledger import (
    LedgerSegment,
    PrivacyLedger,
    data_identity,
    default_privacy_dir,
    ledger_path,
)
from fedseg_clinic.settings import (
    ClinicSettings,
    load_settings,
    with_local_steps,
    with_server_overrides,
)
from fedseg_clinic.tf_env import tf

logger = logging.getLogger(__name__)

LOCAL_NORM_NAME = "local_norm.npz"  # training.local_norm: the clinic's own GroupNorm


class ClinicApp:
    """A clinic's train / validate / predict on its local cases.

    Args:
        settings: the clinic's resolved settings (data and state folders included).
    """

    def __init__(self, settings: ClinicSettings) -> None:
        if settings.data_dir is None or settings.state_dir is None:
            raise FedsegError("clinic settings need data_dir and state_dir")
        self.settings = settings
        self.data_dir: Path = settings.data_dir
        self.state_dir: Path = settings.state_dir
        self.privacy_dir: Path = settings.privacy_dir or default_privacy_dir(self.data_dir)
        self.model_config = UNetConfig.from_dict(settings.model)
        self.organs = self.model_config.organs
        # Data labelled for another organ set would train the wrong output channels.
        check_organ_set(self.data_dir, self.organs)
        self.train_cases: list[Case] = load_cases(self.data_dir, "train")
        # The ledger's key: the patients whose privacy training spends.
        self.data_id = data_identity(c.meta.patient_pseudonym for c in self.train_cases)
        self._val_cases: list[Case] | None = None
        self.model = build_unet(self.model_config, seed=settings.training.seed)
        self._trainer: DPTrainer | None = None
        self._trainer_key: tuple[Any, ...] | None = None
        self._rounds_without_ledger = 0
        self._gradient_fns: dict[tuple[Any, ...], Any] = {}
        self._per_example_loss = loss_for(self.organs, settings.training.dice_classes)
        self._loss_fn = tf.function(self._per_example_loss)

    @classmethod
    def from_environment(cls) -> ClinicApp:
        """Build from $FEDSEG_SETTINGS / $FEDSEG_DATA_DIR / $FEDSEG_STATE_DIR."""
        return cls(load_settings())

    # -- data ---------------------------------------------------------------------------

    @property
    def val_cases(self) -> list[Case]:
        """Validation cases (loaded on first use); a clinic without any is an error."""
        if self._val_cases is None:
            self._val_cases = load_cases(self.data_dir, "val")
        return self._val_cases

    def data_summary(self) -> dict[str, Any]:
        """Counts for `startup`: patients per split, organs labelled, shapes."""
        organs = sorted({o for c in self.train_cases for o in c.meta.labelled_organs})
        return {
            "code": str(Path(__file__).resolve().parent),
            "data_dir": str(self.data_dir),
            "n_train": len(self.train_cases),
            "n_val": len(self.val_cases),
            "labelled_organs": organs,
            "shapes": sorted({tuple(c.image.shape) for c in self.train_cases}),
        }

    def check_server_organ_set(self, server_settings: dict[str, Any]) -> None:
        """Refuse a round whose server announces another organ set than this clinic's.

        A server may send ``organ_set`` (a name or the seed's record) in a round's
        settings; a global model of another set would be trained on the wrong output
        channels. Every global model is also checked by its head's class count
        (:meth:`_apply_global`), which tells the two sets apart on its own.

        Raises:
            FedsegError: one line naming both sets.
        """
        record = server_settings.get("organ_set")
        if record is not None:
            self.organs.check_record(record, "server's global model")

    def _apply_global(self, weights: list[np.ndarray]) -> None:
        """Load the global weights; a head of another class count names the organ sets."""
        head_bias = np.asarray(weights[-1]) if weights else None
        if head_bias is not None and head_bias.ndim == 1 and \
                head_bias.shape[0] != self.organs.n_classes:
            raise FedsegError(
                f"global model has {head_bias.shape[0]} output classes, but this clinic "
                f"trains organ set {self.organs.key} ({self.organs.n_classes} classes: "
                f"background, {', '.join(self.organs.organs)}); use one organ set"
            )
        apply_weights(self.model, weights, "global model")
        if self.settings.training.local_norm:
            self._restore_local_norm()

    # -- personalised normalisation (training.local_norm) -----------------------------

    @property
    def _local_norm_path(self) -> Path:
        return self.state_dir / LOCAL_NORM_NAME

    def _restore_local_norm(self) -> None:
        """Put this clinic's own GroupNorm scale/offset over the global ones (if saved)."""
        if not self._local_norm_path.exists():
            return  # first round: start from the global values
        with np.load(self._local_norm_path) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        variables = norm_variables(self.model)
        if len(arrays) != len(variables) or any(
                a.shape != tuple(v.shape) for a, v in zip(arrays, variables, strict=True)):
            raise FedsegError(f"{self._local_norm_path}: local GroupNorm weights of another "
                              "model; delete the file to start from the global ones")
        for variable, array in zip(variables, arrays, strict=True):
            variable.assign(array)

    def _save_local_norm(self) -> None:
        with atomic_output(self._local_norm_path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, *[v.numpy() for v in norm_variables(self.model)])

    # -- privacy ------------------------------------------------------------------------

    def ledger(self, delta: float, epsilon_budget: float | None) -> PrivacyLedger:
        """The privacy ledger of this clinic's training data (outlives runs and restarts).

        Kept in the data set's privacy folder (``<data_dir>/.fedseg-privacy`` unless
        settings say otherwise), never in a run folder; its anchor lives outside that
        folder (ledger.default_anchor_path), so deleting the folder is detected too.
        """
        return PrivacyLedger(ledger_path(self.privacy_dir, self.data_id), self.data_id,
                             delta=delta, epsilon_budget=epsilon_budget)

    # -- training -----------------------------------------------------------------------

    def _round_seeds(self, settings: ClinicSettings, round_index: int
                     ) -> tuple[int | None, int]:
        """Seed of the DP noise (None: secret key) and of the patient/patch sampling.

        Secret (OS randomness: a 192-bit Philox key and counter for the noise, 128 bits
        for the sampling) unless the clinic opted into reproducible randomness; see
        PrivacySettings.secure_randomness for why a known seed would void the guarantee.
        """
        if settings.privacy.enabled and settings.privacy.secure_randomness:
            return None, secrets.randbits(128)
        base = np.random.SeedSequence([settings.training.seed, round_index])
        noise_seed, sampling_seed = base.generate_state(2)
        return int(noise_seed) & 0x7FFFFFFF, int(sampling_seed)

    def _get_trainer(self, settings: ClinicSettings, noise_seed: int | None,
                     noise_multiplier: float) -> DPTrainer:
        """The DP trainer; kept across rounds (its traced step is the costly part).

        The optimiser state (Adam moments, step count) is reset each round unless
        ``training.optimizer_state`` is "keep": every round starts from new global
        weights, as in FedAvg's client update.
        """
        t, p = settings.training, settings.privacy
        noise = noise_multiplier if p.enabled else None
        key = (t.learning_rate, t.optimizer, t.batch_size, p.l2_norm_clip, noise,
               t.trainable, t.augmentations_per_patient, p.dp_optimizer, t.proximal_mu)
        if self._trainer is None or self._trainer_key != key:
            config = DPConfig(
                l2_norm_clip=p.l2_norm_clip,
                noise_multiplier=noise,
                expected_batch_size=t.batch_size,
                learning_rate=t.learning_rate,
                optimizer=t.optimizer,
                proximal_mu=t.proximal_mu,
            )
            trainer_class: Any = DPTrainer
            if p.enabled and p.dp_optimizer == "tf_privacy":
                from fedseg_clinic.privacy.tfp_reference import TFPrivacyTrainer

                trainer_class = TFPrivacyTrainer  # the reference implementation
            self._trainer = trainer_class(
                self.model, self._per_example_loss, config, seed=noise_seed,
                variables=trainable_subset(self.model, t.trainable),
                augmentations=t.augmentations_per_patient)
            self._trainer_key = key
        else:
            if t.optimizer_state == "reset":
                for variable in self._trainer.optimizer.variables():
                    variable.assign(tf.zeros_like(variable))
            # A kept trainer's secret noise stream goes on; a reproducible one restarts
            # from this round's seed.
            if noise_seed is not None:
                self._trainer.reseed(noise_seed)
        return self._trainer

    def train(
        self, weights: list[np.ndarray], server_settings: dict[str, Any]
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """One round of local training from the global weights.

        Args:
            weights: the global model in numpyhelper order.
            server_settings: per-round flat keys from the server (may be empty).

        Returns:
            The updated weights and the training metadata (num_examples, train_loss,
            local_steps, train_seconds, epsilon, delta, noise_multiplier, l2_norm_clip).

        Raises:
            BudgetExceededError: the round would exceed the clinic's epsilon budget.
            FedsegError: bad settings or weights of the wrong architecture.
        """
        started = time.perf_counter()
        self.check_server_organ_set(server_settings)
        n = len(self.train_cases)
        settings = with_local_steps(with_server_overrides(self.settings, server_settings), n)
        t, p = settings.training, settings.privacy
        if p.enabled and p.distributed:
            raise FedsegError(f"{settings.client_name}: privacy.distributed adds only a share "
                              "of the noise and needs secure aggregation (session."
                              "secure_aggregation: true); refusing to send a plain update")
        patch = check_patch_size(self.model_config, t.patch_size)
        if t.batch_size > n:
            raise FedsegError(
                f"batch_size {t.batch_size} is larger than the {n} training patients of "
                f"{self.data_dir}"
            )
        # The server cannot weaken DP (compared at the same step count rule).
        check_privacy_floor(n, with_local_steps(self.settings, n), settings)
        delta = p.delta if p.delta is not None else default_delta(n)
        sigma, budget = resolve_noise(n, settings) if p.enabled else (0.0, None)
        ledger = self.ledger(delta, budget) if p.enabled else None
        round_index = len(ledger.entries()) if ledger else self._rounds_without_ledger
        segment = LedgerSegment.for_schedule(
            round_id=str(server_settings.get("round_id", f"local-{round_index + 1}")),
            n_patients=n,
            batch_size=t.batch_size,
            steps=t.local_steps,
            noise_multiplier=sigma,
            l2_norm_clip=p.l2_norm_clip,
        )
        reserved = None
        if ledger is not None:
            # Record before train, in one locked step: a concurrent training of the same
            # data cannot slip in between the check and the record. Raises
            # BudgetExceededError (nothing written, nothing trained).
            reserved = ledger.reserve(segment, client=settings.client_name,
                                      run=settings.run_name)
        self._apply_global(weights)
        noise_seed, sampling_seed = self._round_seeds(settings, round_index)
        trainer = self._get_trainer(settings, noise_seed, sigma)
        if t.proximal_mu > 0:
            trainer.set_anchor()  # the global weights just applied
        trained_ids = {id(v) for v in trainer.variables}
        frozen_before = [(v, v.numpy().copy()) for v in self.model.weights
                         if id(v) not in trained_ids]
        sampler = PatchSampler(patch, foreground_fraction=t.foreground_fraction,
                               hu_clip=t.hu_window, organs=self.organs)
        rng = np.random.default_rng(sampling_seed)
        losses: list[float] = []
        ema = ([v.numpy().astype(np.float64) for v in trainer.variables]
               if t.ema_decay > 0 else None)
        # Equal time (local_seconds > 0): stop once the budget is spent; local_steps is
        # the cap the ledger reserved above, so DP never spends more than recorded.
        deadline = (time.perf_counter() + t.local_seconds) if t.local_seconds > 0 else None
        steps_taken = 0
        for _ in range(t.local_steps):
            if deadline is not None and steps_taken >= 1 and time.perf_counter() >= deadline:
                break
            steps_taken += 1
            chosen = poisson_sample(n, t.batch_size, rng)
            # K patches per sampled patient, consecutive rows (see DPTrainer).
            picked = [self.train_cases[i] for i in chosen
                      for _ in range(t.augmentations_per_patient)]
            images, labels, known = self._batch(picked, sampler, rng, patch)
            loss = trainer.step(images, labels, known)
            if len(chosen):
                losses.append(float(loss))
            if ema is not None:
                for average, variable in zip(ema, trainer.variables, strict=True):
                    average *= t.ema_decay
                    average += (1.0 - t.ema_decay) * variable.numpy()
        if ema is not None:
            # Send (and so validate) the average of the round's iterates: post-processing
            # of the private iterates, no privacy cost; it smooths the DP noise.
            for average, variable in zip(ema, trainer.variables, strict=True):
                variable.assign(average.astype(variable.dtype.as_numpy_dtype))
        if t.local_norm:
            self._save_local_norm()  # this clinic's own, for its next round and validation
        for variable, before in frozen_before:
            # Aggregation must only move what was trained: frozen weights leave bit-exact.
            if not np.array_equal(variable.numpy(), before):
                raise FedsegError(f"frozen weight {variable.name} changed in training")
        if reserved is not None:
            epsilon = reserved.epsilon
        else:
            self._rounds_without_ledger += 1
            epsilon = math.inf
        metadata = {
            "num_examples": n,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "local_steps": steps_taken,  # taken; below the cap only with local_seconds
            "local_steps_reserved": t.local_steps,
            "local_seconds": t.local_seconds,
            "train_seconds": time.perf_counter() - started,
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": sigma if p.enabled else 0.0,
            "target_epsilon": p.target_epsilon if p.enabled else None,
            "trainable": t.trainable,
            "trained_parameters": count_parameters(trainer.variables),
            "augmentations_per_patient": t.augmentations_per_patient,
            "dp_optimizer": p.dp_optimizer,
            "proximal_mu": t.proximal_mu,
            "local_norm": t.local_norm,
            "optimizer_state": t.optimizer_state,
            "ema_decay": t.ema_decay,
            "l2_norm_clip": p.l2_norm_clip,
            "batch_size": t.batch_size,
            "learning_rate": t.learning_rate,
            "dp": p.enabled,
            "round_index": round_index,
        }
        logger.info("trained %d steps, loss %.4f, epsilon %.3f", steps_taken,
                    metadata["train_loss"], epsilon)
        return [np.asarray(w) for w in self.model.get_weights()], metadata

    # -- distributed DP (privacy/skellam.py) ---------------------------------------------

    def distributed_dp(self, server_settings: dict[str, Any]) -> bool:
        """True when this clinic contributes distributed-DP rounds (privacy.distributed)."""
        p = with_server_overrides(self.settings, server_settings).privacy
        return bool(p.enabled and p.distributed)

    def contribute(self, weights: list[np.ndarray], server_settings: dict[str, Any],
                   clinics: int) -> tuple[list[np.ndarray], dict[str, Any]]:
        """One distributed-DP round: integer sum of clipped patient gradients + noise share.

        Every training patient contributes (full batch, q = 1): the gradient of the mean
        loss over its K patches at the global weights, clipped to C by TF Privacy, scaled
        by s = CLIP_UNITS / C and truncated toward zero (l2 norm <= CLIP_UNITS exactly).
        The clinic adds Skellam noise of variance mu / m on the trained coordinates (m
        honest shares assumed, :func:`skellam.honest_shares`); frozen coordinates stay 0.
        The round is reserved in the ledger first, as in :meth:`train`.

        Args:
            weights: The global model.
            server_settings: The round's server settings.
            clinics: n, the clinics keyed for this round's secure aggregation.

        Returns:
            int64 arrays shaped like the weights (to be masked) and the metadata:
            ``ddp_scale`` (s) and ``learning_rate`` tell the server how to take the step.

        Raises:
            BudgetExceededError: the round would exceed the budget (nothing is sent).
        """
        started = time.perf_counter()
        self.check_server_organ_set(server_settings)
        n = len(self.train_cases)
        settings = with_local_steps(with_server_overrides(self.settings, server_settings), n)
        t, p = settings.training, settings.privacy
        if not (p.enabled and p.distributed):
            raise FedsegError(f"{settings.client_name}: contribute() needs privacy.distributed")
        patch = check_patch_size(self.model_config, t.patch_size)
        check_privacy_floor(n, with_local_steps(self.settings, n), settings)
        round_index = len(self.ledger(p.delta or default_delta(n), None).entries())
        reserved = reserve_round(
            settings, self.ledger, n, clinics,
            str(server_settings.get("round_id", f"local-{round_index + 1}")),
            client=settings.client_name, run=settings.run_name)
        self._apply_global(weights)
        variables = trainable_subset(self.model, t.trainable)
        key = (t.trainable, p.l2_norm_clip)
        if key not in self._gradient_fns:  # its traced function is the costly part
            self._gradient_fns[key] = patient_gradient_fn(
                self.model, self._per_example_loss, variables, p.l2_norm_clip)
        gradient = self._gradient_fns[key]
        noise_seed, sampling_seed = self._round_seeds(settings, round_index)
        rng = np.random.default_rng(sampling_seed)
        sampler = PatchSampler(patch, foreground_fraction=t.foreground_fraction,
                               hu_clip=t.hu_window, organs=self.organs)
        sizes = [int(np.prod(v.shape)) for v in variables]
        per_patient = (np.concatenate([g.ravel() for g in gradient(*self._batch(
            [case] * t.augmentations_per_patient, sampler, rng, patch))])
            for case in self.train_cases)
        total = noised_sum(per_patient, sum(sizes), p.l2_norm_clip, reserved.share_variance,
                           skellam.noise_rng(noise_seed))
        by_id = {}
        start = 0
        for variable, size in zip(variables, sizes, strict=True):
            by_id[id(variable)] = total[start:start + size].reshape(tuple(variable.shape))
            start += size
        out = [by_id.get(id(v), np.zeros(tuple(v.shape), np.int64)) for v in self.model.weights]
        metadata = {
            "num_examples": n,
            "train_loss": math.nan,
            "local_steps": 1,
            "train_seconds": time.perf_counter() - started,
            "target_epsilon": p.target_epsilon,
            "trainable": t.trainable,
            "trained_parameters": int(sum(sizes)),
            "augmentations_per_patient": t.augmentations_per_patient,
            "batch_size": n,
            "learning_rate": t.learning_rate,
            "dp": True,
            "round_index": round_index,
            **reserved.metadata(),
        }
        logger.info("distributed DP round: %d patients, share 1/%d of the noise; %s", n,
                    reserved.honest_shares, reserved.trust)
        return out, metadata

    def _batch(
        self, cases: list[Case], sampler: PatchSampler, rng: np.random.Generator,
        patch: tuple[int, int, int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stack one patch per sampled patient (an empty batch keeps its shape)."""
        if not cases:
            return (np.zeros((0, *patch, 1), np.float32), np.zeros((0, *patch), np.uint8),
                    np.zeros((0, self.model_config.n_classes), np.float32))
        pairs = [sampler.sample(case, rng) for case in cases]
        images = np.stack([p[0] for p in pairs]).astype(np.float32)
        labels = np.stack([p[1] for p in pairs])
        known = np.stack([class_known(c.meta.labelled_organs, self.organs) for c in cases])
        return images, labels, known

    # -- validation ---------------------------------------------------------------------

    def predict_case(self, case: Case, settings: ClinicSettings | None = None) -> np.ndarray:
        """Class probabilities (z, y, x, C) of a whole case by sliding-window inference."""
        resolved = settings or self.settings
        v = resolved.validation
        patch = check_patch_size(self.model_config, v.patch_size)
        image = normalise_hu(case.image, resolved.training.hu_window)
        return sliding_window_predict(self.model, image, patch, overlap=v.overlap,
                                      batch_size=v.batch_size)

    def validate(self, weights: list[np.ndarray]) -> dict[str, float]:
        """Dice / HD95 per organ, val_loss, n_val and validate_seconds on the val cases."""
        started = time.perf_counter()
        self._apply_global(weights)
        per_case: list[dict[str, float]] = []
        for case in self.val_cases:
            probs = self.predict_case(case)
            labels = labels_from_masks(case.masks, case.image.shape, self.organs)
            known = class_known(case.meta.labelled_organs, self.organs)
            loss = self._loss_fn(labels[None].astype(np.int32), probs[None], known[None])
            metrics = organ_metrics(np.argmax(probs, axis=-1).astype(np.uint8), case.masks,
                                    case.meta.labelled_organs, case.meta.spacing,
                                    self.organs)
            metrics["val_loss"] = float(np.asarray(loss)[0])
            per_case.append(metrics)
        result: dict[str, float] = {}
        for key in per_case[0]:
            values = np.array([m[key] for m in per_case], dtype=np.float64)
            finite = values[~np.isnan(values)]
            result[key] = float(finite.mean()) if finite.size else math.nan
        result["n_val"] = float(len(per_case))
        # FEDn does not time validations; the round-time split of the report needs it.
        result["validate_seconds"] = time.perf_counter() - started
        # 1: validated with the global model and this clinic's own GroupNorm (local_norm).
        result["val_personalised"] = float(self.settings.training.local_norm)
        return result


def epsilon_for_plan(n_patients: int, settings: ClinicSettings, rounds: int) -> float:
    """Epsilon the planned training (rounds x local steps) would spend: for `startup`."""
    settings = with_local_steps(settings, n_patients)
    t, p = settings.training, settings.privacy
    if not p.enabled:
        return math.inf
    delta = p.delta if p.delta is not None else default_delta(n_patients)
    sigma, _ = resolve_noise(n_patients, settings)
    if p.distributed:  # one Skellam release per round (privacy/skellam.py)
        return skellam.epsilon([skellam.segment_for(sigma, rounds)], delta)
    return compute_epsilon(n_patients, t.batch_size, rounds * t.local_steps,
                           sigma, delta).epsilon
