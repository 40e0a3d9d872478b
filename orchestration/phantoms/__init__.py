"""Synthetic multi-clinic thoracic CT benchmark: anatomy, clinic heterogeneity, writer.

Every patient is an analytic thorax drawn on a voxel grid with numpy (ellipses,
superellipses, distance-to-segment tubes; no Python loops over voxels): air outside the
body (-1000 HU), subcutaneous fat (-100), muscle/soft tissue (40), ribs, sternum and
vertebrae as bone (700) around the spinal canal (CSF 10) with the spinal cord (30)
inside, lungs (-860) with a vessel texture (intersections of two smooth random
fields' zero sets, 30 HU), the heart (40) with a contrast blood pool (250), the
esophagus (40, a small tube anterior-left of the spine, sometimes with air), the
descending aorta (250), trachea and main bronchi (air), mediastinal fat (-80) and the
upper abdomen below the diaphragm domes (liver 55, sometimes a stomach gas bubble).

Axes and coordinates follow the case format (:mod:`fedseg_clinic.cases`): arrays
are (z, y, x), slices axial, LPS patient coordinates in mm: x grows toward the patient's
left (the left lung sits at larger x), y from anterior to posterior, z from inferior to
superior (slice 0 is the most inferior). The grid is centred on (0, 0, 0).

Per-patient anatomy (overall size, body shape, fat thickness, organ sizes, positions,
heart rotation, diaphragm heights, esophageal air, stomach gas) is drawn from the seed
with ``SeedSequence(seed, spawn_key=(clinic, patient, stream))``: anatomy, texture and
scanner noise use separate streams, so changing a scanner knob never changes a
patient's anatomy, and the same seed gives byte-identical arrays.

Per-clinic heterogeneity knobs (:class:`ClinicSpec`):

- ``hu_offset``: scanner calibration offset added to every voxel (HU).
- ``noise_sigma``: standard deviation of white Gaussian noise (HU), added after blur.
- ``blur_sigma_mm``: Gaussian point-spread sigma in mm (reconstruction kernel), applied
  along all three axes in voxel units of that clinic's grid.
- ``slice_spacing_mm``: z spacing; the scan always covers ``z_extent_mm``, so a clinic
  with thicker slices has fewer slices. ``None`` means ``z_extent_mm / size``.
- ``patients``: number of patients (quantity skew; presets draw it from a Dirichlet).
- ``size_scale``: mean patient size factor (population; each patient adds ~6 % jitter).
- ``labelled_organs``: the label protocol. Organs a clinic does not contour are left out
  of ``labelled_organs`` and of the masks (partial labels: unknown, not absent).
- ``roi_style``: ROI naming convention used in the RTSTRUCT when writing DICOM.

Presets (:func:`preset_spec`): ``iid`` gives every clinic the reference knobs and the
same number of patients; ``non-iid`` cycles three scanner archetypes, draws patient
counts from a Dirichlet (largest first) and removes spinal cord and esophagus from the
last clinic's label protocol. docs/phantoms.md explains the choice.

Modules: ``spec`` (knobs, presets, validation, spec files), ``anatomy`` (per-patient
parameters), ``render`` (voxel grid, tissues, masks), ``scanner`` (blur, noise, offset),
``benchmark`` (cases and whole benchmarks, written atomically), ``dicom`` (DICOM export).
"""

# The public API, from the module of each concept (import from here or from the module).
from fedseg.orchestration.phantoms.anatomy import (
    STREAM_ANATOMY,
    STREAM_SCANNER,
    STREAM_TEXTURE,
    Anatomy,
    draw_anatomy,
    patient_rng,
)
from fedseg.orchestration.phantoms.benchmark import (
    GeneratedClinic,
    case_id,
    generate_benchmark,
    make_case,
    make_phantom,
    prepare_output,
)
from fedseg.orchestration.phantoms.render import (
    HU_AIR,
    HU_MUSCLE,
    TISSUES,
    Phantom,
    render_phantom,
)
from fedseg.orchestration.phantoms.scanner import apply_scanner
from fedseg.orchestration.phantoms.spec import (
    BENCHMARK_NAME,
    GENERATOR,
    GENERATOR_VERSION,
    HU_CLIP,
    PRESETS,
    ROI_STYLES,
    BenchmarkSpec,
    ClinicSpec,
    dirichlet_counts,
    load_spec,
    preset_spec,
    spec_from_mapping,
    spec_to_json,
    validate_spec,
    with_clinic_knobs,
)

__all__ = [
    "BENCHMARK_NAME", "GENERATOR", "GENERATOR_VERSION", "HU_AIR", "HU_CLIP", "HU_MUSCLE",
    "PRESETS", "ROI_STYLES", "STREAM_ANATOMY", "STREAM_SCANNER", "STREAM_TEXTURE", "TISSUES",
    "Anatomy", "BenchmarkSpec", "ClinicSpec", "GeneratedClinic", "Phantom", "apply_scanner",
    "case_id", "dirichlet_counts", "draw_anatomy", "generate_benchmark", "load_spec",
    "make_case", "make_phantom", "patient_rng", "prepare_output", "preset_spec",
    "render_phantom", "spec_from_mapping", "spec_to_json", "validate_spec",
    "with_clinic_knobs",
]
