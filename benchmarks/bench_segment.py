"""Segmentation on real plates: NF1 against CellProfiler's masks, JUMP and Phenix by inspection.

NF1 (``nf1_plate2``, DAPI/GFP/RFP, 5 wells): CellProfiler's ``MaskCells`` and ``MaskNuclei`` come
from the NF1 project's pipeline (``NF1_analysis_plate1_plate2.cppipe``; nuclei: three-class Otsu
on DAPI, no declumping, diameters 30-90, nuclei touching the border discarded; cells:
Propagation on RFP, regularisation 0.05, three-class Otsu with the middle class as foreground,
and IdentifySecondaryObjects' "discard objects touching the border" on, with "discard the
associated primary objects" off: ``MaskCells`` has no pixel within 6 px of the border, while
``MaskNuclei`` keeps the nuclei of the cells it dropped). Per well: foreground Jaccard and area
ratio (ours / CellProfiler's) of the cell masks, and nucleus F1 at IoU 0.5 with nuclei touching
the border dropped on our side as CellProfiler dropped them, two ways: ``F1m``, our nuclei
merged within each connected piece of the binary ``MaskNuclei`` first
(:func:`~napari_concept_discovery.segment.site.merge_within`; the mask cannot hold touching nuclei
apart, and the pipeline does not declump), on which the bar is judged, and ``F1``, one to one.
Rows:

- ``before``: the segmentation of version 0.1 (``segmenter="legacy"``) as a user ran it, and
  with border cells dropped afterwards (the like-for-like reading).
- ``CellProfiler's settings``: our classical segmenter told what that pipeline was told
  (``--cell RFP --cell-threshold otsu3 --no-cell-log --nucleus-threshold otsu3 --no-declump
  --min-diameter 30 --max-diameter 90 --drop-edge --drop-edge-by cell``). Bars: Jaccard >= 0.8
  and ratio 0.8-1.25 in every well, nucleus F1 (merged) >= 0.95.
- ``defaults``: only ``--nuclear DAPI`` and the pipeline's border rule, ``--drop-edge
  --drop-edge-by cell`` (which objects an experiment keeps is a choice told, not found): both
  non-nuclear stains, each from its own background, propagation on them weighted by how far
  each fills its cells (GFP is perinuclear here, RFP fills the cells), declumping, relative
  size limits; bars as above.
  Also ``--drop-edge`` alone (by the nucleus, CellProfiler's IdentifyPrimaryObjects rule and
  our default meaning), which keeps the cells of interior nuclei that reach the border; the
  reference dropped those, so that row is no reading of segmentation quality.
- ``..., cells both keep``: the same cells on both sides, which separates how far cells reach
  from which cells are kept. A cell (ours, border cells included) is kept by CellProfiler when
  its nucleus lies mostly in ``MaskCells``, by us when it does not touch the border; J and ratio
  are taken within the territories (nearest nucleus) of the cells both keep. Below the table:
  how many cells one side keeps and the other drops, and their share of CellProfiler's area.
- Nuclei: CellProfiler's ``MaskNuclei`` is binary and the NF1 pipeline does not declump, so
  two touching nuclei are one object there and two in ours (figure
  ``docs/images/segment_nf1_pairs.png``); the F1 is also given with those pairs merged on our
  side, the like-for-like reading.

JUMP (``jump_BR00117006``: AGP, RNA, DNA) and Phenix (``pediatric_cancer_atlas_BR00143976``,
``--nuclear ch5``; ch1 is brightfield and is left out by itself) have no masks: per site, cells,
cells holding more than one nucleus (two or more peaks of the smoothed DNA stain, smoothed at a
quarter of the typical nucleus diameter, above the nucleus threshold, at least half a diameter
apart) and nucleus-only cells (cell area < 1.3 x nucleus area), before and after, and a figure of
labels over the image in ``docs/images/``. Cell foreground rules: the default (Otsu on the log
of each cell stain, the union over stains) against other per-image rules, on all three plates:
NF1 J and ratio on the cells both keep, JUMP and Phenix cells, >1 nucleus, nucleus-only,
foreground share and the median cell / nucleus area. Synthetic plates: cell and nucleus F1
against truth.

The zoo (``napari_concept_discovery.synth.zoo``: generated sites with true masks, one thing
varied at a time: background offset, read and shot noise, bit depth, stain brightness, a dim
cytoplasm, density, cell size, uneven illumination, an empty or missing stain, debris,
saturated blobs, a patchy stain, touching nuclei; and one row combining a measured real plate's
traits) is scored per rule (J, area ratio, cell F1 at IoU 0.5, and ``assign``, the share of the
pixels in both foregrounds given to the right cell, which is where the propagation image
shows; medians over ``--zoo-sites`` sites; ``--rules`` picks the columns) beside
NF1 (J and ratio with the pipeline's border rule, nucleus F1m), JUMP and Phenix (cells, >1
nucleus, nucleus-only), in one table, with the bars judged per rule. ``qc``:
which sites the quality control (``segment_qc``) flags, with the defaults and with the previous
default, on the zoo and the real sites.

    python benchmarks/bench_segment.py [--out benchmarks/results/bench_segment.txt]
                                       [--figures docs/images] [--zoo-sites 4]
    python benchmarks/bench_segment.py --only qc --zoo-sites 2 --no-figures \
        --out benchmarks/results/bench_segment_qc.txt
"""

