"""Per-patient anatomy parameters drawn from the seed (one random stream per purpose)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy parameters, in mm (x left+, y posterior+, z superior+).

    In-plane positions are relative to the grid centre, z positions to the scan centre.
    """

    body_center: tuple[float, float]
    body_half_axes: tuple[float, float]
    body_exponent: float
    fat_thickness: float
    muscle_thickness: float
    rib_thickness: float
    rib_period: float
    rib_phase: float
    mediastinum_x: float
    mediastinum_half_width: float
    lung_apex_z: float
    dome_z_right: float
    dome_z_left: float
    dome_depth: float
    heart_center: tuple[float, float, float]
    heart_half_axes: tuple[float, float, float]
    heart_angle_deg: float
    blood_pool_fraction: float
    vertebra_center: tuple[float, float]
    vertebra_radius: float
    canal_radius: float
    cord_radius: float
    cord_offset: tuple[float, float]
    esophagus_center: tuple[float, float]
    esophagus_half_axes: tuple[float, float]
    esophagus_drift: float
    esophagus_air: bool
    aorta_center: tuple[float, float]
    aorta_radius: float
    trachea_radius: float
    carina_z: float
    stomach_gas: bool

# ----------------------------------------------------------------------------- anatomy


# Random streams of one patient: anatomy, texture and scanner noise are independent.
STREAM_ANATOMY, STREAM_TEXTURE, STREAM_SCANNER = 0, 1, 2


def patient_rng(seed: int, clinic_index: int, patient_index: int, stream: int
                ) -> np.random.Generator:
    """The generator of one (clinic, patient, stream); same arguments, same numbers."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(clinic_index, patient_index, stream))
    )


def draw_anatomy(rng: np.random.Generator, size_scale: float = 1.0) -> Anatomy:
    """Draw one patient's anatomy; sizes scale with ``size_scale`` and ~6 % jitter."""
    s = size_scale * float(np.exp(rng.normal(0.0, 0.06)))

    def jit(value: float, rel: float) -> float:
        return float(value * (1.0 + rng.normal(0.0, rel)))

    def shift(sd: float) -> float:
        return float(rng.normal(0.0, sd))

    ax, ay = jit(160.0 * s, 0.05), jit(118.0 * s, 0.05)
    vr = jit(17.0 * s, 0.06)
    vy = 0.42 * ay + shift(3.0)
    canal = jit(8.5 * s, 0.06)
    eso_ax, eso_ay = jit(9.0 * s, 0.12), jit(6.5 * s, 0.12)
    eso_y = vy - vr - eso_ay - 2.5 * s + shift(1.5)
    apex = jit(140.0 * s, 0.04)
    dome_r = -65.0 * s + shift(8.0)
    return Anatomy(
        body_center=(shift(4.0), shift(4.0)),
        body_half_axes=(ax, ay),
        body_exponent=float(rng.uniform(2.1, 2.6)),
        fat_thickness=float(np.clip(jit(14.0 * s, 0.3), 4.0, 40.0)),
        muscle_thickness=jit(11.0 * s, 0.15),
        rib_thickness=jit(10.0, 0.1),
        rib_period=jit(26.0 * s, 0.06),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        mediastinum_x=shift(3.0),
        mediastinum_half_width=jit(16.0 * s, 0.15),
        lung_apex_z=apex,
        dome_z_right=dome_r,
        dome_z_left=dome_r - jit(15.0 * s, 0.3),
        dome_depth=jit(55.0 * s, 0.12),
        heart_center=(jit(22.0 * s, 0.15), -0.2 * ay + shift(4.0), -30.0 * s + shift(6.0)),
        heart_half_axes=(jit(62.0 * s, 0.07), jit(45.0 * s, 0.07), jit(50.0 * s, 0.07)),
        heart_angle_deg=float(rng.uniform(30.0, 50.0)),
        blood_pool_fraction=float(rng.uniform(0.55, 0.7)),
        vertebra_center=(shift(1.5), vy),
        vertebra_radius=vr,
        canal_radius=canal,
        cord_radius=float(min(jit(5.0 * s, 0.08), canal - 1.5)),
        cord_offset=(shift(0.8), shift(0.8)),
        esophagus_center=(jit(6.0 * s, 0.3), eso_y),
        esophagus_half_axes=(eso_ax, eso_ay),
        esophagus_drift=shift(4.0),
        esophagus_air=bool(rng.uniform() < 0.5),
        aorta_center=(jit(26.0 * s, 0.1), vy - 0.6 * vr + shift(2.0)),
        aorta_radius=jit(11.5 * s, 0.1),
        trachea_radius=jit(8.5 * s, 0.08),
        carina_z=jit(40.0 * s, 0.15),
        stomach_gas=bool(rng.uniform() < 0.6),
    )
