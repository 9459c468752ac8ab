"""Plate navigator: the plate as a grid of wells; click a well to show its sites in the viewer.

Wells are coloured by a metadata column (cell type, perturbation, well type, ...) or by a number
per well (:meth:`PlateNavigator.show_values`): once a feature is selected, its mean activation
per cell in each well (``Explorer.well_means``, computed in a worker). The layout,
the colours and the tooltips come from :mod:`napari_concept_discovery.views.platemap`; this module
only paints them and turns clicks into :class:`~napari_concept_discovery.views.session.ViewerSession`
calls. The grid is painted with QPainter rather than a matplotlib canvas: a 1536-well plate
repaints on every hover in well under a millisecond, hit-testing and per-well tooltips are
exact, and it follows napari's theme colours.
"""

from __future__ import annotations

import html
import warnings
from functools import partial

import pandas as pd
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, QPoint, QRectF, QSize, Qt, Signal
from qtpy.QtGui import QColor, QFont, QLinearGradient, QPainter, QPen
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from .._reader import remember_plate
from ..errors import ConceptDiscoveryError
from ..plate import PlateWarning, SiteKey, open_plate
from ..segment.qc import per_well
from ..views.colours import MISSING, to_hex
from ..views.platemap import (
    GridGeometry,
    PlateColouring,
    PlateGrid,
    colour_bar,
    colour_by_column,
    colour_by_value,
    colour_columns,
    well_table,
    well_tooltip,
)
from ._jobs import Job
from ._step import StepWidget
from ._viewer import observe, user_message

_VALUES = "\x00values"  # item data of the "Colour by" entry for per-well values (not a column)
_QC = "\x00qc:"  # item data prefix of the entries for the store's segmentation quality


def _qcolor(rgba) -> QColor:
    return QColor.fromRgbF(*(float(x) for x in rgba))


def _pos(event) -> QPoint:
    """A mouse event's position (Qt6 ``position()``, Qt5 ``pos()``)."""
    return event.position().toPoint() if hasattr(event, "position") else event.pos()