from __future__ import annotations

import argparse
import io
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import feature, measure, segmentation

from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.segment.classical import (
    cell_channels,
    fill_label_holes,
    find_nuclei_with,
    foreground,
    propagate,
    propagation_surface,
    smooth,
    threshold,
    touching_edge,
    typical_diameter,
    unit_scale,
)
from napari_concept_discovery.segment.site import (
    NF1_PIPELINE,
    match_counts,
    merge_within,
    quality_channels,
    segment_site,
)
from napari_concept_discovery.settings import SegmentSettings

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"
NF1_PATTERN = "{well}_01_{channel_index}_{site}_{channel}_001.tif"

LEGACY = SegmentSettings(segmenter="legacy", nuclear="DAPI")
CELLPROFILER = NF1_PIPELINE
DEFAULTS = SegmentSettings(nuclear="DAPI", drop_edge=True, drop_edge_by="cell")
BY_NUCLEUS = SegmentSettings(nuclear="DAPI", drop_edge=True)


def drop_edge(nuclei: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells touching the border removed with their nuclei (for segmenters without the option)."""
    gone = np.isin(cells, touching_edge(cells))
    return np.where(gone, 0, nuclei), np.where(gone, 0, cells)


def foreground_scores(cells: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    fg = cells > 0
    return float((fg & mask).sum() / (fg | mask).sum()), float(fg.sum() / mask.sum())


def nucleus_f1(nuclei: np.ndarray, truth: np.ndarray, merged: bool = False) -> float:
    """F1 at IoU 0.5 with our nuclei touching the border dropped, as CellProfiler dropped them;
    ``merged``: ours merged within each piece of the binary reference first (module docs)."""
    kept = np.where(np.isin(nuclei, touching_edge(nuclei)), 0, nuclei)
    if merged:
        kept = merge_within(kept, truth > 0)
    tp, n_pred, n_truth = match_counts(kept, truth)
    return 2 * tp / max(n_pred + n_truth, 1)


def nf1_wells():
    plate = open_plate(REAL / "nf1_plate2" / "images", layout="pattern", pattern=NF1_PATTERN)
    masks = REAL / "nf1_plate2" / "masks"
    for site in plate:
        short = f"{site.key.well[0]}{int(site.key.well[1:])}"
        cells = tifffile.imread(next(masks.glob(f"{short}_*_MaskCells.tiff"))) > 0
        nuclei = measure.label(tifffile.imread(next(masks.glob(f"{short}_*_MaskNuclei.tiff"))) > 0)
        yield site, cells, nuclei


def kept_by_both(nuclei: np.ndarray, cells: np.ndarray, mask: np.ndarray) -> dict:
    """Which cells each side keeps, and the agreement on those both keep (module docstring).

    ``nuclei`` and ``cells``: ours with border cells kept (matching ids); ``mask``: MaskCells.
    """
    ids = np.arange(1, int(cells.max()) + 1)
    ours = np.ones(ids.size + 1, bool)
    ours[0] = False
    ours[touching_edge(cells)] = False
    theirs = np.zeros(ids.size + 1, bool)
    theirs[1:] = np.asarray(ndi.mean(mask, nuclei, ids)) > 0.5
    both = ours & theirs
    _, (ii, jj) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    territory = both[nuclei[ii, jj]]
    mine = (cells > 0) & both[cells]
    only_ours, only_theirs = ours & ~theirs, theirs & ~ours
    return {
        "J": float((mine & mask & territory).sum() / ((mine | mask) & territory).sum()),
        "ratio": float(mine[territory].sum() / mask[territory].sum()),
        "both": int(both.sum()),
        "only_ours": (int(only_ours.sum()), float(((cells > 0) & only_ours[cells]).sum())),
        "only_cp": (int(only_theirs.sum()), float((mask & only_theirs[nuclei[ii, jj]]).sum())),
        "cp_area": float(mask.sum()),
    }


def touching_pairs(nuclei: np.ndarray, truth: np.ndarray) -> tuple[int, float, list]:
    """CellProfiler nuclei that hold two or more of ours (over half of each inside, as
    :func:`merge_within` merges them), our nucleus F1 with those merged, and the pieces'
    centres, for the figure."""
    merged = merge_within(nuclei, truth > 0)
    centres = []
    for region in measure.regionprops(truth):
        inside = np.unique(nuclei[(truth == region.label) & (merged != nuclei)])
        if inside[inside > 0].size:
            centres.append(tuple(int(v) for v in region.centroid))
    return len(centres), nucleus_f1(nuclei, truth, merged=True), centres


def bench_nf1(lines: list[str], figures: Path | None = None) -> dict:
    rows: dict[str, list] = {}
    which: dict[str, list] = {}
    pairs: list = []
    timings = []
    nan = float("nan")
    for site, mask_cells, mask_nuclei in nf1_wells():
        image, names = site.read(), site.channel_names
        well = site.key.well
        t = time.perf_counter()
        nuc, cells = segment_site(image, names, settings=LEGACY)
        timings.append(("legacy", time.perf_counter() - t))
        f1 = (nucleus_f1(nuc, mask_nuclei, merged=True), nucleus_f1(nuc, mask_nuclei))
        rows.setdefault("before: legacy, as run", []).append(
            (well, *foreground_scores(cells, mask_cells), *f1)
        )
        rows.setdefault("before: legacy, border cells dropped", []).append(
            (well, *foreground_scores(drop_edge(nuc, cells)[1], mask_cells), *f1)
        )
        for name, settings in (
            ("after: CellProfiler's settings", CELLPROFILER),
            ("after: defaults, --drop-edge-by cell", DEFAULTS),
            ("after: defaults, --drop-edge (by nucleus)", BY_NUCLEUS),
        ):
            t = time.perf_counter()
            _, cells = segment_site(image, names, settings=settings)
            timings.append((name, time.perf_counter() - t))
            whole_nuc, whole = segment_site(
                image, names, settings=settings.replace(drop_edge=False)
            )
            rows.setdefault(name, []).append(
                (
                    well,
                    *foreground_scores(cells, mask_cells),
                    nucleus_f1(whole_nuc, mask_nuclei, merged=True),
                    nucleus_f1(whole_nuc, mask_nuclei),
                )
            )
            if settings is BY_NUCLEUS:
                continue
            if settings is DEFAULTS:
                nuc_default = whole_nuc
            both = kept_by_both(whole_nuc, whole, mask_cells)
            rows.setdefault(name + ", cells both keep", []).append(
                (well, both["J"], both["ratio"], nan, nan)
            )
            which.setdefault(name, []).append((well, both))
        pairs.append((well, *touching_pairs(nuc_default, mask_nuclei)))
    lines.append("## NF1: against CellProfiler's MaskCells / MaskNuclei, per well")
    wells = [r[0] for r in next(iter(rows.values()))]
    head = "row".ljust(46) + "".join(f"{w:>24}" for w in wells)
    lines.append(head)
    lines.append("".ljust(46) + "".join(f"{'J ratio   F1m    F1':>24}" for _ in wells))
    lines.append("-" * len(head))
    for name, values in rows.items():
        cells_txt = "".join(
            f"{j:>6.3f}{r:>6.2f}" + (f"{fm:>6.3f}{f:>6.3f}" if f == f else "            ")
            for _, j, r, fm, f in values
        )
        lines.append(name.ljust(46) + cells_txt)
    for name, settings_rows in rows.items():
        if name.startswith("after") and not name.endswith(("keep", "(by nucleus)")):
            ok = all(
                j >= 0.8 and 0.8 <= r <= 1.25 and fm >= 0.95 for _, j, r, fm, _ in settings_rows
            )
            lines.append(
                f"bars ({name[7:]}): J >= 0.8, ratio 0.8-1.25 in every well, nucleus F1m >= "
                f"0.95: {'met' if ok else 'NOT met'}"
            )
    lines.append(
        "F1m: our nuclei merged within each piece of the binary MaskNuclei (it cannot hold "
        "touching nuclei apart; the bar is judged on F1m); F1: one to one"
    )
    lines.append(
        "by nucleus: cells of interior nuclei that reach the border are kept; MaskCells dropped "
        "them (--drop-edge-by cell), so J and ratio there are no reading of quality"
    )
    lines.append("")
    lines.append("which cells: kept by one side only (cells, share of CellProfiler's cell area)")
    for name, per_well in which.items():
        text = "".join(
            f"{w:>5} {b['only_ours'][0]:>2} ({b['only_ours'][1] / b['cp_area']:.2f})"
            f" / {b['only_cp'][0]:>2} ({b['only_cp'][1] / b['cp_area']:.2f})"
            for w, b in per_well
        )
        lines.append(f"  {name[7:]:<36} ours only / CP only:{text}")
    lines.append(
        "nuclei: CellProfiler objects holding 2 touching nuclei of ours (defaults), and nucleus"
        " F1m (merged within MaskNuclei's pieces):"
    )
    lines.append("  " + "; ".join(f"{w} {n} pair(s), F1 {f1:.3f}" for w, n, f1, _ in pairs))
    if figures is not None:
        lines.append(pairs_figure(figures, pairs))
    for name in dict(timings):
        secs = [t for n, t in timings if n == name]
        lines.append(f"time per site ({name}): {np.mean(secs):.2f} s (904 x 1224 px)")
    lines.append("")
    return rows


def dna_peaks(dna: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Nucleus centres found independently of the segmentation (module docstring)."""
    typical = typical_diameter(nuclei)
    smoothed = smooth(dna, max(1.0, typical / 4))
    return feature.peak_local_max(
        smoothed,
        min_distance=max(2, int(typical / 2)),
        threshold_abs=threshold(dna, "mce"),
        exclude_border=False,
    )


def cell_checks(dna: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> dict:
    peaks = dna_peaks(np.asarray(dna, np.float64), nuclei)
    n = int(cells.max())
    per_cell = np.bincount(cells[peaks[:, 0], peaks[:, 1]], minlength=n + 1)[1:]
    cell_area = np.bincount(cells.ravel(), minlength=n + 1)[1:]
    nucleus_area = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
    present = cell_area > 0
    return {
        "cells": int(present.sum()),
        "multi": int((per_cell[present] > 1).sum()),
        "nucleus_only": int((cell_area[present] < 1.3 * nucleus_area[present]).sum()),
        "fg": float((cells > 0).mean()),
    }


def composite(image: np.ndarray, names, nuclear: str) -> np.ndarray:
    """RGB: the mean of the fluorescent cell stains in green (gamma 0.5), DNA in blue."""

    def unit(x):
        a, b = np.percentile(x, [0.5, 99.7])
        return np.clip((x.astype(np.float64) - a) / max(b - a, 1e-9), 0, 1) ** 0.5

    n = list(names).index(nuclear)
    others = [i for i in range(len(names)) if i != n and names[i].lower() not in ("ch1",)]
    green = np.mean([unit(image[i]) for i in others], axis=0)
    rgb = np.zeros((*image.shape[1:], 3))
    rgb[..., 1] = green
    rgb[..., 0] = 0.5 * green
    rgb[..., 2] = np.maximum(unit(image[n]), 0.3 * green)
    return rgb


def _edges(labels: np.ndarray) -> np.ndarray:
    """Object borders two pixels wide, so that they survive the figure's downscaling."""
    return segmentation.find_boundaries(labels, mode="thick")


def overlay(rgb, nuclei, cells, extra=None):
    out = rgb.copy()
    if extra is not None:
        out[_edges(extra)] = (0.0, 1.0, 1.0)
    out[_edges(cells)] = (1.0, 1.0, 0.0)
    out[_edges(nuclei)] = (1.0, 0.25, 0.25)
    return out


def _shown(path: Path) -> str:
    """A path as the repository names it, when it is inside the repository."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def save_figure(path: Path, panels: list[tuple[str, np.ndarray]], width_in: float = 11.0):
    """Panels side by side, saved as a 128-colour PNG (small enough for a README)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width_in, width_in / len(panels) * h / w + 0.35)
    )
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path.stat().st_size


