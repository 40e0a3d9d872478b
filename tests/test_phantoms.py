"""Synthetic thoracic phantoms: anatomy, knobs, writer, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from fedseg.cli import cli
from fedseg.orchestration import phantoms as ph
from fedseg.orchestration.phantoms import benchmark as ph_benchmark
from fedseg_clinic.cases import read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import ORGANS

# A clean scanner: no blur, noise or offset, so HU tests see the ideal tissue values.
CLEAN = dict(hu_offset=0.0, noise_sigma=0.0, blur_sigma_mm=0.0)


def _spec(size: int = 48, patients: int = 2, clinics: int = 1, **knobs: object
          ) -> ph.BenchmarkSpec:
    spec = ph.preset_spec("iid", clinics, patients, size, seed=3)
    return ph.with_clinic_knobs(spec, **{k: [v] for k, v in knobs.items()})


@pytest.fixture(scope="module")
def phantoms64() -> list[ph.Phantom]:
    """Three clean patients at 64^3 (anatomy checks need the canal resolved)."""
    spec = _spec(size=64, patients=3)
    return [ph.make_phantom(spec, 0, pi) for pi in range(3)]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_arrays() -> None:
    spec = ph.preset_spec("non-iid", 3, 2, 32, seed=7)
    for ci in range(3):
        a, b = ph.make_case(spec, ci, 1), ph.make_case(spec, ci, 1)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.masks.keys() == b.masks.keys()
        for organ in a.masks:
            assert a.masks[organ].tobytes() == b.masks[organ].tobytes()
        assert a.meta == b.meta


def test_other_seed_or_patient_gives_other_anatomy() -> None:
    spec = _spec(size=32)
    other = dataclasses.replace(spec, seed=spec.seed + 1)
    base = ph.make_case(spec, 0, 0)
    assert not np.array_equal(base.image, ph.make_case(other, 0, 0).image)
    assert not np.array_equal(base.masks["body"], ph.make_case(spec, 0, 1).masks["body"])


def test_scanner_knob_does_not_change_anatomy() -> None:
    a = ph.make_case(_spec(size=32, noise_sigma=5.0), 0, 0)
    b = ph.make_case(_spec(size=32, noise_sigma=40.0, hu_offset=30.0), 0, 0)
    for organ in ORGANS:
        assert np.array_equal(a.masks[organ], b.masks[organ])


# ----------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize(
    ("organ", "low", "high"),
    [
        ("lung_left", -880.0, -700.0),  # parenchyma -860 plus a few percent vessels
        ("lung_right", -880.0, -700.0),
        ("heart", 60.0, 200.0),  # wall 40, contrast pool 250
        ("spinal_cord", 25.0, 35.0),
        ("esophagus", -400.0, 45.0),  # 40, some slices with air
    ],
)
def test_organ_mean_hu(phantoms64: list[ph.Phantom], organ: str, low: float, high: float
                       ) -> None:
    for phantom in phantoms64:
        mean = float(phantom.hu[phantom.masks[organ]].mean())
        assert low <= mean <= high, (organ, mean)


@pytest.mark.parametrize(
    ("tissue", "low", "high"),
    [("air", -1000.0, -1000.0), ("fat", -160.0, -40.0), ("muscle", 40.0, 40.0),
     ("bone", 450.0, 950.0), ("cord", 30.0, 30.0), ("blood", 250.0, 250.0),
     ("csf", 10.0, 10.0)],
)
def test_tissue_hu_ranges(phantoms64: list[ph.Phantom], tissue: str, low: float,
                          high: float) -> None:
    for phantom in phantoms64:
        values = phantom.hu[phantom.tissue == ph.TISSUES.index(tissue)]
        assert values.size > 0, tissue
        assert low <= values.min() and values.max() <= high, (tissue, values.min(), values.max())


def test_air_outside_body_and_organs_inside_body(phantoms64: list[ph.Phantom]) -> None:
    for phantom in phantoms64:
        body = phantom.masks["body"]
        assert np.all(phantom.hu[~body] == ph.HU_AIR)
        for organ in ORGANS:
            mask = phantom.masks[organ]
            assert mask.any(), organ
            assert not (mask & ~body).any(), organ


def test_lungs_on_correct_side(phantoms64: list[ph.Phantom]) -> None:
    # LPS: x (column index) grows toward the patient's left.
    for phantom in phantoms64:
        left_cols = np.nonzero(phantom.masks["lung_left"])[2]
        right_cols = np.nonzero(phantom.masks["lung_right"])[2]
        assert left_cols.min() > right_cols.max()
        heart_cols = np.nonzero(phantom.masks["heart"])[2]
        assert heart_cols.mean() > (phantom.hu.shape[2] - 1) / 2  # heart leans left


def test_anterior_posterior_order(phantoms64: list[ph.Phantom]) -> None:
    # LPS: y (row index) grows toward posterior: heart, esophagus, cord.
    for phantom in phantoms64:
        rows = {o: np.nonzero(phantom.masks[o])[1].mean()
                for o in ("heart", "esophagus", "spinal_cord")}
        assert rows["heart"] < rows["esophagus"] < rows["spinal_cord"]


def test_spinal_cord_inside_bone_canal(phantoms64: list[ph.Phantom]) -> None:
    for phantom in phantoms64:
        bone = phantom.tissue == ph.TISSUES.index("bone")
        cord = phantom.masks["spinal_cord"]
        assert not (cord & bone).any()
        for k in range(cord.shape[0]):
            assert cord[k].any()
            enclosed = ndimage.binary_fill_holes(bone[k])
            assert enclosed[cord[k]].all(), f"slice {k}: cord not enclosed by bone"


@pytest.mark.parametrize("pair", [("lung_left", "lung_right"), ("lung_left", "heart"),
                                  ("lung_right", "heart"), ("heart", "esophagus"),
                                  ("esophagus", "spinal_cord"), ("lung_left", "esophagus")])
def test_organs_do_not_overlap(phantoms64: list[ph.Phantom], pair: tuple[str, str]) -> None:
    for phantom in phantoms64:
        assert not (phantom.masks[pair[0]] & phantom.masks[pair[1]]).any()


def test_organ_volumes_plausible(phantoms64: list[ph.Phantom]) -> None:
    spacing = _spec(size=64).grid(_spec(size=64).clinics[0])[1]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for phantom in phantoms64:
        litres = {o: phantom.masks[o].sum() * voxel_ml / 1000.0 for o in ORGANS}
        assert 1.0 < litres["lung_left"] < 4.0 and 1.0 < litres["lung_right"] < 4.0
        assert 0.3 < litres["heart"] < 1.0
        assert 10.0 < litres["body"] < 45.0


@pytest.mark.parametrize("size", [16, 24])
def test_thin_organs_never_vanish_at_coarse_size(size: int) -> None:
    case = ph.make_case(_spec(size=size, patients=1), 0, 0)
    for organ in ("spinal_cord", "esophagus"):
        per_slice = case.masks[organ].any(axis=(1, 2))
        assert per_slice.all(), organ


# ----------------------------------------------------------------------------- knobs


@pytest.mark.parametrize("sigma", [10.0, 40.0])
def test_noise_sigma_measured_in_muscle(sigma: float) -> None:
    spec = _spec(size=48, patients=1, hu_offset=0.0, noise_sigma=sigma, blur_sigma_mm=0.0)
    phantom = ph.make_phantom(spec, 0, 0)
    image = ph.make_case(spec, 0, 0).image
    muscle = phantom.tissue == ph.TISSUES.index("muscle")
    measured = float(image[muscle].std())
    assert abs(measured - sigma) < 0.08 * sigma + 0.5, measured
    assert abs(float(image[muscle].mean()) - ph.HU_MUSCLE) < 2.0


@pytest.mark.parametrize("offset", [-50.0, 80.0])
def test_hu_offset_shifts_means(offset: float) -> None:
    base = ph.make_case(_spec(size=32, patients=1, noise_sigma=10.0), 0, 0)
    shifted = ph.make_case(_spec(size=32, patients=1, noise_sigma=10.0, hu_offset=offset), 0, 0)
    for organ in ("heart", "spinal_cord", "esophagus"):
        diff = (shifted.image[shifted.masks[organ]].astype(float).mean()
                - base.image[base.masks[organ]].astype(float).mean())
        assert diff == pytest.approx(offset, abs=0.5)


def test_blur_smooths_the_body_edge() -> None:
    sharp = ph.make_case(_spec(size=48, patients=1, **CLEAN), 0, 0).image.astype(float)
    soft = ph.make_case(_spec(size=48, patients=1, hu_offset=0.0, noise_sigma=0.0,
                              blur_sigma_mm=8.0), 0, 0).image.astype(float)
    assert np.abs(np.diff(soft, axis=2)).max() < 0.6 * np.abs(np.diff(sharp, axis=2)).max()


@pytest.mark.parametrize(("spacing", "slices"), [(5.0, 64), (10.0, 32), (2.5, 128)])
def test_slice_spacing_sets_slice_count(spacing: float, slices: int) -> None:
    spec = _spec(size=32, slice_spacing_mm=spacing)
    shape, grid_spacing = spec.grid(spec.clinics[0])
    assert shape == (slices, 32, 32) and grid_spacing[0] == spacing
    assert ph.make_case(spec, 0, 0).image.shape == shape


def test_size_scale_grows_patients() -> None:
    small = ph.make_case(_spec(size=48, patients=1, size_scale=0.7), 0, 0).masks["body"].sum()
    large = ph.make_case(_spec(size=48, patients=1, size_scale=1.2), 0, 0).masks["body"].sum()
    assert large / small == pytest.approx((1.2 / 0.7) ** 2, rel=0.2)


def test_partial_labels_case() -> None:
    spec = _spec(size=24, labelled_organs=("body", "heart"))
    case = ph.make_case(spec, 0, 0)
    assert case.meta.labelled_organs == ("body", "heart")
    assert set(case.masks) == {"body", "heart"}


# ----------------------------------------------------------------------------- presets


def test_iid_preset_clinics_alike() -> None:
    spec = ph.preset_spec("iid", 4, 5, 32, seed=1)
    knobs = {dataclasses.replace(c, name="x") for c in spec.clinics}
    assert len(knobs) == 1 and spec.clinics[0].patients == 5
    assert [c.name for c in spec.clinics] == ["clinic-1", "clinic-2", "clinic-3", "clinic-4"]


def test_non_iid_preset_heterogeneous() -> None:
    spec = ph.preset_spec("non-iid", 3, 10, 64, seed=1)
    assert sum(c.patients for c in spec.clinics) == 30
    counts = [c.patients for c in spec.clinics]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 3
    assert len({c.hu_offset for c in spec.clinics}) == 3
    assert len({c.noise_sigma for c in spec.clinics}) == 3
    assert len({spec.slice_spacing(c) for c in spec.clinics}) == 3
    assert [set(c.labelled_organs) == set(ORGANS) for c in spec.clinics] == [True, True, False]
    assert "spinal_cord" not in spec.clinics[2].labelled_organs


@pytest.mark.parametrize(("total", "parts", "alpha", "minimum"),
                         [(30, 3, 1.0, 3), (60, 3, 0.3, 3), (10, 5, 5.0, 2), (4, 4, 1.0, 1)])
def test_dirichlet_counts(total: int, parts: int, alpha: float, minimum: int) -> None:
    counts = ph.dirichlet_counts(total, parts, alpha, seed=5, minimum=minimum)
    assert sum(counts) == total and len(counts) == parts and min(counts) >= minimum
    assert counts == sorted(counts, reverse=True)
    assert counts == ph.dirichlet_counts(total, parts, alpha, seed=5, minimum=minimum)


def test_dirichlet_counts_too_few() -> None:
    with pytest.raises(FedsegError, match="at least 3"):
        ph.dirichlet_counts(5, 2, 1.0, seed=0, minimum=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(size=15), "size must be between 16"),
        (dict(seed=-1), "seed"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(clinic=dict(patients=0)), "patients must be between 1"),
        (dict(clinic=dict(labelled_organs=("liver",))), "unknown organ"),
        (dict(clinic=dict(labelled_organs=())), "non-empty"),
        (dict(clinic=dict(size_scale=2.0)), "size_scale"),
        (dict(clinic=dict(noise_sigma=-1.0)), "noise_sigma"),
        (dict(clinic=dict(name="../x")), "not a plain folder name"),
        (dict(clinic=dict(slice_spacing_mm=200.0)), "slice_spacing_mm"),
        (dict(clinic=dict(roi_style="fancy")), "roi_style"),
        (dict(size=512), "M voxels per patient exceeds"),
    ],
)
def test_validate_spec_rejects(change: dict, message: str) -> None:
    spec = _spec(size=32)
    clinic_change = change.pop("clinic", None)
    if clinic_change:
        spec = dataclasses.replace(
            spec, clinics=(dataclasses.replace(spec.clinics[0], **clinic_change),))
    spec = dataclasses.replace(spec, **change)
    with pytest.raises(FedsegError, match=message):
        ph.validate_spec(spec)


def test_knob_list_length_checked() -> None:
    spec = ph.preset_spec("iid", 3, 2, 32, seed=0)
    with pytest.raises(FedsegError, match="1 value or 3"):
        ph.with_clinic_knobs(spec, hu_offset=[1.0, 2.0])
    assert [c.hu_offset for c in ph.with_clinic_knobs(spec, hu_offset=[1, 2, 3]).clinics] == [
        1, 2, 3]


def test_spec_file_round_trip(tmp_path: Path) -> None:
    spec = ph.preset_spec("non-iid", 3, 4, 32, seed=9)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(ph.spec_to_json(spec)))
    assert ph.load_spec(path) == spec
    yaml_path = tmp_path / "spec.yaml"
    yaml_path.write_text("seed: 2\nsize: 32\nclinics:\n  - patients: 3\n"
                         "  - {name: small, patients: 2, labelled_organs: [body, heart]}\n")
    loaded = ph.load_spec(yaml_path)
    assert [c.name for c in loaded.clinics] == ["clinic-1", "small"]
    assert loaded.clinics[1].labelled_organs == ("body", "heart")


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "must be a mapping"), ("seed: 1\nsize: 32\nclinics: []", "non-empty list"),
     ("seed: 1\nsize: 32\nclinics: [{patients: 2, colour: red}]", "unknown key"),
     ("seed: 1\nclinics: [{patients: 2}]", "'size' is required"),
     ("seed: 1\nsize: 32\nclinics: [{patients: 0}]", "patients must be"),
     ("seed: [", "not valid YAML")],
)
def test_bad_spec_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(FedsegError, match=message) as info:
        ph.load_spec(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- writer


def test_generate_benchmark_layout(tmp_path: Path) -> None:
    spec = ph.preset_spec("non-iid", 3, 3, 24, seed=4)
    out = tmp_path / "bench"
    results = ph.generate_benchmark(spec, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "benchmark.json", "clinic-1", "clinic-2", "clinic-3"]
    info = json.loads((out / "benchmark.json").read_text())
    assert info["seed"] == 4 and info["generator"] == ph.GENERATOR
    assert ph.spec_from_mapping(info, "benchmark.json") == spec
    for clinic, result in zip(spec.clinics, results, strict=True):
        manifest = read_manifest(out / clinic.name)
        assert manifest.clinic == clinic.name
        assert len(manifest.cases) == clinic.patients
        assert {e.split for e in manifest.cases} == {"train", "val"}
        assert result.n_train + result.n_val == clinic.patients
        for entry in manifest.cases:
            case = read_case(out / clinic.name / entry.case_id)
            assert entry.labelled_organs == case.meta.labelled_organs
            assert set(case.masks) == set(clinic.labelled_organs)
            assert case.meta.source == "phantom"
            assert case.image.dtype == np.int16
            assert tuple(case.meta.shape) == spec.grid(clinic)[0]
    # The partial-label clinic: organs absent from labels and from masks.
    last = read_manifest(out / "clinic-3")
    assert all("esophagus" not in e.labelled_organs for e in last.cases)
    assert not list(tmp_path.glob(".bench*"))


def test_generate_twice_is_identical(tmp_path: Path) -> None:
    spec = ph.preset_spec("iid", 2, 2, 16, seed=8)
    ph.generate_benchmark(spec, tmp_path / "a")
    ph.generate_benchmark(spec, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                             if p.is_file())
    for rel in files_a:
        if rel.suffix == ".npy":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    spec = ph.preset_spec("iid", 2, 2, 16, seed=8)
    real = ph.make_case
    calls = []

    def failing(spec: ph.BenchmarkSpec, ci: int, pi: int) -> object:
        calls.append((ci, pi))
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(spec, ci, pi)

    monkeypatch.setattr(ph_benchmark, "make_case", failing)  # where it is looked up
    with pytest.raises(RuntimeError):
        ph.generate_benchmark(spec, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_output(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    spec = ph.preset_spec("iid", 1, 1, 16, seed=0)
    if not overwrite:
        with pytest.raises(FedsegError, match="not empty"):
            ph.generate_benchmark(spec, out)
        assert (out / "old.txt").exists()
    else:
        ph.generate_benchmark(spec, out, overwrite=True)
        assert not (out / "old.txt").exists() and (out / "benchmark.json").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- CLI


def test_cli_generates(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, [
        "data", "phantoms", "--clinics", "2", "--patients", "2", "--size", "16", "--out",
        str(out), "--seed", "3", "--preset", "non-iid", "--hu-offset", "0,-40",
        "--labelled-organs", "1=body,heart"])
    assert result.exit_code == 0, result.output
    assert "clinic-2" in result.output
    spec = ph.load_spec(out / "benchmark.json")
    assert [c.hu_offset for c in spec.clinics] == [0.0, -40.0]
    assert spec.clinics[0].labelled_organs == ("body", "heart")
    assert read_manifest(out / "clinic-1").cases[0].labelled_organs == ("body", "heart")
    # The written benchmark.json regenerates the same data.
    again = tmp_path / "again"
    result = CliRunner().invoke(cli, ["data", "phantoms", "--spec", str(out / "benchmark.json"),
                                      "--out", str(again)])
    assert result.exit_code == 0, result.output
    for npy in out.rglob("image.npy"):
        assert npy.read_bytes() == (again / npy.relative_to(out)).read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patients", "0"], "patients must be between 1"),
        (["--size", "15"], "size must be between 16"),
        (["--clinics", "0"], "clinics must be between 1"),
        (["--size", "0", "--preset", "non-iid"], "size must be between 16"),
        (["--preset", "non-iid", "--quantity-skew", "0"], "must be > 0"),
        (["--patients-per-clinic", "2,x"], "comma-separated integers"),
        (["--val-fraction", "1.5"], "val_fraction"),
        (["--hu-offset", "a,b"], "--hu-offset: expected comma-separated numbers"),
        (["--labelled-organs", "9=body"], "clinic 9 does not exist"),
        (["--labelled-organs", "1=body,kidney"], "unknown organ"),
        (["--spec", "missing.yaml"], "cannot read spec"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["data", "phantoms", "--out", str(out), "--size", "16",
                                      "--patients", "1", *args]
                                if "--spec" not in args else
                                ["data", "phantoms", "--out", str(out), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_cli_output_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep")
    result = CliRunner().invoke(cli, ["data", "phantoms", "--out", str(target), "--size", "16"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"fedseg: error: {target}: output path exists and is not a folder"]
    assert target.read_text() == "keep"


def test_cli_spec_conflicts(tmp_path: Path) -> None:
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("seed: 1\nsize: 16\nclinics: [{patients: 1}]\n")
    result = CliRunner().invoke(cli, ["data", "phantoms", "--out", str(tmp_path / "o"),
                                      "--spec", str(spec_path), "--clinics", "2"])
    assert result.exit_code == 1 and "cannot be combined with --clinics" in result.output
