from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.unet import UNetConfig, build_unet
from fedseg_clinic.model.weights import apply_weights, load_weights_npz, save_weights_npz

TINY = UNetConfig(levels=2, base_filters=4)


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    source = build_unet(TINY, seed=1)
    path = save_weights_npz(source.get_weights(), tmp_path / "model.npz")
    assert path == tmp_path / "model.npz"
    with np.load(path) as npz:  # fedn numpyhelper layout: keys "0".."n-1"
        assert sorted(npz.files, key=int) == [str(i) for i in range(len(source.weights))]
    target = build_unet(TINY, seed=2)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 8, 1)).astype(np.float32)
    assert not np.array_equal(source(x).numpy(), target(x).numpy())
    apply_weights(target, load_weights_npz(path), where=str(path))
    np.testing.assert_array_equal(source(x).numpy(), target(x).numpy())


def test_save_keeps_name_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float64)]
    save_weights_npz(arrays, tmp_path / "sub" / "weights.bin")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["weights.bin"]
    loaded = load_weights_npz(tmp_path / "sub" / "weights.bin")
    assert len(loaded) == 2
    for a, b in zip(arrays, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (UNetConfig(levels=2, base_filters=8), r"weight 0 \(enc0_conv1/kernel:0\) has shape"),
        (UNetConfig(levels=3, base_filters=4), "weight arrays, model unet3d expects"),
    ],
)
def test_wrong_architecture_fails_clearly(tmp_path: Path, other: UNetConfig,
                                          fragment: str) -> None:
    path = save_weights_npz(build_unet(other, seed=0).get_weights(), tmp_path / "w.npz")
    model = build_unet(TINY, seed=0)
    before = model.get_weights()
    with pytest.raises(FedsegError, match=f"^global model w.npz: .*{fragment}"):
        apply_weights(model, load_weights_npz(path), where="global model w.npz")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_non_finite_weights_rejected() -> None:
    model = build_unet(TINY, seed=0)
    arrays = model.get_weights()
    arrays[3] = np.full_like(arrays[3], np.nan)
    with pytest.raises(FedsegError, match=r"round 3 update: weight 3 .* NaN"):
        apply_weights(model, arrays, where="round 3 update")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="does not exist"):
        load_weights_npz(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(FedsegError, match=r"garbage\.npz: unreadable"):
        load_weights_npz(garbage)
    wrong_keys = tmp_path / "keys.npz"
    with open(wrong_keys, "wb") as handle:
        np.savez(handle, a=np.zeros(2))
    with pytest.raises(FedsegError, match=r"keys\.npz: not a numpyhelper weights file"):
        load_weights_npz(wrong_keys)
