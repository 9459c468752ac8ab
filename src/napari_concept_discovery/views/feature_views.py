"""What the concept explorer shows, Qt-free: the feature table, a cell's features, the gallery.

The widget only lays these out. The numbers come from an
:class:`~napari_concept_discovery.analysis.explore.Explorer`; this module picks the label columns,
names and explains the table's columns, joins a cell's features with their top labels,
draws the top cells' thumbnails and frames a cell for the camera (docs/architecture.md,
"The viewer").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..analysis.families import FAMILY_DISTANCE
from ..analysis.measurements import NO_DESCRIPTION
from ..dictionary.views import describe_views
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report
from .channels import contrast_limits
from .forms import metadata_choices
from .platemap import KEY_COLUMNS, PREFERRED_COLUMNS
from .thumbnails import RGB, cell_thumbnail

MAX_LABEL_VALUES = 50  # a column with more values (one per well) is not a label to select by

# The feature table as shown: source column -> (header, tooltip). Other numeric columns the
# table may carry (stain attribution) are shown after these under their own names.
FEATURE_COLUMNS: dict[str, tuple[str, str]] = {
    "feature": ("Feature", "The feature's number in the dictionary."),
    "name": ("Name", "The name you gave the feature (saved beside the dictionary)."),
    "view": (
        "View",
        f"Which part of the dictionary found the feature: {describe_views()}.",
    ),
    "level": (
        "Level",
        "Nested dictionary: the smallest prefix of atoms that holds the feature (its first "
        "atoms were trained to reconstruct the cells alone, so a low level is a broad concept).",
    ),
    "family": (
        "Family",
        "Features whose atoms point the same way or that fire on the same cells (average-"
        f"linkage clustering on 1 - max(cosine, co-activation), cut at {FAMILY_DISTANCE}); blank: "
        "in no family. "
        "A concept split over several features shows as one family.",
    ),
    "frequency": ("Frequency", "Fraction of the store's cells where the feature is active."),
    "mean_activation": ("Mean activation", "Mean code over the cells where it is active."),
    "top": (
        "Top label",
        "The metadata label (column=value) the feature is most selective for.",
    ),
    "selectivity_avg": (
        "Selectivity",
        "P(active | top label) minus the mean P(active | other labels of that column); "
        "1 = fires only there.",
    ),
    "selectivity_max": (
        "Selectivity (max)",
        "P(active | top label) minus the largest P(active | another label).",
    ),
    "n_active": ("Cells", "Number of cells where the feature is active."),
    "description": (
        "Description",
        "The CellProfiler measurements whose per-cell values follow the feature's activation "
        "most closely (Spearman over cells, with its sign).",
    ),
}
HIDDEN = {"top_column", "top_label", "top_tokens"}


def _identifier(column: str) -> bool:
    low = column.lower()
    return low == "id" or low.endswith("_id")


def selectivity_columns(table: pd.DataFrame, max_values: int = MAX_LABEL_VALUES) -> list[str]:
    """Metadata columns of a cell table worth selectivity: 2..max_values labels, best first.

    Site keys and identifiers (``site_id``, ``well_id``) are left out: a feature "selective"
    for one site says where a cell was imaged, not what it is.
    """
    choices = metadata_choices(table, max_values)
    useful = [
        c for c, v in choices.items() if c not in KEY_COLUMNS and not _identifier(c) and len(v) >= 2
    ]
    lower = {c.lower(): c for c in useful}
    first = [lower[p] for p in PREFERRED_COLUMNS if p in lower]
    return first + [c for c in useful if c not in first]


def feature_overview(
    explorer, *, progress: ProgressCallback = None, cancel: Cancel = None
) -> pd.DataFrame:
    """The explorer's feature table with selectivity for the store's label columns.

    Encodes every cell of the store once (with progress and cancel), then summarises.
    """
    explorer.cell_codes(progress=progress, cancel=cancel)
    columns = selectivity_columns(explorer.store.table("cell"))
    return display_table(explorer.feature_table(columns=columns))


def display_table(features: pd.DataFrame) -> pd.DataFrame:
    """Columns in the order shown, ``top`` as ``column=value`` (empty where nothing fires)."""
    out = features.copy()
    if "top_column" in out.columns:
        has = out["top_column"].astype(str) != ""
        if "n_active" in out.columns:
            has &= out["n_active"] > 0
        out["top"] = np.where(
            has, out["top_column"].astype(str) + "=" + out["top_label"].astype(str), ""
        )
    known = [c for c in FEATURE_COLUMNS if c in out.columns]
    extra = [
        c
        for c in out.columns
        if c not in FEATURE_COLUMNS and c not in HIDDEN and pd.api.types.is_numeric_dtype(out[c])
    ]
    return out[known + extra].reset_index(drop=True)


def with_names(
    table: pd.DataFrame, notes, descriptions: pd.DataFrame | None = None
) -> pd.DataFrame:
    """A :func:`display_table` with a ``name`` column after ``feature`` (from
    ``feature_notes.FeatureNotes``; empty where unnamed, and for ``notes`` None) and, given
    ``descriptions`` (``measurements.describe_features``), a ``description`` column after the
    name: what a person reads first when scanning the features (:data:`NO_DESCRIPTION` where
    no measurement follows a feature, rather than a blank that reads as "not measured yet")."""
    out = table.drop(columns=["name", "description"], errors="ignore").copy()
    names = {} if notes is None else notes.names
    out.insert(1, "name", [names.get(int(f), "") for f in out["feature"]])
    if descriptions is not None:
        text = descriptions.set_index("feature")["description"]
        text = out["feature"].map(text).fillna("").replace("", NO_DESCRIPTION)
        out.insert(2, "description", text.to_numpy())
    return out


def headers(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(header, tooltip) per column of a :func:`display_table`."""
    return [
        FEATURE_COLUMNS.get(c, (c.replace("_", " ").capitalize(), f"{c} (from the feature table)"))
        for c in table.columns
    ]


