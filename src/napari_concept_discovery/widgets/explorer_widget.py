"""Concept explorer dock widget: the feature table, the clicked cell's features, the top cells.

Selecting a feature (a table row, a row of the cell panel) selects it in the session, which
paints it on the site in view (:mod:`._painter`) and colours the plate navigator's wells.
Clicking a cell in the viewer lists its strongest features; clicking a gallery thumbnail
opens the cell's site and centres the camera on it. What is shown comes from
:mod:`napari_concept_discovery.views.feature_views`, computed in thread workers (docs/architecture.md,
"The viewer").
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtCore import QItemSelectionModel, QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from ..embed.plate import reopen_plate
from ..plate import SiteKey
from ..progress import Cancelled, Progress
from ..views.feature_views import (
    Thumbnail,
    camera_for_cell,
    cell_features,
    feature_overview,
    headers,
    top_cell_thumbnails,
)
from ..views.thumbnails import named_colour
from ._jobs import Job, JobOwner
from ._table import DataFrameModel, FeatureFilter
from ._viewer import get_session, observe, user_message

THUMB = 80
N_TOP = 24
N_CELL_FEATURES = 10


def _qimage(rgb: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


class ConceptExplorer(QWidget):
    """Dock widget: pick a feature in a table, see a cell's features, browse the top cells."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.jobs = JobOwner(self)
        self._gallery_job: Job | None = None
        self.features: pd.DataFrame | None = None
        self.cell_table = pd.DataFrame(columns=["feature", "value", "top"])
        self.thumbnails: list[Thumbnail] = []
        self._plate = None  # the plate the gallery reads from (the session's, else the store's)
        self._syncing = False

        self.status = QLabel()
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter: a label, e.g. cell_type=HeLa, or a number")
        self.filter_edit.setToolTip("Show only the features whose row contains this text.")
        self.filter_edit.setClearButtonEnabled(True)
        self.active_box = QCheckBox("Active only")
        self.active_box.setToolTip("Hide features that never fire on the store's cells.")
        self.active_box.setChecked(True)
        self.model = DataFrameModel(self)
        self.proxy = FeatureFilter(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.set_active_only(True)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setToolTip("Click a feature to paint it on the site and find its top cells.")

        self.cell_label = QLabel("Click a cell in the viewer to list its strongest features.")
        self.cell_label.setWordWrap(True)
        self.cell_view = QTableView()
        self.cell_model = DataFrameModel(self)
        self.cell_view.setModel(self.cell_model)
        self.cell_view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.cell_view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.cell_view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.cell_view.verticalHeader().setVisible(False)
        self.cell_view.horizontalHeader().setStretchLastSection(True)
        self.cell_view.setToolTip("Click a feature to paint it.")

        self.gallery_label = QLabel("Select a feature to see the cells where it is strongest.")
        self.gallery_label.setWordWrap(True)
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListWidget.ViewMode.IconMode)
        self.gallery.setIconSize(QSize(THUMB, THUMB))
        self.gallery.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.gallery.setMovement(QListWidget.Movement.Static)
        self.gallery.setSpacing(2)
        self.gallery.setToolTip("Click a cell to open its site and centre it in the viewer.")

        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_edit, 1)
        filter_row.addWidget(self.active_box)
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addLayout(filter_row)
        top_layout.addWidget(self.table)
        cell_group = QGroupBox("Cell")
        cell_layout = QVBoxLayout(cell_group)
        cell_layout.addWidget(self.cell_label)
        cell_layout.addWidget(self.cell_view)
        gallery_group = QGroupBox("Top cells")
        gallery_layout = QVBoxLayout(gallery_group)
        gallery_layout.addWidget(self.gallery_label)
        gallery_layout.addWidget(self.gallery)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(cell_group)
        splitter.addWidget(gallery_group)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setStretchFactor(2, 2)
        splitter.setSizes([300, 160, 240])
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addWidget(splitter, 1)

        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)
        self.active_box.toggled.connect(self.proxy.set_active_only)
        self.table.selectionModel().selectionChanged.connect(self._on_row_selected)
        self.cell_view.clicked.connect(self._on_cell_feature_clicked)
        self.gallery.itemClicked.connect(self._on_thumbnail_clicked)
        observe(
            self,
            (
                (self.session.explorer_changed, self._on_explorer_changed),
                (self.session.feature_changed, self._on_feature_changed),
                (self.session.cell_changed, self._on_cell_changed),
                (self.session.dictionary_changed, self._on_dictionary_changed),
            ),
        )
        self._on_dictionary_changed(self.session.dictionary)
        self._on_explorer_changed(self.session.explorer)

    # --- what a user does -----------------------------------------------------------------

    def visible_features(self) -> list[int]:
        """Feature numbers in the table as shown (filtered and sorted)."""
        col = self._column("feature")
        return [
            int(self.proxy.data(self.proxy.index(r, col), Qt.ItemDataRole.UserRole))
            for r in range(self.proxy.rowCount())
        ]

    def select_row(self, feature: int) -> bool:
        """Select a feature's row (as a click does); False when it is filtered out."""
        row = self._proxy_row(feature)
        if row is None:
            return False
        self.table.selectRow(row)
        return True

    def open_thumbnail(self, index: int) -> None:
        """What clicking gallery thumbnail ``index`` does: show its site, centre its cell."""
        t = self.thumbnails[index]
        s = self.session
        try:
            s.set_site(t.key)
            s.select_cell(t.label)
        except (KeyError, ValueError) as exc:
            show_error(user_message(exc, f"Cannot show cell {t.label} of {SiteKey(*t.key)}"))
            return
        canvas = getattr(self.viewer, "_canvas_size", (600, 800))
        center, zoom = camera_for_cell(t.box, canvas)
        self.viewer.camera.center = center
        self.viewer.camera.zoom = zoom

    # --- reactions ------------------------------------------------------------------------

    def _on_dictionary_changed(self, dictionary) -> None:
        if dictionary is None:
            self.status.setText(
                "No dictionary yet: train one or load a file in the Dictionary widget."
            )
        elif self.session.explorer is None:
            self.status.setText("Preparing the dictionary on the store…")

    def _on_explorer_changed(self, explorer) -> None:
        self.features = None
        self.model.set_frame(pd.DataFrame())
        self._clear_cell()
        self._clear_gallery()
        if explorer is None:
            return
        self.status.setText("Encoding the store's cells to summarise the features…")
        job = Job(feature_overview, explorer)
        job.progressed.connect(self._on_progress)
        job.returned.connect(partial(self._show_features, explorer))
        job.errored.connect(partial(self._fail, "Cannot summarise the features"))
        job.done.connect(self._hide_progress)
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)
        self.jobs.run(job)

    def _hide_progress(self) -> None:
        if self.jobs.alive:
            self.progress.setVisible(False)

    def _on_progress(self, p: Progress) -> None:
        if self.jobs.alive:
            self.progress.setRange(0, max(1, p.total))
            self.progress.setValue(p.done)

    def _show_features(self, explorer, table: pd.DataFrame) -> None:
        if not self.jobs.alive or self.session.explorer is not explorer:
            return
        self.features = table
        self.model.set_frame(table, headers(table))
        col = self._column("frequency")
        if col >= 0:
            self.table.sortByColumn(col, Qt.SortOrder.DescendingOrder)
        n_active = int((table["n_active"] > 0).sum()) if "n_active" in table.columns else len(table)
        self.status.setText(
            f"{len(table)} features, {n_active} active on the store's cells. Click one to "
            "paint it; click a cell in the viewer to list its features."
        )
        if self.session.feature is not None:
            self._on_feature_changed(self.session.feature)

    def _column(self, name: str) -> int:
        cols = list(self.model.frame.columns)
        return cols.index(name) if name in cols else -1

    def _proxy_row(self, feature: int) -> int | None:
        col = self._column("feature")
        if col < 0:
            return None
        # through the source model: asking the proxy row by row costs ~90 ms at 4096 features
        hits = np.flatnonzero(self.model.frame["feature"].to_numpy() == int(feature))
        if not hits.size:
            return None
        index = self.proxy.mapFromSource(self.model.index(int(hits[0]), col))
        return index.row() if index.isValid() else None

    def _on_row_selected(self, *_) -> None:
        if self._syncing:
            return
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return
        col = self._column("feature")
        feature = self.proxy.data(self.proxy.index(rows[0].row(), col), Qt.ItemDataRole.UserRole)
        self.session.select_feature(int(feature))

    def _on_feature_changed(self, feature) -> None:
        self._sync_row(feature)
        self._clear_gallery()
        explorer = self.session.explorer
        if feature is None or explorer is None:
            return
        self.gallery_label.setText(f"Finding the cells where feature {feature} is strongest…")
        plate = self._gallery_plate(explorer)
        if plate is None:
            return
        job = Job(
            top_cell_thumbnails,
            explorer,
            plate,
            feature,
            self._channel_colours(),
            n=N_TOP,
            size=THUMB,
        )
        job.returned.connect(partial(self._show_gallery, explorer, feature))
        job.errored.connect(partial(self._gallery_failed, feature))
        if self._gallery_job is not None and self._gallery_job.running:
            self._gallery_job.cancel()  # another feature now: do not keep the workers busy
        self._gallery_job = job
        self.jobs.run(job)

    def _gallery_failed(self, feature, exc: BaseException) -> None:
        if not isinstance(exc, Cancelled):
            self._fail(f"Cannot show the top cells of feature {feature}", exc)

    def _sync_row(self, feature) -> None:
        self._syncing = True
        try:
            row = None if feature is None else self._proxy_row(int(feature))
            if row is None:
                self.table.clearSelection()
            else:
                self.table.selectionModel().select(
                    self.proxy.index(row, 0),
                    QItemSelectionModel.SelectionFlag.ClearAndSelect
                    | QItemSelectionModel.SelectionFlag.Rows,
                )
                self.table.scrollTo(self.proxy.index(row, 0))
        finally:
            self._syncing = False

    def _gallery_plate(self, explorer):
        plate = self.session.plate
        recorded = explorer.store.plate_source.get("path")
        if plate is not None and (recorded is None or str(plate.root) == str(recorded)):
            return plate
        if self._plate is None:
            try:
                self._plate = reopen_plate(explorer.store)
            except Exception as exc:
                self._fail("Cannot open the store's plate for the gallery", exc)
                return None
        return self._plate

    def _channel_colours(self) -> dict[str, tuple[float, float, float]]:
        """The channels shown in the viewer, with the colour each is drawn in."""
        colours = {}
        for layer in self.viewer.layers:
            meta = layer.metadata
            if meta.get("role") == "channel" and isinstance(layer, Image) and layer.visible:
                rgb = tuple(float(v) for v in layer.colormap.colors[-1][:3])
                colours[meta.get("channel", layer.name)] = rgb or named_colour("gray")
        return colours

    def _show_gallery(self, explorer, feature: int, thumbs: list[Thumbnail]) -> None:
        s = self.session
        if not self.jobs.alive or s.explorer is not explorer or s.feature != feature:
            return
        self.thumbnails = thumbs
        self.gallery.clear()
        for t in thumbs:
            item = QListWidgetItem(QIcon(QPixmap.fromImage(_qimage(t.rgb))), f"{t.value:.2g}")
            item.setToolTip(
                f"{t.plate} {t.well} site {t.site}, cell {t.label}: activation {t.value:.3g}\n"
                "Click to open this site and centre the cell."
            )
            self.gallery.addItem(item)
        self.gallery_label.setText(
            f"Top {len(thumbs)} cells of feature {feature} across the store (value under each)."
            if thumbs
            else f"Feature {feature} is not active on any cell."
        )

    def _on_thumbnail_clicked(self, item: QListWidgetItem) -> None:
        self.open_thumbnail(self.gallery.row(item))

    def _clear_gallery(self) -> None:
        self.thumbnails = []
        self.gallery.clear()
        self.gallery_label.setText("Select a feature to see the cells where it is strongest.")

    def _on_cell_changed(self, label) -> None:
        explorer, key = self.session.explorer, self.session.site_key
        if label is None or explorer is None or key is None:
            self._clear_cell()
            return
        self.cell_label.setText(f"Cell {label} of {key}: reading its features…")
        job = Job(
            cell_features, explorer, key, label, self.features, keywords=(), n=N_CELL_FEATURES
        )
        job.returned.connect(partial(self._show_cell, explorer, key, label))
        job.errored.connect(partial(self._fail, f"Cannot list the features of cell {label}"))
        self.jobs.run(job)

    def _show_cell(self, explorer, key, label, table: pd.DataFrame) -> None:
        s = self.session
        if not self.jobs.alive or (s.explorer, s.site_key, s.cell) != (explorer, key, label):
            return
        self.cell_table = table
        shown = table.rename(
            columns={"feature": "Feature", "value": "Activation", "top": "Top label"}
        )
        self.cell_model.set_frame(shown)
        self.cell_label.setText(
            f"Cell {label} of {key}: its {len(table)} strongest features (click one to paint it)."
            if len(table)
            else f"Cell {label} of {key}: no feature is active on it."
        )

    def _clear_cell(self) -> None:
        self.cell_table = pd.DataFrame(columns=["feature", "value", "top"])
        self.cell_model.set_frame(pd.DataFrame())
        self.cell_label.setText("Click a cell in the viewer to list its strongest features.")

    def _on_cell_feature_clicked(self, index) -> None:
        if index.isValid() and index.row() < len(self.cell_table):
            self.session.select_feature(int(self.cell_table["feature"].iloc[index.row()]))

    def _fail(self, doing: str, exc: BaseException) -> None:
        if not self.jobs.alive:
            return
        text = user_message(exc, doing)
        self.status.setText(text)
        show_error(text)
