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
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..analysis.cell_selection import (
    cells_above,
    selection_labels,
    similar_cells,
    with_feature,
    write_cells_csv,
    write_selection_labels,
)
from ..analysis.measurements import NO_DESCRIPTION
from ..dictionary.feature_notes import FeatureNotes, load_notes, save_notes
from ..embed.plate import reopen_plate
from ..errors import ConceptDiscoveryError
from ..plate import SiteKey
from ..progress import Cancelled, Progress
from ..views.feature_card import card_data, card_figure
from ..views.feature_views import (
    Thumbnail,
    camera_for_cell,
    cell_features,
    cell_thumbnails,
    feature_overview,
    headers,
    top_cell_thumbnails,
    with_names,
)
from ..views.thumbnails import named_colour
from ._jobs import Job
from ._step import StepWidget
from ._table import DataFrameModel, FeatureFilter
from ._viewer import observe, user_message

THUMB = 80
N_TOP = 24
N_CELL_FEATURES = 10
#: Name of the Labels layer that shows the selected cells of the site in view.
SELECTION_LAYER = "selected cells"


def _qimage(rgb: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


class ConceptExplorer(StepWidget):
    """Dock widget: pick a feature in a table, see a cell's features, browse the top cells.

    Its step is the feature summary (every cell of the store encoded once), run by the
    :class:`.JobPanel` with its progress bar and status line; it is not offered for cancelling
    (a new dictionary or store starts another). The gallery, a cell's features, similar cells
    and the card run as further jobs of the same panel's owner, their errors on its status.
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(
            napari_viewer,
            parent,
            cancel_tip="Stop summarising the features.",
            cancelling="Cancelling the summary of the features…",
        )
        self._gallery_job: Job | None = None
        self.features: pd.DataFrame | None = None
        self.cell_table = pd.DataFrame(columns=["feature", "value", "top"])
        self.thumbnails: list[Thumbnail] = []
        self._plate = None  # the plate the gallery reads from (the session's, else the store's)
        self._syncing = False

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
        self.similar_button = QPushButton("Find similar cells")
        self.similar_button.setToolTip(
            "The cells of the whole store most like this one in code space (cosine on the "
            "dictionary's codes, every cell compared), shown in the Cells tab."
        )
        self.similar_button.setEnabled(False)

        self.gallery_label = QLabel("Select a feature to see the cells where it is strongest.")
        self.gallery_label.setWordWrap(True)
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListWidget.ViewMode.IconMode)
        self.gallery.setIconSize(QSize(THUMB, THUMB))
        self.gallery.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.gallery.setMovement(QListWidget.Movement.Static)
        self.gallery.setSpacing(2)
        self.gallery.setToolTip("Click a cell to open its site and centre it in the viewer.")
        self.threshold = QDoubleSpinBox()
        self.threshold.setDecimals(3)
        self.threshold.setRange(0.0, 1e6)
        self.threshold.setSingleStep(0.05)
        self.threshold.setMinimumWidth(max(130, self.threshold.sizeHint().width()))
        self.threshold.setToolTip("Select every cell where the feature's code is at least this.")
        self.threshold_button = QPushButton("Cells ≥")
        self.threshold_button.setToolTip(
            "Select every cell of the store where the selected feature is at least the value "
            "beside; the strongest are shown here."
        )
        self.threshold_button.setEnabled(False)
        self.save_button = QPushButton("Save CSV…")
        self.save_button.setToolTip(
            "Write the selected cells (plate, well, site, label, centroid and the selected "
            "feature's value) to a CSV file."
        )
        self.layer_button = QPushButton("Show as layer")
        self.layer_button.setToolTip(
            f"Add the selected cells of the site in view as a Labels layer ({SELECTION_LAYER!r})."
        )
        self.labels_button = QPushButton("Save labels…")
        self.labels_button.setToolTip(
            "Write one label image per site holding selected cells, only those cells kept, into "
            "a folder (<plate>/<well>_s<site>_cells.tif)."
        )
        for b in (self.save_button, self.layer_button, self.labels_button):
            b.setEnabled(False)

        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("Name this feature, e.g. 'fragmented mitochondria'")
        self.note_edit = QPlainTextEdit()
        self.note_edit.setPlaceholderText("Notes: what you saw, where, what to check next")
        self.note_edit.setMaximumHeight(56)
        self.name_button = QPushButton("Save name")
        self.name_button.setToolTip(
            "Keep the name and note beside the dictionary file (<name>.features.json)."
        )
        self.feature_label = QLabel("Select a feature in the table above.")
        self.feature_label.setWordWrap(True)
        self.description_label = QLabel()
        self.description_label.setWordWrap(True)
        self.description_label.setToolTip(
            "The per-cell measurements (per stain and compartment) whose values follow the "
            "feature's activation most closely: Spearman correlation over cells, with its sign."
        )
        self.card_label = QLabel("The feature's card appears here.")
        self.card_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignHCenter)
        self.card_scroll = QScrollArea()
        self.card_scroll.setWidgetResizable(True)
        self.card_scroll.setWidget(self.card_label)
        self.card_image: np.ndarray | None = None
        self.descriptions: pd.DataFrame | None = None
        for w in (self.name_edit, self.note_edit, self.name_button):
            w.setEnabled(False)

        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_edit, 1)
        filter_row.addWidget(self.active_box)
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addLayout(filter_row)
        top_layout.addWidget(self.table)
        feature_tab = QWidget()
        feature_layout = QVBoxLayout(feature_tab)
        feature_layout.addWidget(self.feature_label)
        name_row = QHBoxLayout()
        name_row.addWidget(self.name_edit, 1)
        name_row.addWidget(self.name_button)
        feature_layout.addLayout(name_row)
        feature_layout.addWidget(self.note_edit)
        feature_layout.addWidget(self.description_label)
        feature_layout.addWidget(self.card_scroll, 1)
        cell_tab = QWidget()
        cell_layout = QVBoxLayout(cell_tab)
        cell_layout.addWidget(self.cell_label)
        cell_layout.addWidget(self.cell_view, 1)
        cell_layout.addWidget(self.similar_button)
        gallery_tab = QWidget()
        gallery_layout = QVBoxLayout(gallery_tab)
        gallery_layout.addWidget(self.gallery_label)
        gallery_layout.addWidget(self.gallery, 1)
        select_row = QHBoxLayout()
        select_row.addWidget(self.threshold_button)
        select_row.addWidget(self.threshold)
        select_row.addStretch(1)
        export_row = QHBoxLayout()  # a row of its own: at 1280 px one row cut the threshold
        export_row.addWidget(QLabel("The selected cells:"))
        export_row.addStretch(1)
        export_row.addWidget(self.save_button)
        export_row.addWidget(self.labels_button)
        export_row.addWidget(self.layer_button)
        gallery_layout.addLayout(select_row)
        gallery_layout.addLayout(export_row)
        self.tabs = QTabWidget()
        self.tabs.addTab(gallery_tab, "Cells")
        self.tabs.addTab(feature_tab, "Feature card")
        self.tabs.addTab(cell_tab, "Clicked cell")
        self.gallery_tab, self.cell_tab, self.feature_tab = gallery_tab, cell_tab, feature_tab
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([330, 520])
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addWidget(splitter, 1)

        self.notes: FeatureNotes | None = None
        self.selection: pd.DataFrame | None = None  # cells chosen for export
        self.selection_what = ""
        self._gallery_ticket = 0
        self.similar_button.clicked.connect(self.find_similar)
        self.threshold_button.clicked.connect(self.select_above)
        self.save_button.clicked.connect(self._choose_save)
        self.layer_button.clicked.connect(self.show_selection_layer)
        self.labels_button.clicked.connect(self._choose_labels)
        self.name_button.clicked.connect(self.save_name)
        self.tabs.currentChanged.connect(self._on_tab_changed)
        self._card_ticket = 0
        self._card_for: int | None = None
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
        self._set_selection(None, "")
        self.notes = None
        self.descriptions = None
        self._card_for = None
        self.card_image = None
        self.card_label.clear()
        self.card_label.setText("The feature's card appears here.")
        if explorer is None:
            return
        self._load_notes(explorer.dictionary)
        self.panel.start(
            Job(feature_overview, explorer),
            "Encoding the store's cells to summarise the features…",
            failed="Cannot summarise the features",
            progressed=self._on_progress,
            returned=partial(self._show_features, explorer),
        )

    def _enable(self, running: bool) -> None:
        """Nothing to enable: the table fills when the summary is done."""

    def _on_progress(self, p: Progress) -> None:
        if self.jobs.alive:
            self.panel.show_progress(p.done, p.total, self.status.text())

    def _show_features(self, explorer, table: pd.DataFrame) -> None:
        if not self.jobs.alive or self.session.explorer is not explorer:
            return
        first = self.features is None
        self.features = table
        if first:
            self._raise_dock()
        shown = with_names(table, self.notes, self.descriptions)
        self.model.set_frame(shown, headers(shown))
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
        self._describe(explorer)

    def _describe(self, explorer) -> None:
        """Describe the features by the measurements that follow them (in a worker; measured
        once per store and cached beside it), then add the column to the table."""
        plate = self._gallery_plate(explorer)
        if plate is None:
            return
        from ..analysis.measurements import describe_store

        def work(progress=None, cancel=None):
            codes, _ = explorer.cell_codes()
            return describe_store(explorer.store, codes, plate=plate, cancel=cancel)

        job = Job(work)
        job.returned.connect(partial(self._show_descriptions, explorer))
        job.errored.connect(partial(self._fail, "Cannot describe the features"))
        self.jobs.run(job)

    def _show_descriptions(self, explorer, described) -> None:
        if not self.jobs.alive or self.session.explorer is not explorer or described is None:
            return
        self.descriptions = described
        self._refresh_table()
        self._show_name(self.session.feature)

    def _refresh_table(self) -> None:
        if self.features is None:
            return
        shown = with_names(self.features, self.notes, self.descriptions)
        self.model.set_frame(shown, headers(shown))
        self._fit_description()
        self._sync_row(self.session.feature)

    def _fit_description(self) -> None:
        """Descriptions are long: their column gets a fixed share of the table (the full text
        is its tooltip), so the numbers beside it stay in view."""
        header = self.table.horizontalHeader()
        col = self._column("description")
        for c in range(self.model.columnCount()):
            mode = QHeaderView.ResizeMode.Interactive if c == col else None
            header.setSectionResizeMode(c, mode or QHeaderView.ResizeMode.ResizeToContents)
        if col >= 0:
            header.resizeSection(col, max(220, int(self.table.viewport().width() * 0.45)))

    def _raise_dock(self) -> None:
        """Bring the explorer's tab to the front when its table is ready (it shares the dock
        area with the navigator, Embed and Dictionary; see ``_open.dock_widgets``)."""
        parent = self.parentWidget()
        while parent is not None and not hasattr(parent, "toggleViewAction"):
            parent = parent.parentWidget()
        if parent is not None:
            parent.raise_()

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
        self._show_name(feature)
        explorer = self.session.explorer
        self.threshold_button.setEnabled(feature is not None and explorer is not None)
        if feature is None or explorer is None:
            return
        self.threshold_button.setText(f"Cells with feature {feature} ≥")
        self._suggest_threshold(feature)
        ticket = self._next_gallery()
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
        job.returned.connect(partial(self._show_top_cells, explorer, feature, ticket))
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
            if not (isinstance(layer, Image) and layer.visible):
                continue
            # a plate's channel, or a user's layer embedded as a stain (Embed: layers)
            name = meta.get("channel", layer.name) if meta.get("role") == "channel" else None
            name = meta.get("stain") if name is None and not meta.get("role") else name
            if name is not None:
                rgb = tuple(float(v) for v in layer.colormap.colors[-1][:3])
                colours[name] = rgb or named_colour("gray")
        plate = self.session.plate
        if not colours and plate is not None:  # stains of a stack: their Cell Painting colours
            from ..views.channels import channel_colormaps

            names = plate.channel_names
            colours = {
                n: named_colour(c) for n, c in zip(names, channel_colormaps(names), strict=True)
            }
        return colours

    def _next_gallery(self) -> int:
        self._gallery_ticket += 1
        return self._gallery_ticket

    def _show_top_cells(self, explorer, feature: int, ticket: int, thumbs: list[Thumbnail]):
        s = self.session
        if not self.jobs.alive or s.explorer is not explorer or s.feature != feature:
            return
        cells = pd.DataFrame(
            [(t.plate, t.well, t.site, t.label, t.value) for t in thumbs],
            columns=["plate", "well", "site", "label", "value"],
        )
        self._show_gallery(
            explorer,
            ticket,
            thumbs,
            "activation",
            f"Top {len(thumbs)} cells of feature {feature} across the store (value under each)."
            if thumbs
            else f"Feature {feature} is not active on any cell.",
        )
        if thumbs and ticket == self._gallery_ticket:
            self._set_selection(cells, f"the top {len(cells)} cells of feature {feature}")

    def _show_gallery(self, explorer, ticket, thumbs: list[Thumbnail], what: str, text: str):
        if (
            not self.jobs.alive
            or self.session.explorer is not explorer
            or ticket != self._gallery_ticket
        ):
            return
        self.thumbnails = thumbs
        self.gallery.clear()
        for t in thumbs:
            item = QListWidgetItem(QIcon(QPixmap.fromImage(_qimage(t.rgb))), f"{t.value:.2g}")
            item.setToolTip(
                f"{t.plate} {t.well} site {t.site}, cell {t.label}: {what} {t.value:.3g}\n"
                "Click to open this site and centre the cell."
            )
            self.gallery.addItem(item)
        self.gallery_label.setText(text)

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
        self.similar_button.setEnabled(True)
        self.similar_button.setText(f"Find cells like cell {label}")
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
        self.similar_button.setEnabled(False)
        self.similar_button.setText("Find similar cells")
        self.cell_table = pd.DataFrame(columns=["feature", "value", "top"])
        self.cell_model.set_frame(pd.DataFrame())
        self.cell_label.setText("Click a cell in the viewer to list its strongest features.")

    def _on_cell_feature_clicked(self, index) -> None:
        if index.isValid() and index.row() < len(self.cell_table):
            self.session.select_feature(int(self.cell_table["feature"].iloc[index.row()]))

    def _fail(self, doing: str, exc: BaseException) -> None:
        self.panel.fail(user_message(exc, doing))

    # --- similar cells, selections and exports ----------------------------------------------

    def find_similar(self) -> None:
        """What "Find cells like cell N" does: the store's cells most like the clicked cell,
        as a gallery in the Cells tab (and the selection to export)."""
        s = self.session
        explorer, key, label = s.explorer, s.site_key, s.cell
        if explorer is None or key is None or label is None:
            return
        plate = self._gallery_plate(explorer)
        if plate is None:
            return
        ticket = self._next_gallery()
        self.tabs.setCurrentWidget(self.gallery_tab)
        self.thumbnails = []
        self.gallery.clear()
        self.gallery_label.setText(f"Finding the cells most like cell {label} of {key}…")

        def described(cells, thumbs):
            return (
                f"The {len(thumbs)} cells most like cell {label} of {key} across the store "
                "(cosine similarity of their codes under each; the cell itself left out).",
                f"the {len(cells)} cells most like cell {label} of {key}",
            )

        self._cell_set(
            explorer,
            plate,
            ticket,
            lambda: similar_cells(explorer, key, label, n=N_TOP),
            ("similarity", "cosine similarity"),
            f"Cannot find cells like cell {label}",
            described,
        )

    def select_above(self) -> None:
        """What "Cells with feature f ≥" does: select every cell of the store at or above the
        threshold; the strongest fill the gallery."""
        explorer, feature = self.session.explorer, self.session.feature
        if explorer is None or feature is None:
            return
        plate = self._gallery_plate(explorer)
        if plate is None:
            return
        threshold = float(self.threshold.value())
        ticket = self._next_gallery()
        self.tabs.setCurrentWidget(self.gallery_tab)
        n_cells = len(explorer.store.table("cell"))

        def described(cells, thumbs):
            return (
                f"{len(cells)} of {n_cells} cells have feature {feature} ≥ {threshold:g}; the "
                f"strongest {len(thumbs)} are shown.",
                f"the {len(cells)} cells with feature {feature} ≥ {threshold:g}",
            )

        self._cell_set(
            explorer,
            plate,
            ticket,
            lambda: cells_above(explorer, feature, threshold),
            ("value", "activation"),
            f"Cannot select the cells of feature {feature}",
            described,
        )

    def _cell_set(self, explorer, plate, ticket, find, value, failed, described) -> None:
        """The cells ``find()`` gives (in a worker): the strongest ``N_TOP`` fill the gallery,
        with their ``value`` column (name, shown name) under each; all become the selection.
        ``described(cells, thumbs)`` gives the gallery's caption and the selection's name."""
        colours = self._channel_colours()

        def work(progress=None, cancel=None):
            cells = find()
            thumbs = cell_thumbnails(
                explorer,
                plate,
                cells.head(N_TOP),
                colours,
                value=value[0],
                size=THUMB,
                cancel=cancel,
            )
            return cells, thumbs

        job = Job(work)
        job.returned.connect(partial(self._show_cell_set, explorer, ticket, value[1], described))
        job.errored.connect(partial(self._fail, failed))
        self.jobs.run(job)

    def _show_cell_set(self, explorer, ticket, shown, described, result) -> None:
        if not self.jobs.alive:
            return
        cells, thumbs = result
        caption, what = described(cells, thumbs)
        self._show_gallery(explorer, ticket, thumbs, shown, caption)
        if ticket == self._gallery_ticket:
            self._set_selection(cells, what)

    def _suggest_threshold(self, feature: int) -> None:
        """Start the threshold at the feature's mean code where active (a typical 'on')."""
        if self.features is None:
            return
        row = self.features[self.features["feature"] == int(feature)]
        if len(row) and "mean_activation" in row.columns:
            self.threshold.setValue(float(row["mean_activation"].iloc[0]))

    def _set_selection(self, cells: pd.DataFrame | None, what: str) -> None:
        self.selection = cells
        self.selection_what = what
        on = cells is not None and len(cells) > 0
        tip = f"Selected: {what}." if on else "Nothing selected yet."
        for b in (self.save_button, self.layer_button, self.labels_button):
            b.setEnabled(on)
            b.setStatusTip(tip)

    def save_selection(self, path) -> str | None:
        """Write the selected cells to ``path`` as CSV (with the selected feature's value)."""
        explorer, cells = self.session.explorer, self.selection
        if explorer is None or cells is None:
            return None
        try:
            if self.session.feature is not None:
                cells = with_feature(explorer, cells, self.session.feature)
            written = write_cells_csv(cells, path)
        except (ConceptDiscoveryError, OSError, ValueError) as exc:
            self._fail(f"Cannot save the selected cells to {path}", exc)
            return None
        self.status.setText(f"Saved {self.selection_what} to {written}.")
        return str(written)

    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the selected cells", "cells.csv", "CSV (*.csv);;All files (*)"
        )
        if path:
            self.save_selection(path)

    def save_selection_labels(self, folder) -> str | None:
        """Write the selected cells as one label image per site into ``folder``."""
        explorer, cells = self.session.explorer, self.selection
        if explorer is None or cells is None:
            return None
        try:
            written = write_selection_labels(explorer, cells, folder, what=self.selection_what)
        except (ConceptDiscoveryError, OSError, ValueError) as exc:
            self._fail(f"Cannot save the selected cells' labels to {folder}", exc)
            return None
        n = len(cells[["plate", "well", "site"]].drop_duplicates())
        self.status.setText(
            f"Saved label images of {self.selection_what} ({n} sites) to {written}."
        )
        return str(written)

    def _choose_labels(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Folder for the selected cells' label images", "selected_cells", "Folder (*)"
        )
        if path:
            self.save_selection_labels(path)

    def show_selection_layer(self):
        """Add (or refresh) a Labels layer with the selected cells of the site in view."""
        explorer, key, cells = self.session.explorer, self.session.site_key, self.selection
        if explorer is None or key is None or cells is None:
            return None
        try:
            data = selection_labels(cells, key, explorer.labels(key))
        except (ConceptDiscoveryError, OSError, KeyError) as exc:
            self._fail("Cannot draw the selected cells", exc)
            return None
        n_here = len(np.unique(data)) - (1 if (data == 0).any() else 0)
        meta = {"role": "selection", "site_key": tuple(key), "what": self.selection_what}
        if SELECTION_LAYER in self.viewer.layers:
            layer = self.viewer.layers[SELECTION_LAYER]
            layer.data = data
            layer.metadata.update(meta)
        else:
            layer = self.viewer.add_labels(data, name=SELECTION_LAYER, metadata=meta)
        self.status.setText(
            f"{SELECTION_LAYER!r}: {n_here} of {self.selection_what} are on {key}"
            + ("." if n_here else "; open one of their sites to see them.")
        )
        return layer

    # --- names and notes ----------------------------------------------------------------------

    def _load_notes(self, dictionary) -> None:
        path = getattr(dictionary, "path", None)
        if path is None:
            self.notes = None
            return
        try:
            self.notes = load_notes(path)
        except ConceptDiscoveryError as exc:
            self.notes = None
            self._fail("Cannot read the feature names", exc)

    def _show_name(self, feature) -> None:
        on = feature is not None
        for w in (self.name_edit, self.note_edit, self.name_button):
            w.setEnabled(on)
        if not on:
            self.name_edit.clear()
            self.note_edit.clear()
            self.description_label.clear()
            self.feature_label.setText("Select a feature in the table above.")
            return
        self.description_label.setText(self._description_text(feature))
        notes = self.notes
        self.name_edit.setText("" if notes is None else notes.name(feature))
        self.note_edit.setPlainText("" if notes is None else notes.note(feature))
        where = getattr(self.session.dictionary, "path", None)
        self.feature_label.setText(
            f"Feature {feature}: name it and keep a note; saved beside {where.name}."
            if where is not None
            else f"Feature {feature}: save the dictionary to a file (Dictionary widget) to keep "
            "names beside it."
        )
        self.name_button.setEnabled(where is not None)
        self._update_card()

    def _description_text(self, feature) -> str:
        d = self.descriptions
        if d is None:
            return "Measurements that follow it: being measured…"
        row = d[d["feature"] == int(feature)]
        text = str(row["description"].iloc[0]) if len(row) else ""
        if not text:
            return NO_DESCRIPTION[:1].upper() + NO_DESCRIPTION[1:] + "."
        return f"Measurements that follow it: {text}"

    # --- the feature card ---------------------------------------------------------------------

    def _on_tab_changed(self, *_) -> None:
        self._update_card()

    def _update_card(self) -> None:
        """Draw the selected feature's card (in a worker) when the card's tab is shown."""
        explorer, feature = self.session.explorer, self.session.feature
        if self.tabs.currentWidget() is not self.feature_tab:
            return
        if explorer is None or feature is None or self._card_for == feature:
            return
        plate = self._gallery_plate(explorer)
        self._card_for = feature
        self._card_ticket += 1
        ticket = self._card_ticket
        self.card_label.setText(f"Drawing the card of feature {feature}…")
        notes = self.notes
        name = "" if notes is None else notes.name(feature)
        d = self.descriptions
        described = ""
        if d is not None and (d["feature"] == feature).any():
            described = str(d.loc[d["feature"] == feature, "description"].iloc[0])
        colours = self._channel_colours()
        # the tab's width less margins and a vertical scroll bar, so the card never scrolls
        # sideways (the scroll area itself has no width yet when its tab is first shown)
        width = max(360, self.tabs.width() - 48)
        column = _top_column(self.features, feature)

        def work(progress=None, cancel=None):
            card = card_data(
                explorer,
                feature,
                plate=plate,
                colours=colours,
                column=column,
                name=name,
                description=described,
                cancel=cancel,
            )
            return card_figure(card, width_px=width)

        job = Job(work)
        job.returned.connect(partial(self._show_card, explorer, feature, ticket))
        job.errored.connect(partial(self._card_failed, feature))
        self.jobs.run(job)

    def _card_failed(self, feature, exc) -> None:
        self._card_for = None
        if not isinstance(exc, Cancelled):
            self._fail(f"Cannot draw the card of feature {feature}", exc)

    def _show_card(self, explorer, feature, ticket, rgb) -> None:
        if (
            not self.jobs.alive
            or ticket != self._card_ticket
            or self.session.explorer is not explorer
            or self.session.feature != feature
        ):
            return
        self.card_image = rgb
        self.card_label.setPixmap(QPixmap.fromImage(_qimage(rgb)))

    def save_name(self) -> str | None:
        """What "Save name" does: keep the typed name and note beside the dictionary file."""
        feature, dictionary = self.session.feature, self.session.dictionary
        path = getattr(dictionary, "path", None)
        if feature is None or path is None:
            return None
        try:
            if self.notes is None:
                self.notes = load_notes(path)
            self.notes.set(feature, self.name_edit.text(), self.note_edit.toPlainText())
            written = save_notes(self.notes, path)
        except (ConceptDiscoveryError, OSError) as exc:
            self._fail(f"Cannot save the name of feature {feature}", exc)
            return None
        self._refresh_table()
        self._card_for = None
        self._update_card()
        self.status.setText(f"Saved the name of feature {feature} to {written.name}.")
        return str(written)


def _top_column(table: pd.DataFrame | None, feature: int) -> str | None:
    """The label column a feature is most selective for, from the shown table's ``top``."""
    if table is None or "top" not in table.columns:
        return None
    row = table[table["feature"] == int(feature)]
    top = str(row["top"].iloc[0]) if len(row) else ""
    return top.split("=", 1)[0] if "=" in top else None