def cell_features(explorer, key, label: int, features: pd.DataFrame | None, n: int = 10):
    """A cell's strongest features with each feature's top label (when the table is known)."""
    top = explorer.cell_features(key, label, n=n)
    if features is not None and "top" in features.columns:
        labels = features.set_index("feature")["top"]
        top["top"] = top["feature"].map(labels).fillna("")
    else:
        top["top"] = ""
    return top


@dataclass(frozen=True)
class Thumbnail:
    """One gallery entry: the cell (plate, well, site, label, value, box) and its picture."""

    plate: str
    well: str
    site: int
    label: int
    value: float
    box: tuple[int, int, int, int]
    rgb: np.ndarray  # (size, size, 3) uint8

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.plate, self.well, self.site)


def top_cell_thumbnails(
    explorer,
    plate,
    feature: int,
    colours: Mapping[str, RGB],
    *,
    n: int = 24,
    size: int = 80,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> list[Thumbnail]:
    """Thumbnails of the ``n`` cells where ``feature`` is strongest across the store.

    ``colours`` maps the channels to show (by name) to their colours, as the viewer shows them;
    each site is read once and drawn with the viewer's display range
    (:func:`~napari_concept_discovery.views.channels.contrast_limits`). Cells without a box (a site
    embedded without labels) are left out.
    """
    top = explorer.top_cells(feature, n=n)
    return cell_thumbnails(
        explorer, plate, top, colours, size=size, progress=progress, cancel=cancel
    )


def cell_thumbnails(
    explorer,
    plate,
    cells: pd.DataFrame,
    colours: Mapping[str, RGB],
    *,
    value: str = "value",
    size: int = 80,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> list[Thumbnail]:
    """Thumbnails of ``cells`` (plate, well, site, label and the ``value`` column shown under
    each; boxes y0, x0, y1, x1 are found when missing), in the order given."""
    top = cells.reset_index(drop=True).copy()
    if "y0" not in top.columns:
        top[["y0", "x0", "y1", "x1"]] = explorer.cell_boxes(top)
    top["value"] = top[value].to_numpy(np.float64)
    top = top[top["y0"] >= 0]
    names = list(plate.channel_names)
    shown = [i for i, name in enumerate(names) if name in colours] or list(range(len(names)))
    tints = [tuple(colours.get(names[i], (1.0, 1.0, 1.0))) for i in shown]
    out: list[Thumbnail] = []
    groups = list(top.groupby(["plate", "well", "site"], sort=False))
    for i, ((p, w, s), rows) in enumerate(groups):
        if is_cancelled(cancel):
            raise Cancelled(f"thumbnails cancelled after {i} of {len(groups)} sites")
        image = plate[(p, w, int(s))].read()[shown]
        labels = explorer.labels((p, w, int(s)))
        limits = [contrast_limits(plane) for plane in image]
        for r in rows.itertuples(index=False):
            box = (int(r.y0), int(r.x0), int(r.y1), int(r.x1))
            rgb = cell_thumbnail(image, labels, int(r.label), box, tints, limits, size=size)
            out.append(Thumbnail(str(p), str(w), int(s), int(r.label), float(r.value), box, rgb))
        report(progress, "thumbnails", i + 1, len(groups))
    order = {(t.plate, t.well, t.site, t.label): j for j, t in enumerate(out)}
    ranked = top[["plate", "well", "site", "label"]].itertuples(index=False, name=None)
    return [out[order[(str(p), str(w), int(s), int(lab))]] for p, w, s, lab in ranked]


def camera_for_cell(
    box: Sequence[float], canvas: Sequence[int], fraction: float = 0.25, min_side: float = 32.0
) -> tuple[tuple[float, float], float]:
    """(centre (y, x), zoom) that put a cell's box in the middle at ``fraction`` of the canvas."""
    y0, x0, y1, x1 = (float(v) for v in box)
    side = max(y1 - y0, x1 - x0, min_side)
    zoom = fraction * min(float(canvas[0]), float(canvas[1])) / side
    return ((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2), zoom
