"""The ground truth of the synthetic plates, declared as data.

Cell types, perturbations and the mitotic subpopulation are plain records so that tests,
benchmarks and the dictionary evaluation can read what a concept changes (which channels, how
often) without parsing drawing code. The drawing code in ``cells.py`` reads only these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: RxRx channel order (files w1..w6).
CHANNELS: tuple[str, ...] = ("DNA", "ER", "Actin", "RNA", "Mito", "Membrane")

EXPERIMENT = "SYNTH"
DATASET = "synthetic"

#: Fraction of cells drawn in mitosis, independent of well, cell type and perturbation.
MITOTIC_FRACTION = 0.05


@dataclass(frozen=True)
class CellType:
    """Morphology of one cell line; every field is a mean that cells scatter around."""

    name: str
    radius: float  # cell radius in pixels (geometric mean of the ellipse axes)
    elongation: float  # mean major/minor axis ratio of the cell
    irregularity: float  # amplitude of low-order shape harmonics (0 = ellipse)
    nucleus_ratio: float  # nucleus radius / cell radius
    coverage: float  # target fraction of the field covered by cells
    clustering: float  # 0 = uniform placement, 1 = cells grow in tight colonies
    brightness: tuple[float, ...]  # relative stain intensity per channel (CHANNELS order)
    er_scale: float  # spatial period of the ER network (pixels)
    mito_scale: float  # spatial period of mitochondrial tubules (pixels)
    actin_fibres: float  # stress-fibre amplitude relative to cortex
    nucleoli: tuple[int, int]  # min, max nucleoli per nucleus


@dataclass(frozen=True)
class Perturbation:
    """A perturbation's named effects; ``effects`` is empty for a null perturbation.

    Effect keys and the channels they change:
    ``nucleus_scale`` (DNA: nucleus radius factor), ``mito_fragmentation`` (Mito: tubules to
    puncta, 0..1), ``actin_fibres`` (Actin: added stress-fibre amplitude), ``er_aggregation``
    (ER: reticular network to coarse aggregates, 0..1), ``nucleolar_rna`` (RNA: nucleolus size
    and brightness factor), ``golgi_dispersal`` (Membrane: compact Golgi to scattered puncta,
    0..1).
    """

    name: str
    sirna: str
    sirna_id: int
    penetrance: float  # probability that a cell in a treated well responds
    channels: tuple[str, ...] = ()
    effects: dict[str, float] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return not self.effects


CELL_TYPES: tuple[CellType, ...] = (
    CellType(
        name="HUVEC",
        radius=30.0,
        elongation=1.9,
        irregularity=0.12,
        nucleus_ratio=0.36,
        coverage=0.55,
        clustering=0.0,
        brightness=(1.0, 0.9, 1.0, 0.8, 0.9, 0.8),
        er_scale=5.0,
        mito_scale=6.0,
        actin_fibres=0.35,
        nucleoli=(1, 3),
    ),
    CellType(
        name="HEPG2",
        radius=19.0,
        elongation=1.2,
        irregularity=0.08,
        nucleus_ratio=0.52,
        coverage=0.6,
        clustering=0.8,
        brightness=(1.15, 1.1, 0.7, 1.0, 1.2, 0.9),
        er_scale=3.5,
        mito_scale=4.0,
        actin_fibres=0.05,
        nucleoli=(2, 4),
    ),
    CellType(
        name="U2OS",
        radius=38.0,
        elongation=1.35,
        irregularity=0.22,
        nucleus_ratio=0.33,
        coverage=0.45,
        clustering=0.2,
        brightness=(0.9, 1.0, 1.15, 0.9, 0.8, 1.1),
        er_scale=7.0,
        mito_scale=8.0,
        actin_fibres=0.7,
        nucleoli=(1, 2),
    ),
)

CONTROL = Perturbation(name="control", sirna="EMPTY", sirna_id=0, penetrance=0.0)

#: Treatments in the order wells receive them (nulls interleaved so small plates get one).
PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("nuclear_enlargement", "SYN0001", 1, 0.7, ("DNA",), {"nucleus_scale": 1.45}),
    Perturbation("null_a", "SYN0002", 2, 0.0),
    Perturbation("mito_fragmentation", "SYN0003", 3, 0.65, ("Mito",), {"mito_fragmentation": 1.0}),
    Perturbation("actin_fibres", "SYN0004", 4, 0.7, ("Actin",), {"actin_fibres": 1.4}),
    Perturbation("null_b", "SYN0005", 5, 0.0),
    Perturbation("er_aggregation", "SYN0006", 6, 0.6, ("ER",), {"er_aggregation": 1.0}),
    Perturbation("nucleolar_rna", "SYN0007", 7, 0.7, ("RNA",), {"nucleolar_rna": 1.9}),
    Perturbation("golgi_dispersal", "SYN0008", 8, 0.65, ("Membrane",), {"golgi_dispersal": 1.0}),
)

#: The "forms" variant: the same stains hit in the same well slots, at the same nulls, but each
#: effect has another form (texture or location instead of size, shape or amount), a lower
#: penetrance and a graded response (each responder's amplitude drawn uniformly from 0.4-1.6,
#: mean 1), so that a benchmark tuned on the default generator meets plates it has not seen.
#: Effect keys (channel, what changes in responders, amplitude 0..1 before grading):
#: ``chromatin_condensation`` (DNA: mottled, clumped chromatin; texture),
#: ``mito_perinuclear`` (Mito: tubules pulled tight around the nucleus; location),
#: ``actin_cortical`` (Actin: stress fibres gone, actin moved to the cortex; location),
#: ``er_peripheral`` (ER: network moved from around the nucleus to the cell edge; location),
#: ``rna_granules`` (RNA: cytoplasmic RNA in coarse granules; texture),
#: ``membrane_vesicles`` (Membrane: fine vesicles become coarse ones; texture).
FORM_PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation(
        "chromatin_condensation", "SYN0101", 101, 0.45, ("DNA",), {"chromatin_condensation": 0.6}
    ),
    Perturbation("null_a", "SYN0002", 2, 0.0),
    Perturbation("mito_perinuclear", "SYN0103", 103, 0.4, ("Mito",), {"mito_perinuclear": 1.0}),
    Perturbation("actin_cortical", "SYN0104", 104, 0.5, ("Actin",), {"actin_cortical": 1.0}),
    Perturbation("null_b", "SYN0005", 5, 0.0),
    Perturbation("er_peripheral", "SYN0106", 106, 0.45, ("ER",), {"er_peripheral": 1.0}),
    Perturbation("rna_granules", "SYN0107", 107, 0.4, ("RNA",), {"rna_granules": 1.0}),
    Perturbation(
        "membrane_vesicles", "SYN0108", 108, 0.5, ("Membrane",), {"membrane_vesicles": 1.0}
    ),
)
#: Effect keys of the "forms" variant (drawn from their own random stream in ``cells.paint``).
FORM_EFFECTS = frozenset(k for p in FORM_PERTURBATIONS for k in p.effects)
#: Generator variants by name: the treatments the well slots receive.
VARIANTS: dict[str, tuple[Perturbation, ...]] = {
    "default": PERTURBATIONS,
    "forms": FORM_PERTURBATIONS,
}

CELL_TYPE_BY_NAME = {c.name: c for c in CELL_TYPES}
PERTURBATION_BY_NAME = {p.name: p for p in (CONTROL, *PERTURBATIONS, *FORM_PERTURBATIONS)}
