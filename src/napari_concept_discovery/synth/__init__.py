"""Synthetic Cell Painting plates with per-cell ground truth (RxRx layout).

``write_synthetic_plates`` writes whole plates for tests, sample data and benchmarks;
``generate_site`` draws one site in memory. What each cell type and perturbation changes is
declared in ``synth.concepts``.
"""

from .concepts import CELL_TYPES, CHANNELS, CONTROL, MITOTIC_FRACTION, PERTURBATIONS
from .plate import plan_plate, planned_site, well_names, write_synthetic_plates
from .site import PlateBatch, SyntheticSite, generate_site

__all__ = [
    "CELL_TYPES",
    "CHANNELS",
    "CONTROL",
    "MITOTIC_FRACTION",
    "PERTURBATIONS",
    "PlateBatch",
    "SyntheticSite",
    "generate_site",
    "plan_plate",
    "planned_site",
    "well_names",
    "write_synthetic_plates",
]
