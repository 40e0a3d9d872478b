from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedseg_clinic.cases import (
    Case,
    CaseMeta,
    Manifest,
    manifest_entry,
    write_case,
    write_manifest,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.unet import labels_from_masks
from fedseg_clinic.patches import PatchSampler, load_cases, normalise_hu


def make_case(case_id: str, shape: tuple[int, int, int], masks: dict[str, np.ndarray],
              hu_clip: tuple[float, float] = (-1000.0, 1000.0)) -> Case:
    # The image encodes the flat voxel index, so a crop's position can be read back.
    image = (np.arange(np.prod(shape)).reshape(shape) % 2000 - 1000).astype(np.int16)
    meta = CaseMeta(case_id=case_id, patient_pseudonym=case_id, shape=shape,
                    spacing=(2.0, 1.0, 1.0), labelled_organs=tuple(masks), hu_clip=hu_clip)
    return Case(meta=meta, image=image, masks=masks)


@pytest.mark.parametrize(
    ("hu", "window", "expected"),
    [
        ([-1000, 0, 1000], (-1000, 1000), [-1.0, 0.0, 1.0]),
        ([-3000, 3000], (-1000, 1000), [-1.0, 1.0]),
        ([25, 50, 100], (0, 100), [-0.5, 0.0, 1.0]),
        ([-160, 240], (-160, 240), [-1.0, 1.0]),
    ],
)
def test_normalise_hu(hu: list, window: tuple, expected: list) -> None:
    out = normalise_hu(np.array(hu, dtype=np.int16), window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("window", [(100, 100), (200, -200)])
def test_normalise_hu_rejects_empty_window(window: tuple) -> None:
    with pytest.raises(FedsegError, match="HU window"):
        normalise_hu(np.zeros(3, np.int16), window)


def test_sample_shapes_and_crop_consistency() -> None:
    shape = (12, 10, 9)
    body = np.zeros(shape, bool)
    body[2:10, 2:8, 1:8] = True
    heart = np.zeros(shape, bool)
    heart[4:6, 3:5, 3:5] = True
    case = make_case("a", shape, {"body": body, "heart": heart})
    sampler = PatchSampler((4, 4, 4), foreground_fraction=0.5, flip=False)
    full_labels = labels_from_masks(case.masks, shape)
    full_image = normalise_hu(case.image, (-1000, 1000))
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, labels = sampler.sample(case, rng)
        assert image.shape == (4, 4, 4, 1) and image.dtype == np.float32
        assert labels.shape == (4, 4, 4) and labels.dtype == np.uint8
        # The image is the flat voxel index - 1000 (1080 voxels, no wrap), normalised
        # by /1000: the first voxel of the patch gives the crop's corner.
        corner = round((float(image[0, 0, 0, 0]) + 1.0) * 1000)
        z, y, x = np.unravel_index(corner, shape)
        window = (slice(z, z + 4), slice(y, y + 4), slice(x, x + 4))
        np.testing.assert_array_equal(image[..., 0], full_image[window])
        np.testing.assert_array_equal(labels, full_labels[window])


def test_foreground_fraction_one_always_hits_a_small_organ() -> None:
    shape = (16, 16, 16)
    cord = np.zeros(shape, bool)
    cord[14, 1, 1] = True  # one voxel near a corner
    case = make_case("b", shape, {"spinal_cord": cord, "body": np.ones(shape, bool)})
    sampler = PatchSampler((4, 4, 4), foreground_fraction=1.0)
    rng = np.random.default_rng(1)
    hits = [bool((sampler.sample(case, rng)[1] == 5).any()) for _ in range(10)]
    assert all(hits)
    uniform = PatchSampler((4, 4, 4), foreground_fraction=0.0)
    misses = [bool((uniform.sample(case, rng)[1] == 5).any()) for _ in range(30)]
    assert not all(misses)


def test_foreground_ignores_body_and_empty_organs() -> None:
    shape = (8, 8, 8)
    case = make_case("c", shape, {"body": np.ones(shape, bool), "heart": np.zeros(shape, bool)})
    sampler = PatchSampler((4, 4, 4), foreground_fraction=1.0)
    _image, labels = sampler.sample(case, np.random.default_rng(0))  # falls back to uniform
    assert set(np.unique(labels)) == {1}


def test_small_case_is_padded_with_air_and_background() -> None:
    shape = (2, 3, 4)
    heart = np.ones(shape, bool)
    case = make_case("d", shape, {"heart": heart}, hu_clip=(-1000.0, 1000.0))
    sampler = PatchSampler((4, 5, 4), flip=False)
    image, labels = sampler.sample(case, np.random.default_rng(0))
    assert image.shape == (4, 5, 4, 1)
    assert int((labels == 4).sum()) == 2 * 3 * 4
    assert labels[0].max() == 0 and labels[3].max() == 0  # z padding 1 before, 1 after
    assert np.all(image[0] == -1.0) and np.all(image[:, 0] == -1.0)
    np.testing.assert_array_equal(labels[1:3, 1:4, :], 4)


def test_z_flip_flips_image_and_labels_together() -> None:
    shape = (4, 2, 2)
    heart = np.zeros(shape, bool)
    heart[0] = True
    case = make_case("e", shape, {"heart": heart})
    sampler = PatchSampler((4, 2, 2), flip=True)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        image, labels = sampler.sample(case, rng)
        top = int(np.argmax(labels[:, 0, 0] == 4))
        seen.add(top)
        # The labelled slice keeps its own image values (x/y never flipped).
        expected = normalise_hu(case.image[0], (-1000, 1000))
        np.testing.assert_array_equal(image[top, ..., 0], expected)
    assert seen == {0, 3}


def test_hu_clip_override() -> None:
    shape = (2, 2, 2)
    case = make_case("f", shape, {"heart": np.zeros(shape, bool)})
    image, _ = PatchSampler((2, 2, 2), flip=False, hu_clip=(0.0, 1.0)).sample(
        case, np.random.default_rng(0))
    assert set(np.unique(image)) <= {-1.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"patch_size": (4, 4)}, "patch size"), ({"patch_size": (4, 0, 4)}, "patch size"),
     ({"patch_size": (4, 4, 4), "foreground_fraction": 1.5}, "foreground_fraction")],
)
def test_sampler_rejects_bad_settings(kwargs: dict, fragment: str) -> None:
    with pytest.raises(FedsegError, match=fragment):
        PatchSampler(**kwargs)