def bench_unlabelled(lines: list[str], figures: Path | None) -> dict:
    lines.append("## JUMP and Phenix: no masks; checks and figures")
    lines.append(
        f"{'site':44}{'segmenter':>10}{'cells':>7}{'>1 nucleus':>12}{'nucleus-only':>14}"
        f"{'foreground':>12}{'s/site':>8}"
    )
    out = {}
    crops = {"jump_BR00117006": (460, 560, 520), "pediatric_cancer_atlas_BR00143976": (0, 300, 620)}
    for folder, nuclear in (
        ("jump_BR00117006", "ch5"),
        ("pediatric_cancer_atlas_BR00143976", "ch5"),
    ):
        plate = open_plate(REAL / folder)
        site = next(iter(plate))
        image, names = site.read(), site.channel_names
        dna = image[list(names).index(nuclear)]
        results = {}
        for label, settings in (
            ("legacy", SegmentSettings(segmenter="legacy", nuclear=nuclear)),
            ("classical", SegmentSettings(nuclear=nuclear)),
        ):
            t = time.perf_counter()
            nuclei, cells = segment_site(image, names, settings=settings)
            secs = time.perf_counter() - t
            c = cell_checks(dna, nuclei, cells)
            results[label] = (nuclei, cells, c)
            lines.append(
                f"{folder:44}{label:>10}{c['cells']:>7}{c['multi']:>12}{c['nucleus_only']:>14}"
                f"{c['fg']:>12.2f}{secs:>8.2f}"
            )
        out[folder] = {k: v[2] for k, v in results.items()}
        if figures is not None:
            y, x, s = crops[folder]
            rgb = composite(image, names, nuclear)[y : y + s, x : x + s]
            win = (slice(y, y + s), slice(x, x + s))
            panels = [
                (
                    f"before (legacy): {folder.split('_')[0]}",
                    overlay(rgb, *(a[win] for a in results["legacy"][:2])),
                ),
                (
                    "after (classical, defaults)",
                    overlay(rgb, *(a[win] for a in results["classical"][:2])),
                ),
            ]
            name = "segment_jump.png" if folder.startswith("jump") else "segment_phenix.png"
            size = save_figure(figures / name, panels)
            lines.append(
                f"figure: {_shown(figures / name)} ({size // 1024} KB; crop y={y} x={x} {s} px)"
            )
    lines.append(
        "'>1 nucleus': cells holding two or more peaks of the smoothed DNA stain; 'nucleus-only':"
        " cell area < 1.3 x its nucleus; 'foreground': fraction of the site covered by cells"
    )
    lines.append("")
    return out