class PlateMapView(QWidget):
    """Paints one plate's wells; emits ``well_clicked(well)`` for a well that has images."""

    well_clicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setMinimumSize(220, 120)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.plate: str | None = None
        self.grid = PlateGrid.for_wells([])
        self.wells: dict[str, dict] = {}  # wells with images: well -> row of the well table
        self.colouring: PlateColouring | None = None
        self.selected: str | None = None  # the well whose sites the site selector lists
        self.in_view: str | None = None  # the well of the site in the viewer
        self.hovered: str | None = None
        self.empty_text = "No plate yet: open a plate folder with the button above."

    def set_plate(self, plate: str | None, wells: pd.DataFrame | None) -> None:
        """Show ``plate``; ``wells`` is its part of the well table (one row per well)."""
        self.plate = plate
        rows = [] if wells is None else wells.to_dict(orient="records")
        self.wells = {r["well"]: r for r in rows}
        self.grid = PlateGrid.for_wells(self.wells)
        self._fit_height()
        self.update()

    def set_colouring(self, colouring: PlateColouring | None) -> None:
        self.colouring = colouring
        self.update()

    def geometry_now(self) -> GridGeometry:
        return GridGeometry(self.grid, self.width(), self.height())

    def well_center(self, well: str) -> QPoint:
        """Where a user would click to pick ``well`` (for tests and scripts)."""
        x, y, w, h = self.geometry_now().well_rect(*self.grid.position(well))
        return QPoint(int(x + w / 2), int(y + h / 2))

    def well_at(self, pos: QPoint) -> str | None:
        hit = self.geometry_now().well_at(pos.x(), pos.y())
        return None if hit is None else self.grid.well(*hit)

    def sizeHint(self) -> QSize:
        return QSize(320, self.heightForWidth(320))

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        """Tall enough for square wells across the full width, so the legend sits right below."""
        margin = GridGeometry.margin
        pitch = (width - margin - 2) / self.grid.n_cols
        return max(150, min(520, int(margin + 4 + pitch * self.grid.n_rows)))

    def _fit_height(self) -> None:
        """At most the height of square wells, so the legend sits right below; smaller (wells
        drawn smaller) when the dock is short, e.g. shared with the concept explorer."""
        height = self.heightForWidth(self.width())
        if height != self.maximumHeight():
            self.setMaximumHeight(height)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_height()

    def tooltip(self, well: str) -> str:
        if well not in self.wells:
            return f"{well}: no images"
        value = None
        if self.colouring is not None and self.colouring.numeric:
            value = (self.colouring.title, self.colouring.values.get((self.plate, well)))
        text = well_tooltip(self.wells[well], value)
        return text + "\n\nClick to show this well in the viewer."

    # --- Qt events ------------------------------------------------------------------------------

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().color(self.foregroundRole())
        if not self.wells:
            painter.setPen(text)
            painter.drawText(
                self.rect(),
                Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                self.empty_text,
            )
            return
        geo = self.geometry_now()
        font = QFont(painter.font())
        font.setPointSizeF(max(6.0, min(9.0, geo.pitch * 0.45)))
        painter.setFont(font)
        painter.setPen(text)
        step = geo.label_step()
        for r, name in enumerate(self.grid.row_names):
            if r % step == 0:
                x, y = geo.row_label_pos(r)
                painter.drawText(QRectF(x - 12, y - 8, 24, 16), Qt.AlignmentFlag.AlignCenter, name)
        for c in range(self.grid.n_cols):
            if (c + 1) % step == 0 or c == 0:
                x, y = geo.col_label_pos(c)
                painter.drawText(
                    QRectF(x - 12, y - 8, 24, 16), Qt.AlignmentFlag.AlignCenter, str(c + 1)
                )
        empty_pen = QPen(QColor(text.red(), text.green(), text.blue(), 70))
        colours = {} if self.colouring is None else self.colouring.colours
        for r in range(self.grid.n_rows):
            for c in range(self.grid.n_cols):
                well = self.grid.well(r, c)
                rect = QRectF(*geo.well_rect(r, c))
                if well not in self.wells:
                    painter.setPen(empty_pen)
                    painter.setBrush(Qt.BrushStyle.NoBrush)
                    painter.drawEllipse(rect)
                    continue
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(_qcolor(colours.get((self.plate, well), MISSING)))
                painter.drawEllipse(rect)
                if well == self.hovered and well != self.selected:
                    painter.setPen(QPen(QColor(255, 255, 255, 140), 1.5))
                    painter.setBrush(Qt.BrushStyle.NoBrush)
                    painter.drawEllipse(rect)
        if self.selected in self.wells:
            rect = QRectF(*geo.well_rect(*self.grid.position(self.selected)))
            painter.setPen(QPen(QColor("white"), max(2.0, geo.pitch * 0.12)))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            grow = geo.pitch * 0.06
            painter.drawEllipse(rect.adjusted(-grow, -grow, grow, grow))
        if self.in_view in self.wells:
            x, y, w, h = geo.well_rect(*self.grid.position(self.in_view))
            d = max(3.0, w * 0.28)
            painter.setPen(QPen(QColor("black"), 1))
            painter.setBrush(QColor("white"))
            painter.drawEllipse(QRectF(x + w / 2 - d / 2, y + h / 2 - d / 2, d, d))

    def mouseMoveEvent(self, event) -> None:
        well = self.well_at(_pos(event))
        if well != self.hovered:
            self.hovered = well
            self.setCursor(
                Qt.CursorShape.PointingHandCursor
                if well in self.wells
                else Qt.CursorShape.ArrowCursor
            )
            self.update()

    def leaveEvent(self, event) -> None:
        self.hovered = None
        self.update()

    def mousePressEvent(self, event) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        well = self.well_at(_pos(event))
        if well in self.wells:
            self.well_clicked.emit(well)

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            well = self.well_at(event.pos())
            if well is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(event.globalPos(), self.tooltip(well), self)
            return True
        return super().event(event)


