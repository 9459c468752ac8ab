"""Views of the tokens a dictionary is trained on: whitened on the controls, whitened within
cell types, or only centred.

Whitening on control wells maps the controls' own variation to unit variance, so what varies
among controls (cell type, cell cycle, mitosis) is scaled away by design, while perturbations,
which controls lack, stand out (docs/architecture.md, "Concepts come at several scales").
Whitening with the controls' covariance taken within each cell type (``within-type``) keeps
what differs between cell types and still scales the within-type variation away; centring on
the controls keeps all of it. A dictionary may keep several: one part trained on each view of
the same tokens, each with its own whitening, encoded part by part into one code matrix whose
features carry the name of the view that found them (:mod:`.combined`).

This module is torch-free, so the settings, the analysis and the views can read view names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DictionaryError

#: A view's name and the whitening mode (``WhitenSettings.mode``) that gives it; the
#: ``within-type`` view also estimates the covariance within the cell-type column
#: (``WhitenSettings.within = "auto"``), and is dropped where that is the pooled whitening.
VIEW_MODES = {"whitened": "pca", "within-type": "pca", "centred": "center"}
#: A view's name by whitening mode.
MODE_VIEWS = {"pca": "whitened", "center": "centred"}
#: Every view, in the order their features are numbered.
ALL_VIEWS = tuple(VIEW_MODES)
#: What each view keeps, in words for the explorer, the report and the demo.
VIEW_WORDS = {
    "whitened": "whitened on the control wells, where what controls vary in is scaled away "
    "and perturbations stand out",
    "within-type": "whitened on the same controls with their covariance taken within each "
    "cell type, which keeps what differs between cell types",
    "centred": "only centred on the controls, which keeps what controls vary in: cell type, "
    "cell cycle",
}
_ALIASES = {"centered": "centred", "within": "within-type", "within_type": "within-type"}


def parse_views(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The view names of a ``views`` setting (comma-separated), in :data:`ALL_VIEWS` order.

    ``centered`` is read as ``centred``, ``within`` as ``within-type``; an unknown name is
    refused, naming the known ones.
    """
    items = text.split(",") if isinstance(text, str) else list(text or ())
    names = {str(t).strip().lower() for t in items}
    names = {_ALIASES.get(n, n) for n in names}
    names.discard("")
    unknown = sorted(names - set(ALL_VIEWS))
    if unknown or not names:
        raise DictionaryError(
            f"views: {', '.join(unknown) or 'none given'}; give one or more of "
            f"{','.join(ALL_VIEWS)} (comma-separated)"
        )
    return tuple(v for v in ALL_VIEWS if v in names)


def describe_views(names: Sequence[str] = ALL_VIEWS, markup=str, last: str = "or") -> str:
    """``whitened (...), within-type (...) or centred (...)`` for the views ``names``, each
    name passed through ``markup`` (e.g. HTML italics), the last joined by ``last``."""
    said = [f"{markup(n)} ({VIEW_WORDS.get(n, 'a view of the tokens')})" for n in names]
    return said[0] if len(said) == 1 else f"{', '.join(said[:-1])} {last} {said[-1]}"


def view_of_mode(mode: str | None) -> str:
    """The view a whitening mode gives: ``whitened`` (pca), ``centred`` (center)."""
    return MODE_VIEWS.get(str(mode), str(mode))


def feature_views(names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """(M,) the view of every feature of parts ``names`` of ``sizes`` atoms, in order."""
    if len(names) != len(sizes):
        raise DictionaryError(f"{len(names)} view names for {len(sizes)} parts")
    return np.repeat(np.asarray(list(names), dtype=object), [int(s) for s in sizes])
