"""The stain-mapping form: which image layer (or channel of one) is which stain, and which
labels layer holds the cells; layers from any reader. The guesses and the site are made in
:mod:`..views.layer_site`; the pickers are magicgui combo boxes that list the viewer's layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image, Labels
from qtpy.QtWidgets import QFormLayout, QLabel, QWidget

from ..errors import ConceptDiscoveryError
from ..views.layer_site import Plane, group_metadata, guess_mapping, planes_of

_NONE = "(choose a layer)"
_NONE_GROUP = "(choose a group)"
SEGMENT = "Segment the stains"


def layer_pixels(layer):
    """A layer's full-resolution array (the first level of a multiscale layer, as
    napari-ome-zarr opens plates)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def layer_geometry(layer) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of a layer's last two axes: where its pixels lie in the world."""
    scale = tuple(float(v) for v in layer.scale[-2:])
    translate = tuple(float(v) for v in layer.translate[-2:])
    return scale, translate  # type: ignore[return-value]


def _is_ours(layer) -> bool:
    """A layer this plugin made (a plate's channel, a painted feature): not a user's input."""
    return bool(layer.metadata.get("role"))


class LayerSiteForm(QWidget):
    """One row per stain the model expects (layer picker) and a cells picker.

    ``stains`` are the rows; :meth:`set_stains` changes them (to a dictionary's or a store's
    channel names). Picks are kept across layer changes where the layer is still there; a
    stain whose names do not say is left on "(choose a layer)".
    """

    def __init__(self, viewer, stains: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.stains: tuple[str, ...] = ()
        self.pickers: dict[str, ComboBox] = {}
        self.group_columns: tuple[str, ...] = ()
        self.groups: list[str] = []
        self._layout = QFormLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self.set_stains(stains)
        events = viewer.layers.events
        for event in (events.inserted, events.removed):
            event.connect(self.refresh)

    # --- choices --------------------------------------------------------------------------

    def _image_layers(self) -> list[Image]:
        return [x for x in self.viewer.layers if isinstance(x, Image) and not _is_ours(x)]

    def planes(self) -> list[Plane]:
        """Every 2-D plane the viewer's image layers offer (channels of stacks one by one)."""
        out: list[Plane] = []
        for layer in self._image_layers():
            out.extend(planes_of(layer.name, np.shape(layer_pixels(layer)), bool(layer.rgb)))
        return out

    def _plane_choices(self, *_) -> list[tuple[str, Plane | None]]:
        return [(_NONE, None)] + [(str(p), p) for p in self.planes()]

    def _cell_choices(self, *_) -> list[tuple[str, str | None]]:
        names = [
            x.name
            for x in self.viewer.layers
            if isinstance(x, Labels) and x.metadata.get("role") in (None, "cells")
        ]
        return [(f"Layer: {n}", n) for n in names] + [(SEGMENT, None)]

    # --- what a user does -----------------------------------------------------------------

    def set_groups(self, columns: Sequence[str], groups: Sequence[str]) -> None:
        """Offer the dictionary's whitening groups (none: the row is hidden): a dictionary that
        whitens each plate on its own controls needs to know which the layers belong to."""
        self.group_columns, self.groups = tuple(columns), [str(g) for g in groups]
        held = self.group.value
        self.group.choices = [(_NONE_GROUP, None)] + [(g, g) for g in self.groups]
        self.group.value = held if held in self.groups else None
        self.group.visible = bool(self.groups)
        self._group_label.setVisible(bool(self.groups))
        self._group_label.setText(f"Whitening group ({', '.join(self.group_columns)})")
        self._update_hint()

    def metadata(self) -> dict[str, str] | None:
        """The site's metadata from the chosen whitening group (None without groups); a
        dictionary with groups and none chosen is refused, naming the columns."""
        if not self.groups:
            return None
        if self.group.value is None:
            raise ConceptDiscoveryError(
                f"the dictionary whitens each {', '.join(self.group_columns)} on its own control "
                "wells: choose the whitening group these layers belong to"
            )
        return group_metadata(self.group_columns, self.group.value)

    def set_stains(self, stains: Sequence[str]) -> None:
        """Rows for these stains (in the model's channel order), guessed again from names."""
        stains = tuple(stains)
        if stains == self.stains:
            return
        while self._layout.rowCount():
            self._layout.removeRow(0)
        self.stains = stains
        self.pickers = {}
        for stain in stains:
            picker = ComboBox(choices=self._plane_choices, nullable=False)
            picker.native.setToolTip(
                f"The image layer (or channel of a stack) stained for {stain}."
            )
            self.pickers[stain] = picker
            self._layout.addRow(stain, picker.native)
        self.cells = ComboBox(choices=self._cell_choices, nullable=False)
        self.cells.native.setToolTip(
            "The cells to pool tokens over and to write codes to: a Labels layer you opened "
            "or drew, or a segmentation of the stains made for you."
        )
        self._layout.addRow("Cells", self.cells.native)
        self.group = ComboBox(choices=[(_NONE_GROUP, None)], nullable=False)
        self.group.native.setToolTip(
            "The dictionary whitens each group of sites on that group's own control wells: "
            "choose the group (e.g. the plate) these layers were imaged in."
        )
        self._group_label = QLabel()
        self._layout.addRow(self._group_label, self.group.native)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        self._layout.addRow(self.hint)
        self.set_groups(self.group_columns, self.groups)
        self.group.changed.connect(self._update_hint)
        for picker in self.pickers.values():
            picker.changed.connect(self._update_hint)
        self.refresh(guess=True)

    def refresh(self, *_, guess: bool = False) -> None:
        """List the viewer's layers again; a stain not picked yet gets the name's guess."""
        held = {s: p.value for s, p in self.pickers.items()}
        for picker in self.pickers.values():
            picker.reset_choices()
        self.cells.reset_choices()
        guesses = guess_mapping(self.stains, self.planes())
        offered = set(self.planes())
        for stain, picker in self.pickers.items():
            keep = held.get(stain)
            if keep in offered and not guess:
                picker.value = keep
            elif guesses.get(stain) is not None:
                picker.value = guesses[stain]
            else:
                picker.value = keep if keep in offered else None
        self._update_hint()

    def _update_hint(self, *_) -> None:
        """Say what the form still needs: stains the names did not give, the whitening group."""
        missing = [s for s, p in self.pickers.items() if p.value is None]
        parts = []
        if missing and self.planes():
            parts.append(
                f"Which layer is {', '.join(missing)}? The layer names do not say; choose above."
            )
        if self.groups and self.group.value is None:
            parts.append(
                f"The dictionary whitens each {', '.join(self.group_columns)} on its own control "
                "wells: choose the one these layers were imaged in, then Embed (again)."
            )
        self.hint.setText(" ".join(parts))

    def pick(self, stain: str, layer: str, channel: int | None = None) -> None:
        """Map ``stain`` to a layer (and channel of a stack), as choosing it in the form does."""
        self.pickers[stain].value = Plane(layer, channel)
        self.refresh()

    def pick_cells(self, layer: str | None) -> None:
        """Take the cells from Labels layer ``layer`` (None: segment the stains)."""
        self.cells.value = layer

    def mapping(self) -> dict[str, Plane | None]:
        return {s: p.value for s, p in self.pickers.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The picked layers' pixels by layer name (a lazy array is read now)."""
        names = {p.layer for p in self.mapping().values() if p is not None}
        return {
            x.name: np.asarray(layer_pixels(x)) for x in self._image_layers() if x.name in names
        }

    def geometry(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Where the picked layers' pixels lie in the world (the first stain's layer)."""
        first = next((p for p in self.mapping().values() if p is not None), None)
        layer = next((x for x in self._image_layers() if first and x.name == first.layer), None)
        return ((1.0, 1.0), (0.0, 0.0)) if layer is None else layer_geometry(layer)

    def cells_layer(self) -> Labels | None:
        name = self.cells.value
        return next(
            (x for x in self.viewer.layers if isinstance(x, Labels) and x.name == name), None
        )
