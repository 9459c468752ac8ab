"""One synthetic site: cells, stains, then the microscope (blur, batch effects, shot noise).

A site's random stream is seeded from (seed, plate, well, site) alone, so any site can be
regenerated on its own and plates can be written in parallel in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .cells import paint, rasterise, sample_cells
from .concepts import CELL_TYPE_BY_NAME, CHANNELS, PERTURBATION_BY_NAME, CellType, Perturbation

#: Digital numbers of a bright structure per channel before gain, and dark offset.
_SCALE = np.array([150.0, 105.0, 105.0, 95.0, 115.0, 105.0], np.float32)
_OFFSET = 6.0
_PHOTONS_PER_DN = 2.0
_READ_NOISE = 0.8

#: (cell type, perturbation, plate seed) of the generated sites segmentation is scored on
#: against their true masks: every cell type, with and without a perturbation that changes
#: the nuclei or the cell outline (the segmentation tests and benchmarks/bench_segment.py).
SEGMENTATION_SITES = (
    ("HUVEC", "control", 1),
    ("HUVEC", "golgi_dispersal", 2),
    ("HEPG2", "control", 1),
    ("HEPG2", "nuclear_enlargement", 2),
    ("HEPG2", "actin_fibres", 3),
    ("U2OS", "control", 1),
    ("U2OS", "er_aggregation", 2),
)


def _well_index(well: str) -> tuple[int, int]:
    return ord(well[0].upper()) - ord("A"), int(well[1:])


def site_rng(seed: int, plate: int, well: str, site: int) -> np.random.Generator:
    """The random stream of one site, independent of generation order."""
    row, col = _well_index(well)
    return np.random.default_rng([seed, plate, row, col, site])


_ILLUMINATION: dict = {}


@dataclass(frozen=True)
class PlateBatch:
    """A plate's batch effect: per-channel gain and offset and an uneven illumination field."""

    gain: np.ndarray  # (6,)
    offset: np.ndarray  # (6,) digital numbers added to every pixel
    centre: tuple[float, float]  # brightest point of the illumination, fraction of the field
    falloff: np.ndarray  # (6,) relative drop from the centre to a corner
    tilt: tuple[float, float]  # linear gradient (y, x) per field width

    @classmethod
    def sample(cls, seed: int, plate: int) -> PlateBatch:
        rng = np.random.default_rng([seed, plate, 0xBA7C])
        return cls(
            gain=rng.lognormal(0.0, 0.2, 6),
            offset=rng.uniform(0.0, 8.0, 6),
            centre=tuple(rng.uniform(0.3, 0.7, 2)),
            falloff=rng.uniform(0.15, 0.4) * rng.lognormal(0.0, 0.15, 6),
            tilt=tuple(rng.uniform(-0.12, 0.12, 2)),
        )

    @classmethod
    def none(cls) -> PlateBatch:
        """No batch effect: unit gain, no offset, flat field."""
        return cls(np.ones(6), np.zeros(6), (0.5, 0.5), np.zeros(6), (0.0, 0.0))

    def illumination(self, size: int) -> np.ndarray:
        """(6, H, W) multiplicative field, 1.0 at its brightest point (cached per plate)."""
        key = (self.gain.tobytes(), self.falloff.tobytes(), self.centre, self.tilt, size)
        if key not in _ILLUMINATION:
            if len(_ILLUMINATION) > 8:
                _ILLUMINATION.clear()
            _ILLUMINATION[key] = self._illumination(size)
        return _ILLUMINATION[key]

    def _illumination(self, size: int) -> np.ndarray:
        y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
        x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
        r2 = ((y - self.centre[0]) ** 2 + (x - self.centre[1]) ** 2) / 0.5
        tilt = self.tilt[0] * (y - 0.5) + self.tilt[1] * (x - 0.5)
        field = 1.0 - self.falloff[:, None, None] * r2[None] + tilt[None]
        return np.clip(field, 0.2, None).astype(np.float32)


@dataclass
class SyntheticSite:
    """A generated site: the image as written, its labels and its per-cell truth."""

    image: np.ndarray  # (6, H, W) uint8, RxRx channel order
    cells: np.ndarray  # (H, W) int32
    nuclei: np.ndarray  # (H, W) int32, same ids as cells
    truth: pd.DataFrame  # one row per label
    channel_names: tuple[str, ...] = CHANNELS


def generate_site(
    cell_type: str | CellType,
    perturbation: str | Perturbation = "control",
    *,
    size: int = 512,
    seed: int = 0,
    plate: int = 1,
    well: str = "B02",
    site: int = 1,
    batch: PlateBatch | None = None,
) -> SyntheticSite:
    """Draw one site of ``cell_type`` under ``perturbation``.

    ``batch`` defaults to the plate's own batch effect for ``seed``; pass ``PlateBatch.none()``
    for a clean image. The truth table has one row per cell label with its cell type,
    perturbation, whether it responded, whether it is mitotic, centroid and areas.
    """
    ct = CELL_TYPE_BY_NAME[cell_type] if isinstance(cell_type, str) else cell_type
    pt = PERTURBATION_BY_NAME[perturbation] if isinstance(perturbation, str) else perturbation
    if batch is None:
        batch = PlateBatch.sample(seed, plate)
    rng = site_rng(seed, plate, well, site)

    cells = sample_cells(rng, ct, pt, size)
    geometry, kept = rasterise(cells, size, rng)
    cells = cells.subset(kept)
    signal = paint(rng, cells, geometry, ct, pt)

    # Optics: a slightly varying point-spread function, then gain/illumination and noise.
    sigma = 1.0 + 0.25 * rng.random()
    for c in range(6):
        signal[c] = ndi.gaussian_filter(signal[c], sigma, truncate=3.0)
    signal *= (_SCALE * batch.gain.astype(np.float32))[:, None, None]
    signal *= batch.illumination(size)
    signal += (_OFFSET + batch.offset.astype(np.float32))[:, None, None]
    # Shot noise (Gaussian approximation of Poisson, variance = mean photons) plus read noise.
    std = np.sqrt(signal / _PHOTONS_PER_DN + _READ_NOISE**2)
    dn = signal + std * rng.standard_normal(signal.shape, dtype=np.float32)
    image = np.clip(np.rint(dn), 0, 255).astype(np.uint8)

    labels = np.arange(1, len(cells) + 1)
    area = np.bincount(geometry.cells.ravel(), minlength=len(cells) + 1)[1:]
    nuc_area = np.bincount(geometry.nuclei.ravel(), minlength=len(cells) + 1)[1:]
    idx = np.arange(size, dtype=np.float64)
    cy = ndi.sum_labels(np.broadcast_to(idx[:, None], (size, size)), geometry.cells, labels)
    cx = ndi.sum_labels(np.broadcast_to(idx[None, :], (size, size)), geometry.cells, labels)
    truth = pd.DataFrame(
        {
            "label": labels.astype(np.int32),
            "cell_type": ct.name,
            "perturbation": pt.name,
            "responded": cells.responded.astype(bool),
            "mitotic": cells.mitotic.astype(bool),
            "centroid_y": cy / np.maximum(area, 1),
            "centroid_x": cx / np.maximum(area, 1),
            "area": area,
            "nucleus_area": nuc_area,
        }
    )
    return SyntheticSite(image, geometry.cells, geometry.nuclei, truth)
