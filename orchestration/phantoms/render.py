"""Rendering an anatomy on a voxel grid: ideal HU, tissue classes and organ masks."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from fedseg.orchestration.phantoms.anatomy import Anatomy

logger = logging.getLogger(__name__)


# Nominal tissue values (HU) before scanner effects.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -80.0
HU_MUSCLE = 40.0
HU_LUNG = -860.0
HU_VESSEL = 30.0
HU_BONE = 700.0
HU_DISC = 80.0
HU_CSF = 10.0
HU_CORD = 30.0
HU_HEART = 40.0
HU_BLOOD_CONTRAST = 250.0
HU_ESOPHAGUS = 40.0
HU_LIVER = 55.0

# Tissue classes of the label map returned by render_phantom (for tests and docs).
TISSUES: tuple[str, ...] = (
    "air", "fat", "muscle", "lung", "vessel", "bone", "disc", "csf", "cord", "heart",
    "blood", "esophagus", "aorta", "airway", "mediastinum", "liver", "gas",
)
_T = {name: i for i, name in enumerate(TISSUES)}
_TISSUE_HU = np.array(
    [HU_AIR, HU_FAT, HU_MUSCLE, HU_LUNG, HU_VESSEL, HU_BONE, HU_DISC, HU_CSF, HU_CORD,
     HU_HEART, HU_BLOOD_CONTRAST, HU_ESOPHAGUS, HU_BLOOD_CONTRAST, HU_AIR,
     HU_MEDIASTINAL_FAT, HU_LIVER, HU_AIR],
    dtype=np.float32,
)

@dataclasses.dataclass
class Phantom:
    """A rendered patient before scanner effects.

    Attributes:
        hu: float32 (z, y, x) ideal HU values.
        tissue: uint8 (z, y, x) tissue class index into TISSUES.
        masks: all six organs, bool (z, y, x).
    """

    hu: np.ndarray
    tissue: np.ndarray
    masks: dict[str, np.ndarray]

def _axes(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Open (broadcastable) mm coordinate grids z, y, x centred on the volume centre."""
    out = []
    for axis, (n, d) in enumerate(zip(shape, spacing, strict=True)):
        values = ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(d))
        view = [1, 1, 1]
        view[axis] = n
        out.append(values.reshape(view))
    return tuple(out)


def _superellipse(dx: np.ndarray, dy: np.ndarray, ax: Any, ay: Any, p: float) -> np.ndarray:
    """Inside test |dx/ax|^p + |dy/ay|^p <= 1 (ax, ay may broadcast; <= 0 means empty)."""
    ax = np.maximum(ax, 1e-3)
    ay = np.maximum(ay, 1e-3)
    return (np.abs(dx / ax) ** p + np.abs(dy / ay) ** p) <= 1.0


def _ellipse(dx: np.ndarray, dy: np.ndarray, ax: float, ay: float) -> np.ndarray:
    return (dx / ax) ** 2 + (dy / ay) ** 2 <= 1.0