class ColourBar(QWidget):
    """A horizontal colour bar with its low and high values, for numeric colourings."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.colouring: PlateColouring | None = None
        self.setFixedHeight(34)

    def set_colouring(self, colouring: PlateColouring | None) -> None:
        self.colouring = colouring
        self.setVisible(colouring is not None and colouring.numeric)
        self.update()

    def paintEvent(self, event) -> None:
        if self.colouring is None or not self.colouring.numeric:
            return
        painter = QPainter(self)
        bar = QRectF(4, 2, self.width() - 8, 14)
        gradient = QLinearGradient(bar.topLeft(), bar.topRight())
        colours = colour_bar(self.colouring.colormap or "viridis")
        for i, c in enumerate(colours):
            gradient.setColorAt(i / (len(colours) - 1), _qcolor(c))
        painter.fillRect(bar, gradient)
        painter.setPen(self.palette().color(self.foregroundRole()))
        lo, hi = self.colouring.limits
        below = QRectF(4, 17, self.width() - 8, 16)
        painter.drawText(below, Qt.AlignmentFlag.AlignLeft, f"{lo:.3g}")
        painter.drawText(below, Qt.AlignmentFlag.AlignRight, f"{hi:.3g}")


class PlateNavigator(StepWidget):
    """Dock widget: pick a plate, colour its wells, click a well, choose a site.

    Its job (the wells' mean activation of the selected feature) runs on the
    :class:`.JobPanel`, whose status line says which site is in view and what failed.
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(
            napari_viewer,
            parent,
            cancel_tip="Stop colouring the wells by the feature.",
            cancelling="Cancelling…",
        )
        self._wells = pd.DataFrame()
        self._values: PlateColouring | None = None
        self._quality: dict[str, pd.DataFrame] = {}  # per-well segmentation QC, by title

        self.open_button = QPushButton("Open plate folder…")
        self.open_button.setToolTip(
            "Open a folder of plate images (RxRx, Phenix/JUMP or per-site TIFFs) with its "
            "metadata table. File > Open Folder does the same."
        )
        self.plate_combo = QComboBox()
        self.plate_combo.setToolTip("This folder holds several plates: choose the one to show.")
        self.colour_combo = QComboBox()
        self.colour_combo.setToolTip(
            "Colour the wells by a column of the plate's metadata, or by a value per well."
        )
        self.map_view = PlateMapView()
        self.legend = QLabel()
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.colour_bar = ColourBar()
        self.colour_bar.setVisible(False)
        self.site_combo = QComboBox()
        self.site_combo.setToolTip("Sites (fields of view) imaged in the selected well.")
        self.well_label = QLabel("Well: none")

        form = QFormLayout()
        self.plate_label = QLabel("Plate")
        form.addRow(self.plate_label, self.plate_combo)
        form.addRow("Colour by", self.colour_combo)
        site_row = QHBoxLayout()
        site_row.addWidget(self.well_label)
        site_row.addWidget(self.site_combo, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.open_button)
        layout.addLayout(form)
        layout.addWidget(self.map_view)
        layout.addWidget(self.colour_bar)
        layout.addWidget(self.legend)
        layout.addLayout(site_row)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.open_button.clicked.connect(self._choose_folder)
        self.plate_combo.currentIndexChanged.connect(self._on_plate_chosen)
        self.colour_combo.currentIndexChanged.connect(self._recolour)
        self.map_view.well_clicked.connect(self.select_well)
        self.site_combo.activated.connect(self._on_site_chosen)

        observe(
            self,
            (
                (self.session.plate_changed, self._on_plate_changed),
                (self.session.site_changed, self._on_site_changed),
                (self.session.feature_changed, self._colour_by_feature),
                (self.session.explorer_changed, self._colour_by_feature),
                (self.session.store_changed, self._on_store_changed),
            ),
        )
        self._on_plate_changed(self.session.plate)
        self._on_site_changed(self.session.site_key)

    # --- what a user does, as methods (tests and other widgets call these) ---------------------

    @property
    def plate_name(self) -> str | None:
        return self.map_view.plate

    def open_plate_folder(self, path: str) -> bool:
        """Open a plate folder and show its first site; errors become notifications."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PlateWarning)
            try:
                plate = open_plate(path)
            except (ConceptDiscoveryError, OSError) as exc:
                show_error(user_message(exc, f"Could not open {path}"))
                return False
        for w in caught:
            if issubclass(w.category, PlateWarning):
                show_warning(f"{path}: {w.message}")
        remember_plate(plate)
        self.session.set_plate(plate)
        return True

    def select_plate(self, plate: str) -> None:
        """Show another plate of the folder (the viewer keeps its site until a well is clicked)."""
        i = self.plate_combo.findText(plate)
        if i < 0:
            raise ValueError(f"no plate {plate!r} here; plates: {self._plates()}")
        self.plate_combo.setCurrentIndex(i)

    def colour_by(self, column: str) -> None:
        """Colour wells by a metadata column (as in the dropdown)."""
        i = self.colour_combo.findData(column) if column != _VALUES else -1
        if i < 0:
            raise ValueError(
                f"cannot colour by {column!r}; choices: {', '.join(self.colour_choices())}"
            )
        self.colour_combo.setCurrentIndex(i)

    def colour_choices(self) -> list[str]:
        return [self.colour_combo.itemText(i) for i in range(self.colour_combo.count())]

    def show_values(
        self,
        values: pd.DataFrame,
        title: str,
        colormap: str = "viridis",
        limits: tuple[float, float] | None = None,
    ) -> None:
        """Colour wells by a number per well (columns plate, well, value), e.g. a feature's mean.

        The values get their own entry at the top of "Colour by", titled ``title``, replacing
        the previous one; the metadata columns stay one click away.
        """
        try:
            self._values = colour_by_value(values, title, colormap, limits)
        except (ValueError, ConceptDiscoveryError) as exc:
            show_error(user_message(exc, f"Could not colour the plate by {title}"))
            return
        self.colour_combo.blockSignals(True)
        self._remove_values_entry()
        self.colour_combo.insertItem(0, title, _VALUES)
        self.colour_combo.blockSignals(False)
        self.colour_combo.setCurrentIndex(0)
        self._recolour()

    def clear_values(self) -> None:
        """Drop the per-well values; the wells go back to a metadata column."""
        self._values = None
        self._remove_values_entry()
        self._recolour()

    def select_well(self, well: str) -> None:
        """Select a well as a click does: list its sites and show the first one."""
        if well not in self.map_view.wells:
            show_error(f"Well {well} of {self.plate_name} has no images.")
            return
        self.map_view.selected = well
        self.map_view.update()
        sites = self._fill_sites(well)
        self._show((self.plate_name, well, sites[0]))

    def select_site(self, site: int) -> None:
        """Show another site of the selected well."""
        i = self.site_combo.findData(int(site))
        if i < 0:
            raise ValueError(f"well {self.map_view.selected} has no site {site}")
        self.site_combo.setCurrentIndex(i)
        self._on_site_chosen(i)

    # --- reactions ------------------------------------------------------------------------------

    def _colour_by_feature(self, *_) -> None:
        """Colour the wells by the selected feature's mean activation (the metadata stay)."""
        explorer, feature = self.session.explorer, self.session.feature
        if explorer is None or feature is None:
            if self._values is not None:
                self.clear_values()
            return
        job = Job(explorer.well_means, feature, keywords=())
        job.returned.connect(partial(self._show_feature_values, explorer, feature))
        job.errored.connect(
            lambda exc: self.panel.fail(
                user_message(exc, f"Cannot colour wells by feature {feature}")
            )
        )
        self.jobs.run(job)

    def _enable(self, running: bool) -> None:
        """Nothing to enable: colouring the wells never blocks the navigator."""

    def _show_feature_values(self, explorer, feature: int, means: pd.DataFrame) -> None:
        s = self.session
        if not self.jobs.alive or s.explorer is not explorer or s.feature != feature:
            return
        self.show_values(means, f"feature {feature}: mean per cell", colormap="magma")

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a plate folder")
        if path:
            self.open_plate_folder(path)

    def _show(self, key: tuple) -> None:
        try:
            self.session.set_site(key)
        except (ConceptDiscoveryError, KeyError) as exc:
            show_error(user_message(exc, f"Could not show {SiteKey(*key)}"))

    def _on_site_chosen(self, index: int) -> None:
        site = self.site_combo.itemData(index)
        if site is not None and self.map_view.selected is not None:
            self._show((self.plate_name, self.map_view.selected, int(site)))

    def _plates(self) -> list[str]:
        return [self.plate_combo.itemText(i) for i in range(self.plate_combo.count())]

    def _on_store_changed(self, store) -> None:
        """Offer the store's segmentation quality per well in "Colour by" (where it has one)."""
        try:
            quality = per_well(store.quality()) if store is not None else {}
        except (ConceptDiscoveryError, OSError, ValueError) as exc:
            show_error(user_message(exc, "Cannot read the store's segmentation quality"))
            quality = {}
        if not quality and not self._quality:
            return  # nothing to offer before or now
        self._quality = quality
        self._on_plate_changed(self.session.plate)

    def _on_plate_changed(self, plate) -> None:
        self._values = None
        if plate is None:
            self._wells = pd.DataFrame()
            plates, columns = [], []
        else:
            self._wells = well_table(plate.site_table())
            plates, columns = plate.plates, colour_columns(self._wells)
        previous = self.colour_combo.currentData()
        self.plate_combo.blockSignals(True)
        self.plate_combo.clear()
        self.plate_combo.addItems(plates)
        self.plate_combo.blockSignals(False)
        self.plate_label.setVisible(len(plates) > 1)
        self.plate_combo.setVisible(len(plates) > 1)
        self.colour_combo.blockSignals(True)
        self.colour_combo.clear()
        for column in columns:
            self.colour_combo.addItem(str(column), column)
        for title in self._quality:
            self.colour_combo.addItem(title, _QC + title)
        if not columns and not self._quality:
            self.colour_combo.addItem("(no metadata)", None)
        keep = self.colour_combo.findData(previous) if previous is not None else -1
        self.colour_combo.setCurrentIndex(max(0, keep))
        self.colour_combo.blockSignals(False)
        self.open_button.setToolTip(
            self.open_button.toolTip().split("\n")[0]
            + ("" if plate is None else f"\nOpen now: {plate.root}")
        )
        self._on_plate_chosen()

    def _on_plate_chosen(self, *_) -> None:
        name = self.plate_combo.currentText() or None
        wells = None if name is None else self._wells[self._wells["plate"] == name]
        self.map_view.set_plate(name, wells)
        key = self.session.site_key
        self.map_view.in_view = key.well if key is not None and key.plate == name else None
        if self.map_view.selected not in self.map_view.wells or (
            key is not None and key.plate != name
        ):
            self.map_view.selected = None
            self.site_combo.clear()
            self.well_label.setText("Well: none")
        self._recolour()

    def _on_site_changed(self, key) -> None:
        if key is None:
            self.map_view.in_view = None
            self.status.setText("")
            self.map_view.update()
            return
        if key.plate != self.plate_name:
            self.plate_combo.setCurrentText(key.plate)
        self.map_view.in_view = key.well
        self.map_view.selected = key.well
        self._fill_sites(key.well)
        i = self.site_combo.findData(key.site)
        self.site_combo.setCurrentIndex(i)
        self.status.setText(f"In view: {key}")
        self.map_view.update()

    def _fill_sites(self, well: str) -> list[int]:
        sites = list(self.map_view.wells[well]["sites"])
        current = [self.site_combo.itemData(i) for i in range(self.site_combo.count())]
        if current != sites:
            self.site_combo.clear()
            for s in sites:
                self.site_combo.addItem(f"site {s}", s)
        self.well_label.setText(f"Well {well}:")
        return sites

    def _remove_values_entry(self) -> None:
        for i in reversed(range(self.colour_combo.count())):
            if self.colour_combo.itemData(i) == _VALUES:
                self.colour_combo.removeItem(i)

    def _recolour(self, *_) -> None:
        choice = self.colour_combo.currentData()
        colouring = None
        if choice == _VALUES:
            colouring = self._values
        elif isinstance(choice, str) and choice.startswith(_QC):
            title = choice.removeprefix(_QC)
            colouring = colour_by_value(self._quality[title], title, colormap="viridis")
        elif choice is not None and not self._wells.empty:
            colouring = colour_by_column(self._wells, choice)
        self.map_view.set_colouring(colouring)
        self.colour_bar.set_colouring(colouring)
        self.legend.setText(_legend_html(colouring, self.plate_name))


def _legend_html(colouring: PlateColouring | None, plate: str | None) -> str:
    """The shown plate's legend as rich text that wraps between entries, never inside one."""
    if colouring is None or plate is None:
        return ""
    if colouring.numeric:
        return f"<b>{html.escape(colouring.title)}</b> (grey: no value)"
    entries = [
        f"<span style='color:{to_hex(e.colour)}'>&#9679;</span>&nbsp;"
        f"{html.escape(e.label).replace(' ', '&nbsp;')}&nbsp;({e.count})"
        for e in colouring.legend_for(plate)
    ]
    return "&nbsp;&nbsp; ".join(entries)
