"""Write synthetic plates in the RxRx layout, with label images and a per-cell truth table.

Well assignment (documented because small plates depend on it):

- Wells are named row-major from B02 in a block ``ceil(sqrt(1.5 * n_wells))`` columns wide
  (at most 22 columns, B..O rows), so 24 wells fill B02..E07 and 6 wells B02..C04.
- Cell types take turns over the well slots (slot i gets type i mod 3), so every plate has
  every cell type once ``n_wells >= 3``.
- Of the k wells of a cell type on a plate, the first ``max(1, round(k / 4))`` are negative
  controls (perturbation "control"); the rest are treated. The j-th treated well of type t on
  plate p gets ``PERTURBATIONS[(p * n_treated + j + 3 * t) % 8]``, so types get different
  treatments and the next plate continues where this one stopped. ``PERTURBATIONS`` is the
  default variant's list; another variant (``concepts.VARIANTS``) puts its own treatments in
  the same slots. With 6 wells and 2 plates
  that is 6 controls and 6 distinct treatments, both null ones among them.
- The conditions are then shuffled over the plate's well positions (seeded by seed and plate),
  as a randomised plate layout would be.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import atomic_write_text, check_not_foreign, owned_files
from ..settings import Settings, option
from .concepts import CELL_TYPES, CHANNELS, CONTROL, DATASET, EXPERIMENT, VARIANTS
from .site import PlateBatch, generate_site

#: Peak memory of drawing one site, per pixel (measured with tracemalloc: about 226 bytes).
PEAK_BYTES_PER_PIXEL = 230
#: Left in a folder of synthetic plates, listing what ``write_synthetic_plates`` wrote there.
SYNTH_MARKER = "synth.json"
#: Most wells a plate holds here: rows B..O, 22 columns (see :func:`well_names`).
MAX_WELLS = 14 * 22


@dataclass
class SynthSettings(Settings):
    """How many synthetic plates, wells and sites, how large, and the seed that draws them."""

    plates: int = option(2, "number of plates")
    wells: int = option(24, "wells per plate")
    sites: int = option(2, "sites per well")
    size: int = option(512, "site width and height in pixels")
    seed: int = option(0, "random seed (same seed, same plates)")
    variant: str = option(
        "default",
        "generator variant: default, or forms (the same stains changed in another form: "
        "texture and location, lower and graded penetrance)",
        choices=tuple(VARIANTS),
    )
    workers: int | None = option(None, "worker processes (default: up to 4 CPUs)")


METADATA_COLUMNS = [
    "site_id",
    "well_id",
    "cell_type",
    "dataset",
    "experiment",
    "plate",
    "well",
    "site",
    "well_type",
    "sirna",
    "sirna_id",
    "perturbation",
]


@dataclass(frozen=True)
class WellPlan:
    plate: int
    well: str
    cell_type: str
    perturbation: str
    well_type: str
    sirna: str
    sirna_id: int


def well_names(n_wells: int) -> list[str]:
    """Row-major well names from B02 in a roughly 3:2 block (see module docstring)."""
    if not 1 <= n_wells <= MAX_WELLS:
        raise ValueError(f"n_wells must be between 1 and {MAX_WELLS}, got {n_wells}")
    cols = min(22, math.ceil(math.sqrt(1.5 * n_wells)))
    return [f"{chr(ord('B') + i // cols)}{2 + i % cols:02d}" for i in range(n_wells)]


def plan_plate(plate: int, n_wells: int, seed: int = 0, variant: str = "default") -> list[WellPlan]:
    """Cell type and perturbation of every well of plate ``plate`` (1-based)."""
    treatments = _variant(variant)
    n_types = len(CELL_TYPES)
    conditions = []
    for t, ct in enumerate(CELL_TYPES):
        k = len(range(t, n_wells, n_types))
        n_ctrl = max(1, round(k / 4)) if k else 0
        n_treated = k - n_ctrl
        for _ in range(n_ctrl):
            conditions.append((ct.name, CONTROL, "negative_control"))
        for j in range(n_treated):
            pert = treatments[((plate - 1) * n_treated + j + 3 * t) % len(treatments)]
            conditions.append((ct.name, pert, "treatment"))
    order = np.random.default_rng([seed, plate, 0x5EA7]).permutation(n_wells)
    wells = well_names(n_wells)
    plans = []
    for w, c in zip(wells, order, strict=True):
        name, pert, well_type = conditions[c]
        plans.append(WellPlan(plate, w, name, pert.name, well_type, pert.sirna, pert.sirna_id))
    return plans


def _variant(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def planned_site(plan, site: int, size: int, seed: int):
    """Site ``site`` of a planned well, with its plate's batch effects: exactly what
    ``write_synthetic_plates`` writes for it, for scripts that need the site in memory."""
    return generate_site(
        plan.cell_type,
        plan.perturbation,
        size=size,
        seed=seed,
        plate=plan.plate,
        well=plan.well,
        site=site,
        batch=PlateBatch.sample(seed, plan.plate),
    )


def _site_job(args) -> pd.DataFrame:
    """Generate one site and write its images and labels; returns its truth rows."""
    out, plan, site, size, seed = args
    import imageio.v3 as iio
    import tifffile

    result = planned_site(plan, site, size, seed)
    img_dir = out / "images" / EXPERIMENT / f"Plate{plan.plate}"
    lab_dir = out / "labels" / EXPERIMENT / f"Plate{plan.plate}"
    stem = f"{plan.well}_s{site}"
    for c in range(len(CHANNELS)):
        iio.imwrite(img_dir / f"{stem}_w{c + 1}.png", result.image[c], compress_level=1)
    dtype = np.uint16 if result.cells.max() < 65536 else np.int32
    tifffile.imwrite(lab_dir / f"{stem}_cells.tif", result.cells.astype(dtype), compression="zlib")
    tifffile.imwrite(
        lab_dir / f"{stem}_nuclei.tif", result.nuclei.astype(dtype), compression="zlib"
    )
    truth = result.truth
    truth.insert(0, "plate", f"{EXPERIMENT}_{plan.plate}")
    truth.insert(1, "experiment", EXPERIMENT)
    truth.insert(2, "plate_number", plan.plate)
    truth.insert(3, "well", plan.well)
    truth.insert(4, "site", site)
    return truth


def memory_needed(size: int, workers: int = 1) -> int:
    """Bytes that drawing ``workers`` sites of ``size`` x ``size`` pixels at once takes."""
    return PEAK_BYTES_PER_PIXEL * int(size) ** 2 * max(1, int(workers))


def write_synthetic_plates(
    out: str | os.PathLike,
    n_plates: int = SynthSettings.plates,
    n_wells: int = SynthSettings.wells,
    n_sites: int = SynthSettings.sites,
    size: int = SynthSettings.size,
    seed: int = SynthSettings.seed,
    *,
    variant: str = SynthSettings.variant,
    workers: int | None = SynthSettings.workers,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n_plates`` synthetic plates under ``out`` (RxRx layout) and return ``out``.

    Files: ``images/SYNTH/Plate{p}/{well}_s{site}_w{1..6}.png`` (uint8), label TIFFs under
    ``labels/`` with the same stem plus ``_cells``/``_nuclei``, ``metadata.csv`` (RxRx columns
    plus perturbation) and ``truth.csv`` (one row per cell). Output is identical for a seed
    whatever ``workers`` is; ``progress`` is called with 1 after every site. ``variant``
    picks the treatments (``concepts.VARIANTS``).
    """
    out = Path(out)
    if n_plates < 1 or n_sites < 1:
        raise ValueError("n_plates and n_sites must be at least 1")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    _variant(variant)
    # the one rule of every writer: a metadata.csv, truth.csv or plate folder this package did
    # not write there is never replaced
    written = ["metadata.csv", "truth.csv"] + [
        f"{kind}/{EXPERIMENT}/Plate{p}"
        for kind in ("images", "labels")
        for p in range(1, n_plates + 1)
    ]
    check_not_foreign(
        out, marker=SYNTH_MARKER, what="output folder", kind="a synthetic plate", writes=written
    )
    rows, jobs = [], []
    for p in range(1, n_plates + 1):
        (out / "images" / EXPERIMENT / f"Plate{p}").mkdir(parents=True, exist_ok=True)
        (out / "labels" / EXPERIMENT / f"Plate{p}").mkdir(parents=True, exist_ok=True)
        for plan in plan_plate(p, n_wells, seed, variant):
            for s in range(1, n_sites + 1):
                well_id = f"{EXPERIMENT}_{p}_{plan.well}"
                rows.append(
                    {
                        "site_id": f"{well_id}_{s}",
                        "well_id": well_id,
                        "cell_type": plan.cell_type,
                        "dataset": DATASET,
                        "experiment": EXPERIMENT,
                        "plate": p,
                        "well": plan.well,
                        "site": s,
                        "well_type": plan.well_type,
                        "sirna": plan.sirna,
                        "sirna_id": plan.sirna_id,
                        "perturbation": plan.perturbation,
                    }
                )
                jobs.append((out, plan, s, size, seed))

    if workers is None:
        workers = min(len(jobs), os.cpu_count() or 1, 4)
    truths = []
    if workers <= 1:
        for job in jobs:
            truths.append(_site_job(job))
            if progress:
                progress(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for truth in pool.map(_site_job, jobs, chunksize=2):
                truths.append(truth)
                if progress:
                    progress(1)

    pd.DataFrame(rows, columns=METADATA_COLUMNS).to_csv(out / "metadata.csv", index=False)
    pd.concat(truths, ignore_index=True).to_csv(out / "truth.csv", index=False)
    listed = sorted(owned_files(out, SYNTH_MARKER) - {SYNTH_MARKER} | set(written))
    atomic_write_text(out / SYNTH_MARKER, json.dumps({"files": listed}))
    return out