def _mean_of_stains(image: np.ndarray, channels) -> np.ndarray:
    mean = np.mean([unit_scale(image[c]) for c in channels], axis=0)
    return mean - mean.min() + 1e-3  # positive, for the log


#: Cell foreground rules compared (per image, per stain or on the mean of the stains).
FOREGROUND_RULES = {
    "background + 0.15, each (default)": ("background", False, False),
    "otsu on log, each stain": ("otsu", True, False),
    "mce on log, each stain": ("mce", True, False),
    "otsu, each stain": ("otsu", False, False),
    "mce, each stain": ("mce", False, False),
    "otsu3 (middle as fg), each stain": ("otsu3", False, False),
    "otsu on log, mean of stains": ("otsu", True, True),
    "mce on log, mean of stains": ("mce", True, True),
}


def cells_by_rule(image, names, nuclear: str, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cells (border cells kept, size-dropped objects gone) with one foreground rule;
    nuclei, propagation image and regularisation as in the defaults."""
    method, log, on_mean = FOREGROUND_RULES[rule]
    n = list(names).index(nuclear)
    nuclei = find_nuclei_with(image[n], SegmentSettings(nuclear=nuclear))
    channels = cell_channels(image, names, n, None)
    if on_mean:
        mask = foreground(_mean_of_stains(image, channels), method, log=log, factor=1, sigma=1)
    else:
        mask = np.zeros(image.shape[1:], bool)
        for c in channels:
            mask |= foreground(image[c], method, log=log, factor=1, sigma=1)
    surface = propagation_surface(image, channels, nuclei, mask)
    cells = fill_label_holes(propagate(surface, nuclei.labels, mask, 0.05))
    keep = ~nuclei.dropped
    keep[0] = False
    lookup = np.zeros(keep.size, np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1)
    return lookup[nuclei.labels], lookup[cells]


def bench_rules(lines: list[str]) -> None:
    """The cell foreground rules on all three plates (module docs)."""
    nf1 = [(s.key.well, s.read(), s.channel_names, m) for s, m, _ in nf1_wells()]
    others = []
    for folder in ("jump_BR00117006", "pediatric_cancer_atlas_BR00143976"):
        site = next(iter(open_plate(REAL / folder)))
        others.append((folder.split("_")[0], site.read(), site.channel_names))
    lines.append(
        "## Cell foreground rules on all three plates (nuclei and propagation as defaults; every "
        "rule under the noise floor, stains not judged)"
    )
    head = (
        f"{'rule':36}"
        + "".join(f"{w:>12}" for w, *_ in nf1)
        + "".join(f"{name:>30}" for name, *_ in others)
    )
    lines.append(head)
    lines.append(
        f"{'':36}"
        + "".join(f"{'J ratio':>12}" for _ in nf1)
        + "".join(f"{'cells >1nuc n-only fg c/n':>30}" for _ in others)
    )
    lines.append("-" * len(head))
    for rule in FOREGROUND_RULES:
        text = f"{rule:36}"
        for _, image, names, mask in nf1:
            both = kept_by_both(*cells_by_rule(image, names, "DAPI", rule), mask)
            text += f"{both['J']:>7.3f}{both['ratio']:>5.2f}"
        for _, image, names in others:
            nuclei, cells = cells_by_rule(image, names, "ch5", rule)
            c = cell_checks(image[list(names).index("ch5")], nuclei, cells)
            ratio = np.bincount(cells.ravel())[1:] / np.maximum(
                np.bincount(nuclei.ravel(), minlength=int(cells.max()) + 1)[1:], 1
            )
            text += (
                f"{c['cells']:>8}{c['multi']:>6}{c['nucleus_only']:>7}{c['fg']:>5.2f}"
                f"{np.median(ratio[ratio > 0]):>4.1f}"
            )
        lines.append(text)
    lines.append(
        "NF1: J and ratio on the cells both keep (J < 0.8 or ratio > 1.25 fails the bar); JUMP,"
        " Phenix: cells, cells holding >1 nucleus, nucleus-only cells (area < 1.3 x nucleus),"
        " share of the site in cells, median cell / nucleus area"
    )
    lines.append("")


def pairs_figure(figures: Path, pairs: list) -> str:
    """DAPI around each CellProfiler nucleus that holds two of ours: theirs cyan, ours red."""
    panels = []
    sites = {site.key.well: (site, nuclei) for site, _, nuclei in nf1_wells()}
    for well, _, _, centres in pairs:
        site, truth = sites[well]
        dapi = site.read()[list(site.channel_names).index("DAPI")].astype(np.float64)
        nuclei = segment_site(site.read(), site.channel_names, settings=DEFAULTS)[0]
        a, b = np.percentile(dapi, [0.5, 99.9])
        grey = np.clip((dapi - a) / max(b - a, 1e-9), 0, 1)
        for y, x in centres:
            y0 = int(np.clip(y - 60, 0, dapi.shape[0] - 120))
            x0 = int(np.clip(x - 60, 0, dapi.shape[1] - 120))
            win = (slice(y0, y0 + 120), slice(x0, x0 + 120))
            rgb = np.repeat(grey[win][..., None], 3, axis=-1)
            theirs = _edges(truth[win] > 0)
            rgb[_edges(nuclei[win]) & ~theirs] = (1.0, 0.25, 0.25)
            rgb[theirs] = (0.0, 1.0, 1.0)
            panels.append((f"{well}: CellProfiler 1, ours 2", rgb))
    path = figures / "segment_nf1_pairs.png"
    size = save_figure(path, panels, width_in=12.0)
    return f"figure: {_shown(path)} ({size // 1024} KB; 120 px around each such object)"


def nf1_figure(figures: Path, lines: list[str]) -> None:
    site, mask_cells, _ = next(w for w in nf1_wells() if w[0].key.well == "F07")
    image, names = site.read(), site.channel_names
    y, x, s = 280, 380, 560
    win = (slice(y, y + s), slice(x, x + s))
    rgb = composite(image, names, "DAPI")[win]
    panels = []
    for title, settings in (
        ("legacy (yellow) vs CellProfiler (cyan)", LEGACY),
        ("CellProfiler's settings (yellow) vs CellProfiler (cyan)", CELLPROFILER),
        ("defaults (yellow) vs CellProfiler (cyan)", DEFAULTS),
    ):
        nuclei, cells = segment_site(image, names, settings=settings)
        if settings.segmenter == "legacy":
            nuclei, cells = drop_edge(nuclei, cells)
        panels.append((title, overlay(rgb, nuclei[win], cells[win], extra=mask_cells[win])))
    size = save_figure(figures / "segment_nf1.png", panels, width_in=13.0)
    lines.append(
        f"figure: {_shown(figures / 'segment_nf1.png')} ({size // 1024} KB; NF1 well F07, crop y={y} "
        f"x={x} {s} px; border cells dropped in all three)"
    )
    lines.append("")


def bench_synthetic(lines: list[str]) -> None:
    from napari_concept_discovery.synth import generate_site
    from napari_concept_discovery.synth.site import SEGMENTATION_SITES as sites

    lines.append("## Synthetic sites (256 px, 7 sites): F1 at IoU 0.5 against truth")
    for label, settings in (
        ("legacy", SegmentSettings(segmenter="legacy")),
        ("classical", SegmentSettings()),
    ):
        totals = np.zeros((2, 3), int)
        for cell_type, pert, plate in sites:
            site = generate_site(cell_type, pert, size=256, seed=0, plate=plate, well="C03")
            nuclei, cells = segment_site(site.image, site.channel_names, settings=settings)
            totals[0] += match_counts(cells, site.cells)
            totals[1] += match_counts(nuclei, site.nuclei)
        f1 = 2 * totals[:, 0] / (totals[:, 1] + totals[:, 2])
        lines.append(f"{label:>10}: cells {f1[0]:.3f}, nuclei {f1[1]:.3f} ({totals[0, 2]} cells)")
    lines.append("")


#: Cell foreground rules compared on the zoo and the real sites (settings beside the defaults).
ZOO_RULES = {
    "default": {},
    "mean of stains": {"propagation": "mean"},
    "fraction 0.1": {"cell_fraction": 0.1},
    "fraction 0.2": {"cell_fraction": 0.2},
    "otsu log + floor": {"cell_threshold": "otsu"},
    "before": {
        "cell_threshold": "otsu",
        "noise_floor": 0.0,
        "judge_stains": False,
        "propagation": "mean",
    },
}


def assignment(cells: np.ndarray, truth: np.ndarray) -> float:
    """Share of the pixels in both foregrounds that go to the right cell: each of our cells
    stands for the true cell holding most of it. Foreground J and F1 at IoU 0.5 barely see
    where two touching cells are divided; this does."""
    n = int(cells.max())
    owner = np.zeros(n + 1, np.int64)
    both = (cells > 0) & (truth > 0)
    pairs = np.bincount(cells[both] * (int(truth.max()) + 1) + truth[both])
    if pairs.size:
        table = np.zeros((n + 1) * (int(truth.max()) + 1), np.int64)
        table[: pairs.size] = pairs
        owner = table.reshape(n + 1, -1).argmax(axis=1)
    return float((owner[cells[both]] == truth[both]).mean()) if both.any() else float("nan")


def zoo_scores(name: str, settings: SegmentSettings, seeds: int) -> tuple[float, ...]:
    """Median over ``seeds`` sites of a zoo variant: cell foreground Jaccard, area ratio (ours /
    true), cell F1 at IoU 0.5 and the share of pixels given to the right cell
    (:func:`assignment`)."""
    from napari_concept_discovery.synth.zoo import generate_zoo_site

    scores = []
    for seed in range(seeds):
        site = generate_zoo_site(name, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, cells = segment_site(site.image, site.channel_names, settings=settings)
        fg, truth = cells > 0, site.cells > 0
        tp, n_pred, n_true = match_counts(cells, site.cells)
        scores.append(
            (
                (fg & truth).sum() / (fg | truth).sum(),
                fg.sum() / truth.sum(),
                2 * tp / (n_pred + n_true),
                assignment(cells, site.cells),
            )
        )
    return tuple(float(v) for v in np.median(np.array(scores), axis=0))


def bench_zoo(lines: list[str], seeds: int, real: bool = True, rules=None) -> None:
    """The zoo (``synth.zoo``: one thing varied at a time) and the real sites, one table, each
    rule of :data:`ZOO_RULES` (or the names in ``rules``) a column group (module docs)."""
    from napari_concept_discovery.synth.zoo import ZOO

    unknown = set(rules or ()) - set(ZOO_RULES)
    if unknown:
        raise SystemExit(f"unknown zoo rule(s) {sorted(unknown)}; choose from {list(ZOO_RULES)}")
    chosen = {k: v for k, v in ZOO_RULES.items() if rules is None or k in rules}

    lines.append(
        f"## Segmentation zoo ({seeds} sites of 512 px per variant, medians) and the real sites"
    )
    lines.append(
        "rules: " + "; ".join(f"{k}: {v or 'SegmentSettings()'}" for k, v in chosen.items())
    )
    head = f"{'variant':36}" + "".join(f"{name:>26}" for name in chosen)
    lines.append(head)
    lines.append(f"{'':36}" + "".join(f"{'J ratio  F1  assign':>26}" for _ in chosen))
    lines.append("-" * len(head))
    failing: dict[str, list[str]] = {name: [] for name in chosen}
    for variant in ZOO:
        text = f"{variant:36}"
        for rule, changes in chosen.items():
            j, ratio, f1, right = zoo_scores(variant, SegmentSettings(**changes), seeds)
            text += f"{j:>10.3f}{ratio:>5.2f}{f1:>5.2f}{right:>6.3f}"
            if not (j >= 0.85 and 0.85 <= ratio <= 1.2 and f1 >= 0.85):
                failing[rule].append(variant)
        lines.append(text)
        print(text, flush=True)
    if real:
        nf1 = list(nf1_wells())
        for site, mask_cells, mask_nuclei in nf1:
            text = f"{'NF1 ' + site.key.well + ' (J ratio F1m)':36}"
            for rule, changes in chosen.items():
                settings = DEFAULTS.replace(**changes)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, cells = segment_site(site.read(), site.channel_names, settings=settings)
                    whole_nuc, _ = segment_site(
                        site.read(), site.channel_names, settings=settings.replace(drop_edge=False)
                    )
                j, ratio = foreground_scores(cells, mask_cells)
                f1 = nucleus_f1(whole_nuc, mask_nuclei, merged=True)
                text += f"{j:>10.3f}{ratio:>5.2f}{f1:>5.2f}{'':6}"
                if j < 0.8:
                    failing[rule].append(f"NF1 {site.key.well}")
            lines.append(text)
            print(text, flush=True)
        for folder in ("jump_BR00117006", "pediatric_cancer_atlas_BR00143976"):
            site = next(iter(open_plate(REAL / folder)))
            image, names = site.read(), site.channel_names
            dna = image[list(names).index("ch5")]
            text = f"{folder.split('_')[0] + ' (cells >1nuc n-only)':36}"
            for rule, changes in chosen.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    nuclei, cells = segment_site(
                        image, names, settings=SegmentSettings(nuclear="ch5", **changes)
                    )
                c = cell_checks(dna, nuclei, cells)
                text += f"{c['cells']:>10}{c['multi']:>5}{c['nucleus_only']:>5}{'':6}"
                if c["multi"] or c["nucleus_only"]:
                    failing[rule].append(folder.split("_")[0])
            lines.append(text)
            print(text, flush=True)
    lines.append(
        "zoo: J = cell foreground Jaccard, ratio = our cell area / true, F1 = cells matched at "
        "IoU 0.5, assign = share of the pixels in both foregrounds given to the right cell "
        "(where touching cells are divided; not a bar). NF1: J and ratio against MaskCells with the pipeline's border rule "
        "(--drop-edge --drop-edge-by cell), F1m = nucleus F1 merged within MaskNuclei. JUMP, "
        "Phenix: cells, cells holding >1 nucleus, nucleus-only cells"
    )
    for rule, failed in failing.items():
        lines.append(
            f"bars ({rule}): zoo J >= 0.85, ratio 0.85-1.2, F1 >= 0.85 in every variant"
            + (
                "; NF1 J >= 0.8 in every well; JUMP, Phenix 0 >1-nucleus and 0 nucleus-only"
                if real
                else ""
            )
            + (": met" if not failed else f": NOT met ({', '.join(failed)})")
        )
    lines.append("")


def bench_qc(lines: list[str], seeds: int) -> None:
    """Quality control (``segment_qc``) on the zoo and the real sites: which sites it flags with
    the defaults and with the previous default, beside how far the cells are from the truth."""
    from napari_concept_discovery.segment.qc import site_qc
    from napari_concept_discovery.synth.zoo import ZOO, generate_zoo_site

    before = SegmentSettings(**ZOO_RULES["before"])
    lines.append(f"## Quality control: sites flagged ({seeds} zoo sites per variant)")
    lines.append(
        f"{'variant':36}{'defaults: area  flagged':>26}{'before: area  flagged':>26}  reason (before)"
    )
    caught = missed = false = 0
    for variant in ZOO:
        text = f"{variant:36}"
        reasons = []
        for settings in (SegmentSettings(), before):
            flagged, ratios = 0, []
            for seed in range(seeds):
                site = generate_zoo_site(variant, seed=seed)
                with warnings.catch_warnings(record=True) as got:
                    warnings.simplefilter("always")
                    nuclei, cells = segment_site(site.image, site.channel_names, settings=settings)
                left = [str(w.message) for w in got if "left out" in str(w.message)]
                stains = quality_channels(settings, site.channel_names)(site.image)
                q = site_qc(nuclei, cells, left, image=site.image, channels=stains)
                ratio = (cells > 0).sum() / (site.cells > 0).sum()
                ratios.append(ratio)
                flagged += q["flag"]
                if settings is before and q["flag"]:
                    reasons.append(q["reason"])
                wrong = ratio > 1.5
                if wrong and q["flag"]:
                    caught += 1
                elif wrong:
                    missed += 1
                elif q["flag"]:
                    false += 1
            text += f"{np.median(ratios):>17.2f}{flagged:>3}/{seeds:<3}  "
        lines.append(text + (reasons[0][:70] if reasons else ""))
        print(lines[-1], flush=True)
    for folder, nuclear in (
        ("nf1_plate2/images", "DAPI"),
        ("jump_BR00117006", "ch5"),
        ("pediatric_cancer_atlas_BR00143976", "ch5"),
    ):
        if folder.startswith("nf1"):
            plate = open_plate(REAL / folder, layout="pattern", pattern=NF1_PATTERN)
        else:
            plate = open_plate(REAL / folder)
        for site in plate:
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                nuclei, cells = segment_site(
                    site.read(), site.channel_names, settings=SegmentSettings(nuclear=nuclear)
                )
            left = [str(w.message) for w in got if "left out" in str(w.message)]
            image = site.read()
            stains = quality_channels(SegmentSettings(nuclear=nuclear), site.channel_names)(image)
            q = site_qc(nuclei, cells, left, image=image, channels=stains)
            lines.append(
                f"{folder.split('_')[0].split('/')[0] + ' ' + site.key.well:36}"
                f" fg {q['foreground']:.2f}, {q['cells']} cells, {q['nuclei']} nuclei, "
                f"cell/nucleus {q['cell_nucleus_ratio']:.1f}x, enclosed {q['enclosed']:.2f}, "
                f"background {q['background_share']:.2f}: "
                + ("FLAGGED " + q["reason"] if q["flag"] else "not flagged")
            )
            print(lines[-1], flush=True)
    lines.append(
        f"zoo sites whose cells are over 1.5x the true area: {caught} flagged, {missed} not; "
        f"sites flagged while within 1.5x: {false} (a stain left out is a reason to flag: the "
        "empty Mito and missing ER stains are reported so)"
    )
    lines.append("")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_segment.txt"))
    parser.add_argument("--figures", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--zoo-sites", type=int, default=4, help="sites per zoo variant")
    parser.add_argument(
        "--rules",
        default=None,
        help="comma-separated zoo rule columns (default: all of ZOO_RULES)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections: zoo, qc, nf1, unlabelled, rules, synthetic",
    )
    args = parser.parse_args(argv)
    if not REAL.is_dir():
        raise SystemExit(f"real images not found at {REAL}")
    figures = None if args.no_figures else Path(args.figures)
    lines = [
        f"machine: {platform.machine()}, {platform.python_version()}",
        "",
    ]
    only = set(args.only.split(",")) if args.only else None

    def run(section: str) -> bool:
        return only is None or section in only

    if run("zoo"):
        bench_zoo(lines, args.zoo_sites, rules=args.rules.split(",") if args.rules else None)
    if run("qc"):
        bench_qc(lines, min(args.zoo_sites, 2))
    if run("nf1"):
        bench_nf1(lines, figures)
        if figures is not None:
            nf1_figure(figures, lines)
    if run("unlabelled"):
        bench_unlabelled(lines, figures)
    if run("rules"):
        bench_rules(lines)
    if run("synthetic"):
        bench_synthetic(lines)
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