def _segment_distance(z: np.ndarray, y: np.ndarray, x: np.ndarray,
                      a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every voxel to the segment a-b; points are (x, y, z)."""
    ax_, ay_, az_ = (np.float32(v) for v in a)
    d = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    length2 = float(d @ d)
    t = ((x - ax_) * d[0] + (y - ay_) * d[1] + (z - az_) * d[2]) / np.float32(length2)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - ax_ - t * d[0]) ** 2 + (y - ay_ - t * d[1]) ** 2
                   + (z - az_ - t * d[2]) ** 2)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                  sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std smooth Gaussian random field (float32)."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    sigma = [max(0.7, sigma_mm / d) for d in spacing]
    field = ndimage.gaussian_filter(noise, sigma=sigma, mode="wrap")
    std = float(field.std())
    return field / np.float32(std if std > 0 else 1.0)


def render_phantom(anatomy: Anatomy, shape: Sequence[int], spacing: Sequence[float],
                   rng: np.random.Generator) -> Phantom:
    """Draw an anatomy on a (z, y, x) grid centred on the origin.

    Args:
        anatomy: the patient.
        shape: (nz, ny, nx).
        spacing: (dz, dy, dx) in mm.
        rng: texture stream (lung vessels, bone and fat texture, esophageal air).

    Returns:
        Ideal HU, tissue classes and the six organ masks (mutually exclusive except body,
        which contains the others).
    """
    a = anatomy
    shape = tuple(int(n) for n in shape)
    z, y, x = _axes(shape, spacing)
    full = np.zeros(shape, dtype=bool)
    bx, by = a.body_center
    ax, ay = a.body_half_axes
    zt = z / np.float32(160.0)  # ~[-1, 1] over a thorax
    # Body: superellipse, slightly wider toward the shoulders.
    # The body stays a pixel inside the field of view (the operator chooses the FOV so).
    half_x = (shape[2] - 1) / 2.0 * spacing[2] - abs(bx) - spacing[2]
    half_y = (shape[1] - 1) / 2.0 * spacing[1] - abs(by) - spacing[1]
    body_ax = np.minimum(ax * (1.0 + 0.05 * zt), half_x)
    ay = min(ay, half_y)
    dxb, dyb = x - bx, y - by
    body = _superellipse(dxb, dyb, body_ax, ay, a.body_exponent) | full
    inset_fat = a.fat_thickness
    inner = _superellipse(dxb, dyb, body_ax - inset_fat, ay - inset_fat, a.body_exponent) | full
    wall = inset_fat + a.muscle_thickness
    rib_outer = _superellipse(dxb, dyb, body_ax - wall, ay - wall, a.body_exponent)
    wall += a.rib_thickness
    rib_inner = _superellipse(dxb, dyb, body_ax - wall, ay - wall, a.body_exponent)
    cavity = _superellipse(dxb, dyb, body_ax - wall - 3.0, ay - wall - 3.0, a.body_exponent)
    cavity = cavity | full

    # Spine: vertebral body (with discs), canal, posterior ring and spinous process.
    vx, vy = a.vertebra_center
    vr = a.vertebra_radius
    cx, cy = vx, vy + vr + a.canal_radius
    vertebra = _ellipse(x - vx, y - vy, 1.12 * vr, vr) | full
    disc_phase = np.cos(2.0 * np.pi * (z / np.float32(a.rib_period) + a.rib_phase))
    r_canal = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    canal = (r_canal <= a.canal_radius) | full
    ring = (r_canal <= a.canal_radius + 9.0) | full
    disc = vertebra & (disc_phase > 0.8) & ~ring  # the bony ring stays closed at discs
    spinous = _ellipse(x - cx, y - (cy + a.canal_radius + 14.0), 5.0, 16.0) | full
    cord_x, cord_y = cx + a.cord_offset[0], cy + a.cord_offset[1]
    cord = (np.sqrt((x - cord_x) ** 2 + (y - cord_y) ** 2) <= a.cord_radius) | full
    # A thin organ is never lost between pixel centres: its centre pixel always counts,
    # as a contouring physician would always draw it.
    cord |= _centre_pixels(np.full(shape[0], cord_x), np.full(shape[0], cord_y), shape,
                           spacing)
    canal |= cord
    spine = vertebra | ring | spinous

    # Ribs: a band inside the chest wall, periodic along z, sloping down anteriorly;
    # the sternum closes the band at the anterior midline.
    rib_band = rib_outer & ~rib_inner
    slope = (-(y - by) / np.float32(ay)) * np.float32(0.5 * a.rib_period)
    rib_wave = np.cos(2.0 * np.pi * ((z + slope) / np.float32(a.rib_period) + a.rib_phase))
    anterior_mid = (np.abs(x - bx) < 35.0) & (y < by)
    sternum = rib_band & (np.abs(x - bx) < 16.0) & (y < by)
    ribs = rib_band & (rib_wave > 0.35) & ~anterior_mid

    # Tubes: esophagus (drifting left going down), aorta, trachea and main bronchi.
    ex, ey = a.esophagus_center
    ex_z = ex - a.esophagus_drift * zt
    esophagus = _ellipse(x - ex_z, y - ey, *a.esophagus_half_axes) & ~spine
    eso_centre_x = ex - a.esophagus_drift * z.ravel() / np.float32(160.0)
    esophagus |= _centre_pixels(eso_centre_x, np.full(shape[0], ey), shape, spacing)
    esophagus &= ~canal
    bone = ((spine & ~canal & ~disc & ~esophagus) | ribs | sternum) & body
    eso_lumen = _ellipse(x - ex_z, y - ey, 0.4 * a.esophagus_half_axes[0],
                         0.4 * a.esophagus_half_axes[1]) & esophagus
    if a.esophagus_air:
        gas_z = _smooth_field(rng, (shape[0], 1, 1), (spacing[0], 1.0, 1.0), 20.0) > 0.3
        eso_lumen &= gas_z
    else:
        eso_lumen = np.zeros(shape, dtype=bool)
    aorta = _ellipse(x - a.aorta_center[0], y - a.aorta_center[1],
                     a.aorta_radius, a.aorta_radius) & ~esophagus & ~spine
    tx, ty = ex * 0.3, ey - a.esophagus_half_axes[1] - a.trachea_radius - 2.0
    top = float(z.max()) + 10.0
    airway = _segment_distance(z, y, x, (tx, ty, a.carina_z), (tx, ty, top)) <= a.trachea_radius
    for side in (-1.0, 1.0):
        end = (tx + side * 45.0, ty + 8.0, a.carina_z - 35.0)
        airway |= (_segment_distance(z, y, x, (tx, ty, a.carina_z), end)
                   <= 0.7 * a.trachea_radius)
    airway &= ~esophagus & ~spine & ~aorta

    # Heart: an ellipsoid rotated in the axial plane (long axis toward left-anterior),
    # kept off the esophagus, aorta and spine; contrast blood pool inside.
    hx, hy, hz = a.heart_center
    ang = math.radians(a.heart_angle_deg)
    u = (x - hx) * math.cos(ang) - (y - hy) * math.sin(ang)
    v = (x - hx) * math.sin(ang) + (y - hy) * math.cos(ang)
    w = z - hz
    la, lb, lc = a.heart_half_axes
    heart_q = (u / la) ** 2 + (v / lb) ** 2 + (w / lc) ** 2
    keep_off = esophagus | aorta | spine | airway
    heart = (heart_q <= 1.0) & ~_grow(keep_off, 3.0, spacing) & cavity
    f = a.blood_pool_fraction
    blood = (heart_q <= f * f) & heart

    # Diaphragm domes: lungs live above them; the abdomen below.
    dome_rx, dome_ry = 0.55 * ax, 0.8 * ay
    bowl = 1.0 - ((x - bx) / dome_rx) ** 2 - ((y - by) / dome_ry) ** 2
    dome = np.where(x < a.mediastinum_x, a.dome_z_right, a.dome_z_left) - a.dome_depth * (
        1.0 - np.clip(bowl, 0.0, 1.0))
    above = z > dome
    # Apex: the lungs narrow toward the thoracic inlet.
    taper_start = a.lung_apex_z - 120.0
    r = np.sqrt(np.clip(1.0 - np.clip((z - taper_start) / (a.lung_apex_z - taper_start),
                                      0.0, None) ** 2, 0.0, 1.0))
    mx, mw = a.mediastinum_x, a.mediastinum_half_width
    mediastinal = (np.abs(x - mx) < mw) & (y < vy)
    exclude = _grow(heart | esophagus | aorta | spine | airway, 4.0, spacing) | mediastinal
    lung_cx = 0.5 * (ax - wall + mw)
    lungs = {}
    for organ, side in (("lung_right", -1.0), ("lung_left", 1.0)):
        cx_l = mx + side * lung_cx
        lobe = _superellipse(x - cx_l, y - (by + 5.0), 0.6 * ax * r, 0.95 * ay * r, 2.4)
        on_side = (x - mx) * side > mw
        lungs[organ] = cavity & lobe & on_side & above & ~exclude
    lung_any = lungs["lung_left"] | lungs["lung_right"]

    # Lung texture: vessels where two smooth fields are both near zero (tube network).
    f1 = _smooth_field(rng, shape, spacing, 6.0)
    f2 = _smooth_field(rng, shape, spacing, 6.0)
    vessels = lung_any & (np.abs(f1) < 0.3) & (np.abs(f2) < 0.3)

    # Abdomen below the domes and gas in the stomach (left, just under the dome).
    abdomen = cavity & ~above & ~(spine | aorta | esophagus | heart)
    gas = np.zeros(shape, dtype=bool)
    if a.stomach_gas:
        gas = abdomen & (((x - (bx + 0.35 * ax)) / 28.0) ** 2 + ((y - (by - 0.1 * ay)) / 22.0)
                         ** 2 + ((z - (a.dome_z_left - 22.0)) / 16.0) ** 2 <= 1.0)

    # Tissue map, painted from outside in; later organs win.
    tissue = np.full(shape, _T["air"], dtype=np.uint8)
    tissue[body] = _T["fat"]
    tissue[inner] = _T["muscle"]
    tissue[cavity & above] = _T["mediastinum"]
    tissue[abdomen] = _T["liver"]
    tissue[gas] = _T["gas"]
    tissue[lung_any] = _T["lung"]
    tissue[vessels] = _T["vessel"]
    tissue[(spine | ribs | sternum) & body & ~bone] = _T["muscle"]
    tissue[disc] = _T["disc"]
    tissue[bone] = _T["bone"]
    tissue[canal] = _T["csf"]
    tissue[cord] = _T["cord"]
    tissue[aorta] = _T["aorta"]
    tissue[airway] = _T["airway"]
    tissue[esophagus] = _T["esophagus"]
    tissue[eso_lumen] = _T["airway"]
    tissue[heart] = _T["heart"]
    tissue[blood] = _T["blood"]
    tissue[~body] = _T["air"]

    hu = _TISSUE_HU[tissue]
    # Mild texture so tissues are not flat: fat and bone vary, lungs breathe a little.
    f3 = _smooth_field(rng, shape, spacing, 10.0)
    hu += np.where(tissue == _T["bone"], 60.0, 0.0).astype(np.float32) * f3
    hu += np.where((tissue == _T["fat"]) | (tissue == _T["mediastinum"]), 12.0,
                   0.0).astype(np.float32) * f3
    hu += np.where(tissue == _T["lung"], 20.0, 0.0).astype(np.float32) * f3

    masks = {
        "body": body,
        "lung_left": lungs["lung_left"],
        "lung_right": lungs["lung_right"],
        "heart": heart,
        "spinal_cord": cord & body,
        "esophagus": esophagus & body,
    }
    return Phantom(hu=hu.astype(np.float32), tissue=tissue, masks=masks)


def _centre_pixels(xc: np.ndarray, yc: np.ndarray, shape: Sequence[int],
                   spacing: Sequence[float]) -> np.ndarray:
    """One voxel per slice: the pixel centre nearest to (xc[k], yc[k]) mm."""
    nz, ny, nx = shape
    ix = np.clip(np.rint(np.asarray(xc) / spacing[2] + (nx - 1) / 2.0), 0, nx - 1).astype(int)
    iy = np.clip(np.rint(np.asarray(yc) / spacing[1] + (ny - 1) / 2.0), 0, ny - 1).astype(int)
    out = np.zeros(tuple(shape), dtype=bool)
    out[np.arange(nz), iy, ix] = True
    return out


def _grow(mask: np.ndarray, margin_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Dilate a mask by about ``margin_mm`` (an ellipsoidal margin in voxel units)."""
    radii = [margin_mm / d for d in spacing]
    if max(radii) < 0.5:
        return mask
    ext = [math.floor(r) for r in radii]
    grids = np.ogrid[tuple(slice(-e, e + 1) for e in ext)]
    ball = sum(((g / max(r, 1e-6)) ** 2) for g, r in zip(grids, radii, strict=True)) <= 1.0
    return ndimage.binary_dilation(mask, structure=ball)
