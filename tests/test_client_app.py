"""The clinic's train/validate through ClinicApp and the package entry points, on phantoms."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
from fedseg_clinic import fedn_package as entrypoints
from fedseg_clinic.app import ClinicApp
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.weights import load_weights_npz, save_weights_npz
from fedseg_clinic.privacy.accounting import compute_epsilon
from fedseg_clinic.privacy.ledger import BudgetExceededError
from fedseg_clinic.settings import load_settings

pytestmark = pytest.mark.slow

TINY_SETTINGS = {
    "model": {"levels": 2, "base_filters": 4, "groups": 2},
    "training": {"local_steps": 2, "batch_size": 2, "patch_size": [16, 16, 16],
                 "learning_rate": 0.01, "seed": 1},
    "privacy": {"noise_multiplier": 1.0, "l2_norm_clip": 1.0, "delta": 1e-3,
                "secure_randomness": False},
    "validation": {"patch_size": [16, 16, 16], "overlap": 0.25},
}


@pytest.fixture(scope="module")
def clinic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "phantoms"
    generate_benchmark(preset_spec("iid", clinics=1, patients=5, size=24, seed=3), out)
    return out / "clinic-1"


def _env(tmp_path: Path, clinic_dir: Path, state: str = "state", client: str = "clinic-1",
         **privacy: object) -> dict[str, str]:
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["privacy"].update(privacy)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    # The module's clinic data is shared by every test: each test keeps its own privacy
    # folder (the explicit override synthetic experiments use) so tests stay independent.
    return {"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(clinic_dir),
            "FEDSEG_STATE_DIR": str(tmp_path / state), "FEDSEG_CLIENT_NAME": client,
            "FEDSEG_PRIVACY_DIR": str(tmp_path / "privacy")}


def test_train_validate_and_ledger(tmp_path: Path, clinic_dir: Path) -> None:
    env = _env(tmp_path, clinic_dir)
    app = ClinicApp(load_settings(env))
    seed = [np.asarray(w) for w in app.model.get_weights()]
    new, meta = app.train(seed, {})
    n = len(app.train_cases)
    assert meta["num_examples"] == n
    assert meta["local_steps"] == 2
    assert not all(np.array_equal(a, b) for a, b in zip(seed, new, strict=True))
    expected = compute_epsilon(n, 2, 2, 1.0, 1e-3).epsilon
    assert meta["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert meta["noise_multiplier"] == 1.0 and meta["delta"] == 1e-3
    # Another run on the same data (new state folder, another client name) continues
    # the data set's ledger: two rounds spend more than one.
    app2 = ClinicApp(load_settings(_env(tmp_path, clinic_dir, state="run-2", client="x")))
    _, meta2 = app2.train(new, {"local_steps": 3})
    assert meta2["epsilon"] == pytest.approx(
        compute_epsilon(n, 2, 5, 1.0, 1e-3).epsilon, rel=1e-3)
    metrics = app2.validate(new)
    assert metrics["n_val"] >= 1
    assert 0.0 <= metrics["val_dice_mean"] <= 1.0
    assert math.isfinite(metrics["val_loss"])
    assert {"val_dice_heart", "val_hd95_heart", "val_dice_body"} <= set(metrics)


def test_budget_refusal_leaves_ledger_unchanged(tmp_path: Path, clinic_dir: Path) -> None:
    env = _env(tmp_path, clinic_dir, noise_multiplier=0.5)
    n_first = ClinicApp(load_settings(env))
    weights = [np.asarray(w) for w in n_first.model.get_weights()]
    _, meta = n_first.train(weights, {})
    budget = meta["epsilon"] * 1.01  # enough for what was spent, not for another round
    env2 = _env(tmp_path, clinic_dir, noise_multiplier=0.5, epsilon_budget=budget)
    app = ClinicApp(load_settings(env2))
    with pytest.raises(BudgetExceededError):
        app.train(weights, {})
    assert app.ledger(1e-3, budget).spent().epsilon == pytest.approx(meta["epsilon"])


def test_ledger_lives_with_the_data_by_default(tmp_path: Path, clinic_dir: Path) -> None:
    data = tmp_path / "clinic"
    shutil.copytree(clinic_dir, data)
    env = _env(tmp_path, data)
    del env["FEDSEG_PRIVACY_DIR"]
    app = ClinicApp(load_settings(env))
    weights = [np.asarray(w) for w in app.model.get_weights()]
    app.train(weights, {"round_id": "7"})
    ledger = data / ".fedseg-privacy" / f"ledger-{app.data_id}.json"
    assert ledger.exists() and (data / ".fedseg-privacy").stat().st_mode & 0o777 == 0o700
    entry = json.loads(ledger.read_text())["entries"][0]
    assert (entry["round_id"], entry["client"]) == ("7", "clinic-1")
    assert not list((tmp_path / "state").glob("*ledger*"))  # nothing in the state folder


def test_secure_randomness_two_trainings_same_settings_differ(tmp_path: Path,
                                                              clinic_dir: Path) -> None:
    """Default (secret) randomness: nothing a server knows repeats a clinic's noise."""
    env = _env(tmp_path, clinic_dir, secure_randomness=True)
    updates = []
    for _ in range(2):
        app = ClinicApp(load_settings(env))
        seed = [np.asarray(w) for w in app.model.get_weights()]
        new, _ = app.train(seed, {"seed": 7})  # a server-sent seed changes nothing here
        updates.append(np.concatenate([(a - b).ravel() for a, b in zip(new, seed,
                                                                        strict=True)]))
    assert not np.allclose(updates[0], updates[1])


