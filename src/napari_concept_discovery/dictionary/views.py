"""Views of the tokens a dictionary is trained on: whitened on the controls, or only centred.

Whitening on control wells maps the controls' own variation to unit variance, so what varies
among controls (cell type, cell cycle, mitosis) is scaled away by design, while perturbations,
which controls lack, stand out (docs/architecture.md, "Concepts come at several scales").
Centring on the controls keeps that variation. A dictionary may keep both: one part trained
on each view of the same tokens, each with its own whitening, encoded part by part into one
code matrix whose features carry the name of the view that found them (:mod:`.combined`).

This module is torch-free, so the settings, the analysis and the views can read view names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DictionaryError

#: A view's name and the whitening mode (``WhitenSettings.mode``) that gives it.
VIEW_MODES = {"whitened": "pca", "centred": "center"}
#: A view's name by whitening mode.
MODE_VIEWS = {mode: view for view, mode in VIEW_MODES.items()}
#: Both views, in the order their features are numbered.
ALL_VIEWS = tuple(VIEW_MODES)
#: What ``TrainSettings.views`` may say: both (the default), or one of them.
VIEW_CHOICES = (",".join(ALL_VIEWS), *ALL_VIEWS)


def parse_views(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The view names of a ``views`` setting (comma-separated), in :data:`ALL_VIEWS` order.

    ``centered`` is read as ``centred``; an unknown name is refused, naming the known ones.
    """
    items = text.split(",") if isinstance(text, str) else list(text or ())
    names = {str(t).strip().lower().replace("centered", "centred") for t in items}
    names.discard("")
    unknown = sorted(names - set(ALL_VIEWS))
    if unknown or not names:
        raise DictionaryError(
            f"views: {', '.join(unknown) or 'none given'}; give one or both of "
            f"{','.join(ALL_VIEWS)} (comma-separated)"
        )
    return tuple(v for v in ALL_VIEWS if v in names)


def view_of_mode(mode: str | None) -> str:
    """The view a whitening mode gives: ``whitened`` (pca), ``centred`` (center)."""
    return MODE_VIEWS.get(str(mode), str(mode))


def feature_views(names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """(M,) the view of every feature of parts ``names`` of ``sizes`` atoms, in order."""
    if len(names) != len(sizes):
        raise DictionaryError(f"{len(names)} view names for {len(sizes)} parts")
    return np.repeat(np.asarray(list(names), dtype=object), [int(s) for s in sizes])