def _clinic(tmp_path: Path, organs_per_case: dict[str, tuple[str, ...]],
            splits: dict[str, str]) -> Path:
    shape = (3, 4, 5)
    entries = []
    for case_id, organs in organs_per_case.items():
        case = make_case(case_id, shape, {o: np.ones(shape, bool) for o in organs})
        write_case(case, tmp_path)
        entries.append(manifest_entry(case.meta, splits[case_id]))
    write_manifest(Manifest(clinic="test", cases=entries), tmp_path)
    return tmp_path


def test_load_cases_reads_split_and_skips_unlabelled(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    folder = _clinic(tmp_path, {"p1": ("heart",), "p2": (), "p3": ("body", "heart")},
                     {"p1": "train", "p2": "train", "p3": "val"})
    with caplog.at_level(logging.WARNING):
        cases = load_cases(folder, "train")
    assert [c.meta.case_id for c in cases] == ["p1"]
    assert "p2" in caplog.text
    assert [c.meta.case_id for c in load_cases(folder, "val")] == ["p3"]


def test_load_cases_errors(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="does not exist"):
        load_cases(tmp_path / "missing", "train")
    folder = _clinic(tmp_path, {"p1": ("heart",), "p2": ()}, {"p1": "train", "p2": "val"})
    with pytest.raises(FedsegError, match="no case in split 'val' has a labelled organ"):
        load_cases(folder, "val")
    with pytest.raises(FedsegError, match="split must be"):
        load_cases(folder, "test")
    write_manifest(Manifest(clinic="test", cases=[]), folder)
    with pytest.raises(FedsegError, match="no cases in split 'train'"):
        load_cases(folder, "train")