def test_wrong_architecture_and_bad_server_settings(tmp_path: Path, clinic_dir: Path) -> None:
    app = ClinicApp(load_settings(_env(tmp_path, clinic_dir)))
    weights = [np.asarray(w) for w in app.model.get_weights()]
    with pytest.raises(FedsegError, match="global model"):
        app.train(weights[:-1], {})
    with pytest.raises(FedsegError, match="learning_rate"):
        app.train(weights, {"learning_rate": -1})
    with pytest.raises(FedsegError, match="larger than"):
        app.train(weights, {"batch_size": 99})


def test_package_route_with_fedn_run(tmp_path: Path, clinic_dir: Path, repo_root: Path) -> None:
    """The tarball of `fedn package create` runs build/train/validate through `fedn run`."""
    fedn = str(Path(sys.executable).with_name("fedn"))
    # fedn.yaml runs `python entrypoint.py`: the environment's interpreter comes first.
    env = {**os.environ, **_env(tmp_path, clinic_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([fedn, "package", "create", "--path", str(repo_root / "compute_package"),
                    "--output", str(tmp_path), "--name", "package.tgz"], check=True,
                   capture_output=True, env=env)
    with tarfile.open(tmp_path / "package.tgz") as tar:
        names = tar.getnames()
        assert {"fedn.yaml", "entrypoint.py", "fedseg_clinic/app.py"} <= set(names)
        assert not any("__pycache__" in n or n.endswith("seed.npz") for n in names)
        tar.extractall(tmp_path / "package", filter="data")
    package = tmp_path / "package"
    subprocess.run([fedn, "run", "build", "--path", str(package)], check=True,
                   capture_output=True, env=env)
    seed = package / "seed.npz"
    Path(f"{seed}-metadata").write_text(json.dumps({"local_steps": 1}))
    out = tmp_path / "out.npz"
    subprocess.run([fedn, "run", "train", "--path", str(package), "-i", str(seed), "-o",
                    str(out)], check=True, capture_output=True, env=env)
    meta = json.loads(Path(f"{out}-metadata").read_text())
    assert meta["local_steps"] == 1 and meta["num_examples"] >= 1
    assert len(load_weights_npz(out)) == len(load_weights_npz(seed))
    metrics_path = tmp_path / "val.json"
    subprocess.run([fedn, "run", "validate", "--path", str(package), "-i", str(out), "-o",
                    str(metrics_path)], check=True, capture_output=True, env=env)
    assert "val_dice_mean" in json.loads(metrics_path.read_text())


def test_entry_points_startup_and_bad_input(
    tmp_path: Path, clinic_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in _env(tmp_path, clinic_dir).items():
        monkeypatch.setenv(key, value)
    # The in-process path (tests/test_warm_worker.py covers the warm worker).
    monkeypatch.setenv("FEDSEG_WARM_WORKER", "0")
    with pytest.raises(SystemExit) as info:
        entrypoints.main(["startup"])
    assert info.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_train"] >= 1 and "heart" in summary["labelled_organs"]
    # Wrong-shape weights: one line on stderr, exit 1, no output written.
    bad = tmp_path / "bad.npz"
    save_weights_npz([np.zeros(3, np.float32)], bad)
    with pytest.raises(SystemExit) as info:
        entrypoints.main(["train", str(bad), str(tmp_path / "o.npz")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "global model" in err
    assert not (tmp_path / "o.npz").exists()
    with pytest.raises(SystemExit) as info:
        entrypoints.main(["validate", str(bad)])
    assert info.value.code == 1 and "usage" in capsys.readouterr().err
    monkeypatch.setenv("FEDSEG_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as info:
        entrypoints.main(["startup"])
    assert info.value.code == 1 and "does not exist" in capsys.readouterr().err


def test_norm_bias_round_moves_only_trained_weights_at_target_epsilon(
        tmp_path: Path, clinic_dir: Path) -> None:
    from fedseg_clinic.app import epsilon_for_plan
    from fedseg_clinic.privacy.accounting import calibrate_noise

    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["training"].update(trainable="norm_bias", augmentations_per_patient=2)
    settings["privacy"].update(target_epsilon=4.0, planned_rounds=2)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = {"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(clinic_dir),
           "FEDSEG_STATE_DIR": str(tmp_path / "state"), "FEDSEG_CLIENT_NAME": "clinic-1"}
    app = ClinicApp(load_settings(env))
    n = len(app.train_cases)
    sigma = calibrate_noise(n, 2, 2 * 2, 4.0, 1e-3)
    assert epsilon_for_plan(n, app.settings, 2) <= 4.0
    trained = {v.name for v in app.model.trainable_variables
               if v.name.split("/")[-1] in ("gamma:0", "beta:0", "bias:0")}
    weights = [np.asarray(w).copy() for w in app.model.get_weights()]
    new, meta = app.train(weights, {})
    assert meta["trainable"] == "norm_bias" and meta["augmentations_per_patient"] == 2
    assert meta["trained_parameters"] == sum(
        int(np.prod(v.shape)) for v in app.model.trainable_variables if v.name in trained)
    assert meta["noise_multiplier"] == pytest.approx(sigma)
    for variable, old, now in zip(app.model.weights, weights, new, strict=True):
        if variable.name in trained:
            continue
        assert np.array_equal(old, now), variable.name  # frozen: bit-identical
    assert any(not np.array_equal(o, w) for o, w in zip(weights, new, strict=True))
    new, meta = app.train(new, {})
    # Two planned rounds spent: at the target (within the accountant's bound), not above.
    assert 3.5 < meta["epsilon"] <= 4.0
    with pytest.raises(BudgetExceededError):  # the target is the budget: no third round
        app.train(new, {})


def test_ema_of_one_step_is_the_decayed_mix_of_start_and_iterate(
        tmp_path: Path, clinic_dir: Path) -> None:
    """Same seeds, one step: EMA weights = d * global + (1 - d) * the plain iterate."""
    results = {}
    for decay in (0.0, 0.75):
        settings = json.loads(json.dumps(TINY_SETTINGS))
        settings["training"].update(local_steps=1, ema_decay=decay)
        settings["privacy"] = {"enabled": False}  # no noise: both runs take the same step
        path = tmp_path / f"settings-{decay}.yaml"
        path.write_text(yaml.safe_dump(settings))
        env = {"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(clinic_dir),
               "FEDSEG_STATE_DIR": str(tmp_path / f"state-{decay}"),
               "FEDSEG_CLIENT_NAME": "clinic-1"}
        app = ClinicApp(load_settings(env))
        start = [np.asarray(w).copy() for w in app.model.get_weights()]
        results[decay] = (start, *app.train(start, {}))
    start, plain, _ = results[0.0]
    _, smoothed, meta = results[0.75]
    assert meta["ema_decay"] == 0.75
    for w0, w1, ema in zip(start, plain, smoothed, strict=True):
        np.testing.assert_allclose(ema, 0.75 * w0 + 0.25 * w1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("state", "iterations"), [("reset", 2), ("keep", 4)])
def test_optimizer_state_reset_or_kept_across_rounds(tmp_path: Path, clinic_dir: Path,
                                                     state: str, iterations: int) -> None:
    """Adam's step count after two rounds of 2 steps: 2 when reset each round, else 4."""
    app = ClinicApp(load_settings(_env(tmp_path, clinic_dir)))
    seed = [np.asarray(w) for w in app.model.get_weights()]
    first, meta = app.train(seed, {"optimizer": "adam", "optimizer_state": state})
    _, meta = app.train(first, {"optimizer": "adam", "optimizer_state": state})
    assert meta["optimizer_state"] == state
    assert int(app._trainer.optimizer.iterations.numpy()) == iterations


def test_fedprox_round_records_mu_and_pulls_towards_the_global_model(
        tmp_path: Path, clinic_dir: Path) -> None:
    """With a huge mu the weights barely leave the global model; mu reaches the metadata."""
    env = _env(tmp_path, clinic_dir, noise_multiplier=0.0)
    seed = [np.asarray(w) for w in ClinicApp(load_settings(env)).model.get_weights()]

    def distance(mu: float) -> float:
        (tmp_path / f"mu{mu}").mkdir()
        app = ClinicApp(load_settings(_env(tmp_path / f"mu{mu}", clinic_dir,
                                           noise_multiplier=0.0, secure_randomness=False)))
        new, meta = app.train(seed, {"optimizer": "sgd", "learning_rate": 0.5,
                                     "local_steps": 4, "proximal_mu": mu})
        assert meta["proximal_mu"] == mu
        return sum(float(np.sum((a - b) ** 2)) for a, b in zip(new, seed, strict=True))

    assert distance(1.9) < 0.5 * distance(0.0)


def test_local_norm_keeps_the_clinics_groupnorm_over_the_global_one(
        tmp_path: Path, clinic_dir: Path) -> None:
    """FedBN-like: after a round the clinic's GroupNorm scale/offset replace the global
    ones when it loads the next global model (for training and validation)."""
    from fedseg_clinic.model.unet import norm_variables

    env = _env(tmp_path, clinic_dir)
    path = Path(env["FEDSEG_SETTINGS"])
    doc = yaml.safe_load(path.read_text())
    doc["training"]["local_norm"] = True
    path.write_text(yaml.safe_dump(doc))
    app = ClinicApp(load_settings(env))
    norm_ids = {id(v) for v in norm_variables(app.model)}
    is_norm = [id(v) in norm_ids for v in app.model.weights]
    assert any(is_norm) and not all(is_norm)
    seed = [np.asarray(w) for w in app.model.get_weights()]
    _, meta = app.train(seed, {"learning_rate": 0.05})
    assert meta["local_norm"] is True
    own = [w.copy() for w, n in zip(app.model.get_weights(), is_norm, strict=True) if n]
    assert any(not np.array_equal(a, s) for a, s, n in
               zip(app.model.get_weights(), seed, is_norm, strict=True) if n)
    metrics = app.validate(seed)  # the global model is the seed again
    assert metrics["val_personalised"] == 1.0
    for now, s, n in zip(app.model.get_weights(), seed, is_norm, strict=True):
        # GroupNorm: the clinic's own; everything else: the global model's.
        np.testing.assert_array_equal(now, own.pop(0) if n else s)


def test_distributed_round_sends_integer_sums_and_a_noise_share(tmp_path: Path,
                                                                clinic_dir: Path) -> None:
    """privacy.distributed: ClinicApp refuses plain training, and contribute() returns the
    integer sum of clipped patient gradients (frozen coordinates exactly 0) plus a Skellam
    share of variance mu / m, reserved in the ledger as a skellam round."""
    from fedseg_clinic.privacy import skellam
    from fedseg_clinic.privacy.ledger import PrivacyLedger, ledger_path

    def app_with(noise: float, where: str) -> ClinicApp:
        env = _env(tmp_path / where, clinic_dir, distributed=True, noise_multiplier=noise)
        settings = load_settings(env)
        settings.training.trainable = "norm_bias"
        return ClinicApp(settings)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet, noisy = app_with(1e-6, "a"), app_with(1.0, "b")
    seed = [np.asarray(w) for w in quiet.model.get_weights()]
    with pytest.raises(FedsegError, match="needs secure aggregation"):
        quiet.train(seed, {})
    clean, meta = quiet.contribute(seed, {}, 3)
    noised, meta_b = noisy.contribute(seed, {}, 3)
    n = len(quiet.train_cases)
    assert all(a.dtype == np.int64 and a.shape == s.shape
               for a, s in zip(clean, seed, strict=True))
    from fedseg_clinic.model.unet import trainable_subset

    trained = {id(v) for v in trainable_subset(quiet.model, "norm_bias")}
    frozen = [a for v, a in zip(quiet.model.weights, clean, strict=True) if id(v) not in trained]
    assert frozen and not any(a.any() for a in frozen)  # frozen: no gradient, no noise
    flat_clean = np.concatenate([a.ravel() for a in clean]).astype(np.float64)
    assert 0 < np.linalg.norm(flat_clean) <= n * skellam.CLIP_UNITS + 10
    # Same patches (seeded sampling, round 0 of each ledger): the difference is noise of
    # variance mu / m = 2^40 / 2 on each trained coordinate.
    diff = np.concatenate([(b - a).ravel() for a, b in zip(clean, noised, strict=True)])
    d = meta["trained_parameters"]
    assert np.count_nonzero(diff) > 0.9 * d
    assert diff[diff != 0].var() == pytest.approx(2.0 ** 40 / 2, rel=0.3)
    assert meta_b["honest_shares"] == 2 and meta_b["secagg_clinics"] == 3
    assert meta_b["epsilon"] == pytest.approx(
        skellam.epsilon([skellam.segment_for(1.0, 1)], 1e-3), rel=1e-9)
    assert meta_b["epsilon_if_alone"] > meta_b["epsilon"]
    assert "at least 2 honest noise shares" in meta_b["trust"]
    assert meta_b["ddp_scale"] == skellam.CLIP_UNITS / 1.0 and meta_b["num_examples"] == n
    ledger = PrivacyLedger(ledger_path(tmp_path / "b" / "privacy", noisy.data_id),
                           noisy.data_id, 1e-3, None)
    (entry,) = ledger.entries()
    assert entry["mechanism"] == "skellam" and entry["sampling_probability"] == 1.0


def test_equal_time_stops_at_the_budget_and_dp_reserves_the_cap(tmp_path: Path,
                                                                 clinic_dir: Path) -> None:
    """local_seconds: the round stops when its time is spent; the ledger holds the cap."""
    app = ClinicApp(load_settings(_env(tmp_path, clinic_dir)))
    seed = [np.asarray(w) for w in app.model.get_weights()]
    n = len(app.train_cases)
    # A budget far below one step's time: exactly one step, the cap of 6 reserved.
    new, meta = app.train(seed, {"local_steps": 6, "local_seconds": 1e-6})
    assert meta["local_steps"] == 1 and meta["local_steps_reserved"] == 6
    assert meta["local_seconds"] == 1e-6
    assert not all(np.array_equal(a, b) for a, b in zip(seed, new, strict=True))
    (entry,) = app.ledger(1e-3, None).segments()
    assert entry.steps == 6
    # The round's epsilon is that of the reserved cap, an upper bound on the one step.
    assert meta["epsilon"] == pytest.approx(compute_epsilon(n, 2, 6, 1.0, 1e-3).epsilon,
                                            rel=1e-6)
    assert meta["epsilon"] > compute_epsilon(n, 2, 1, 1.0, 1e-3).epsilon
    # A budget no round of 3 steps uses up: the cap is reached, as with equal steps.
    _, meta = app.train(new, {"local_steps": 3, "local_seconds": 600.0})
    assert meta["local_steps"] == 3 and meta["local_steps_reserved"] == 3
    assert [s.steps for s in app.ledger(1e-3, None).segments()] == [6, 3]
    with pytest.raises(FedsegError, match="local_seconds must be a finite number >= 0"):
        app.train(new, {"local_seconds": -1.0})
