"""Embed dock widget: run a model on the plate (or the site in view) into an activation store.

The form is built from ``EmbedSettings`` and the model menu from ``models.list_models``; the
run is :func:`~napari_concept_discovery.embed.plate.embed_plate` in a thread worker, the
same call as ``concept-discovery embed``, so a store that matches is reused, not recomputed.
An existing store can be opened instead. Either way the store becomes the session's
(docs/architecture.md, "The activation store").
"""

from __future__ import annotations

from pathlib import Path

from napari.layers import Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QToolButton,
    QWidget,
)

from .._reader import remember_plate
from ..embed.plate import EmbedSettings, embed_plate, reopen_plate
from ..embed.store import ActivationStore
from ..errors import ConceptDiscoveryError
from ..models import list_models
from ..progress import Progress
from ..settings import SegmentSettings
from ..views.workspace import default_store_path, one_site_plate
from ._form import make_fields, scrolling_layout, values
from ._jobs import Job
from ._layers import FEATURE_ROLES
from ._step import StepWidget
from ._viewer import get_painter, observe, user_message

_PICK_FOLDER = "\x00folder"
_PICK_FILE = "\x00file"
DEVICES = ("auto", "cpu", "cuda", "mps")


class EmbedWidget(StepWidget):
    """Dock widget: model, block, device and cells; embed the plate or the site in view."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(
            napari_viewer,
            parent,
            cancel_tip="Stop after the site being embedded; finished sites stay.",
            cancelling="Cancelling after the site being embedded…",
        )
        self._out_edited = False

        self.plate_label = QLabel()
        self.plate_label.setWordWrap(True)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "The foundation model whose activations are kept. 'default' is bundled and works "
            "offline; pick a model folder or checkpoint file of your own at the bottom."
        )
        for info in list_models():
            text = info.name if info.available else f"{info.name} (downloads on first use)"
            self.model_combo.addItem(text, info.source)
            self.model_combo.setItemData(
                self.model_combo.count() - 1,
                f"{info.source}: {info.description}",
                Qt.ItemDataRole.ToolTipRole,
            )
        self.model_combo.addItem("Model folder…", _PICK_FOLDER)
        self.model_combo.addItem("Checkpoint file…", _PICK_FILE)
        #: the segmentation fields, as ``EmbedSettings.segment`` holds them
        self.segment_fields = make_fields(SegmentSettings, ["segmenter", "cellpose_model"])
        self.fields = {
            **make_fields(EmbedSettings, ["block", "cells"]),
            **self.segment_fields,
            **make_fields(EmbedSettings, ["batch_size", "precision"]),
        }
        # the Cellpose model matters only with the Cellpose segmenter
        segmenter = self.fields["segmenter"].widget
        segmenter.currentTextChanged.connect(self._segmenter_changed)
        self._segmenter_changed(segmenter.currentText())
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setToolTip(
            "Where the model runs: auto picks CUDA, then Apple MPS, then the CPU."
        )
        self.whole_plate = QRadioButton("Whole plate")
        self.whole_plate.setToolTip("Embed every site of the plate into one store.")
        self.site_in_view = QRadioButton("Site in view")
        self.site_in_view.setToolTip("Embed only the site shown now (quick, to try a model).")
        self.whole_plate.setChecked(True)
        self._scope = QButtonGroup(self)
        self._scope.addButton(self.whole_plate)
        self._scope.addButton(self.site_in_view)
        self.out_edit = QLineEdit()
        self.out_edit.setToolTip(
            "Store folder. By default beside the plate folder, named after the plate, model and "
            "block; a store there that matches is reused."
        )
        self.out_button = QToolButton()
        self.out_button.setText("…")
        self.out_button.setToolTip("Choose the store folder.")
        self.run_button = QPushButton("Embed")
        self.run_button.setToolTip("Run the model and keep its activations in the store.")
        self.open_button = QPushButton("Open store…")
        self.open_button.setToolTip("Use an activation store embedded before (a .zarr folder).")
        self.cells_combo = QComboBox()
        self.cells_combo.setToolTip(
            "The cells of the site in view: the plate's segmentation, or a Labels layer you drew "
            "or loaded. Choosing a layer embeds the site again with the store's model, its "
            "cells pooled over that layer's labels, and paints the feature on them."
        )
        self._fill_cells()

        form = QFormLayout()
        form.addRow("Plate", self.plate_label)
        form.addRow("Model", self.model_combo)
        for f in self.fields.values():
            form.addRow(f.label, f.widget)
        form.addRow("Device", self.device_combo)
        scope = QHBoxLayout()
        scope.addWidget(self.whole_plate)
        scope.addWidget(self.site_in_view)
        form.addRow("Embed", scope)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.out_button)
        form.addRow("Store", out_row)
        form.addRow("Cells in view", self.cells_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.open_button)
        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(self._update_out)
        self.fields["block"].widget.valueChanged.connect(self._update_out)
        self.whole_plate.toggled.connect(self._update_out)
        self.out_edit.textEdited.connect(self._on_out_edited)
        self.out_button.clicked.connect(self._choose_out)
        self.run_button.clicked.connect(self.run)
        self.open_button.clicked.connect(self._choose_store)
        self.cells_combo.activated.connect(self._on_cells_chosen)
        layer_events = napari_viewer.layers.events
        observe(
            self,
            (
                (self.session.plate_changed, self._on_plate_changed),
                (self.session.site_changed, self._update_out),
                (self.session.store_changed, self._on_store_changed),
                (self.session.site_changed, self._reset_cells),
                (layer_events.inserted, self._fill_cells),
                (layer_events.removed, self._fill_cells),
            ),
        )
        self._on_plate_changed(self.session.plate)
        self._on_store_changed(self.session.store)

    # --- what a user does -----------------------------------------------------------------

    @property
    def model_source(self) -> str:
        return str(self.model_combo.currentData())

    def set_model(self, source: str) -> None:
        """Pick a model by source (one of the menu's, or a path, added to the menu)."""
        i = self.model_combo.findData(source)
        if i < 0:
            i = self.model_combo.count() - 2  # before the two "pick…" entries
            self.model_combo.insertItem(i, Path(source).name or source, source)
            self.model_combo.setItemData(i, source, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(i)

    def _segmenter_changed(self, name: str) -> None:
        self.fields["cellpose_model"].widget.setEnabled(name == "cellpose")

    def settings(self) -> EmbedSettings:
        """The form as ``EmbedSettings`` (SettingsError names a bad field)."""
        device = self.device_combo.currentText()
        segment = SegmentSettings(**values(self.segment_fields))
        own = {n: f.value() for n, f in self.fields.items() if n not in self.segment_fields}
        return EmbedSettings(
            model=self.model_source,
            device=None if device == "auto" else device,
            segment=segment,
            **own,
        )

    def out_path(self) -> Path | None:
        text = self.out_edit.text().strip()
        return Path(text).expanduser() if text else None

    def run(self) -> Job | None:
        """Embed with the form's settings; the store becomes the session's when it is done."""
        if self.panel.running:
            return self.job
        plate = self.session.plate
        if plate is None:
            self.panel.fail("Open a plate first (File > Open Folder, or the plate navigator).")
            return None
        try:
            settings = self.settings()
            out = self.out_path()
            if out is None:
                raise ConceptDiscoveryError("choose a folder for the activation store")
            if self.site_in_view.isChecked():
                if self.session.site_key is None:
                    raise ConceptDiscoveryError("no site is in view")
                plate = one_site_plate(plate, self.session.site_key)
        except (ConceptDiscoveryError, KeyError) as exc:
            self.panel.fail(user_message(exc, "Cannot embed"))
            return None
        return self.panel.start(
            Job(embed_plate, plate, settings, out),
            f"Embedding {len(plate)} site(s) with {settings.model} at "
            f"{_resolved_precision(settings)}…",
            failed="Embedding failed",
            progressed=self._on_progress,
            returned=self._on_embedded,
        )

    def open_store(self, path: str | Path) -> ActivationStore | None:
        """Use an existing store; its plate is opened when it is not the one in view."""
        try:
            store = ActivationStore.open(path)
            plate = self.session.plate
            recorded = store.plate_source.get("path")
            if plate is None or (
                recorded and Path(recorded).resolve() != Path(plate.root).resolve()
            ):
                plate = reopen_plate(store)
                remember_plate(plate)
                self.session.set_plate(plate)
        except (ConceptDiscoveryError, KeyError, OSError) as exc:
            self.panel.fail(user_message(exc, f"Could not open the store {path}"))
            return None
        self.session.set_store(store)
        self.status.setText(f"Opened {_describe(store)}.")
        return store

    def use_cells(self, layer_name: str | None) -> Job | None:
        """Take the Labels layer ``layer_name`` as the cells of the site in view (None: the
        segmentation), as choosing it in "Cells in view" does."""
        i = self.cells_combo.findData(layer_name) if layer_name else 0
        if i < 0:
            self.panel.fail(
                f"There is no Labels layer named {layer_name!r} to take the cells from."
            )
            return None
        self.cells_combo.setCurrentIndex(i)
        return self._on_cells_chosen(i)

    # --- reactions ------------------------------------------------------------------------

    def _cell_layers(self) -> list[Labels]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get("role") not in FEATURE_ROLES
        ]

    def _fill_cells(self, *_) -> None:
        current = self.cells_combo.currentData()
        self.cells_combo.blockSignals(True)
        self.cells_combo.clear()
        self.cells_combo.addItem("Segmentation", None)
        for layer in self._cell_layers():
            self.cells_combo.addItem(f"Layer: {layer.name}", layer.name)
        i = self.cells_combo.findData(current) if current else 0
        self.cells_combo.setCurrentIndex(max(i, 0))
        self.cells_combo.blockSignals(False)

    def _reset_cells(self, *_) -> None:
        """A new site starts on the segmentation (each site keeps the cells chosen for it)."""
        self.cells_combo.setCurrentIndex(0)

    def _on_cells_chosen(self, index: int) -> Job | None:
        name = self.cells_combo.itemData(index)
        layer = next((x for x in self._cell_layers() if x.name == name), None)
        if name is not None and layer is None:
            self.panel.fail(f"The Labels layer {name!r} is gone; choose another.")
            return None
        painter = get_painter(self.viewer)
        job = painter.use_cells(None if layer is None else layer.data)
        if job is not None:
            what = "the segmentation" if layer is None else f"the labels of layer {name!r}"
            self.status.setText(f"Cells of {self.session.site_key}: {what}.")
        return job

    def _on_model_activated(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data not in (_PICK_FOLDER, _PICK_FILE):
            return
        if data == _PICK_FOLDER:
            path = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        else:
            path, _ = QFileDialog.getOpenFileName(
                self,
                "Choose a checkpoint file",
                "",
                "Checkpoints (*.safetensors *.pth *.pt *.bin *.ckpt);;All files (*)",
            )
        if path:
            self.set_model(path)
        else:
            self.model_combo.setCurrentIndex(0)

    def _on_out_edited(self, *_) -> None:
        self._out_edited = True

    def _choose_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder for the activation store")
        if path:
            self.out_edit.setText(path)
            self._out_edited = True

    def _choose_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open an activation store (.zarr folder)")
        if path:
            self.open_store(path)

    def _update_out(self, *_) -> None:
        plate = self.session.plate
        if self._out_edited or plate is None or self.model_source.startswith("\x00"):
            return
        site = self.session.site_key if self.site_in_view.isChecked() else None
        self.out_edit.setText(
            str(
                default_store_path(
                    plate.root, self.model_source, self.fields["block"].value(), site
                )
            )
        )

    def _on_plate_changed(self, plate) -> None:
        if plate is None:
            self.plate_label.setText("none: open a plate folder first")
        else:
            self.plate_label.setText(f"{plate.root.name} ({len(plate)} sites)")
            self.plate_label.setToolTip(str(plate.root))
        self.run_button.setEnabled(plate is not None and not self.jobs.busy)
        self._out_edited = False
        self._update_out()

    def _on_store_changed(self, store) -> None:
        if store is not None and not self.jobs.busy:
            self.status.setText(f"In use: {_describe(store)}.")

    def _on_progress(self, p: Progress) -> None:
        if not self.jobs.alive or p.stage != "embed":
            return
        site = p.info.get("site")
        self.panel.show_progress(
            p.done,
            p.total,
            f"Embedded {p.done} of {p.total} sites" + (f" (last: {site})" if site else ""),
        )

    def _on_embedded(self, store) -> None:
        if not self.jobs.alive:
            return
        if store is None:
            self.status.setText(
                "Cancelled: the finished sites are kept; Embed again to continue where it stopped."
            )
            return
        self.session.set_store(store)
        text = f"{_describe(store)}" + (
            " (reused: a store with the same images, model and block was there)"
            if store.reused
            else ""
        )
        self.status.setText(f"Done: {text}.")
        show_info(f"Activation store ready: {text}")

    def _enable(self, running: bool) -> None:
        self.run_button.setEnabled(not running and self.session.plate is not None)
        self.open_button.setEnabled(not running)


def _resolved_precision(settings: EmbedSettings) -> str:
    """What ``auto`` means on the device the form names (bf16 where it is native)."""
    from ..embed.compute import resolve_precision
    from ..models import pick_device

    try:
        return resolve_precision(settings.precision, pick_device(settings.device))
    except ConceptDiscoveryError:
        return settings.precision


def _describe(store: ActivationStore) -> str:
    counts = store.attrs.get("counts", {})
    return (
        f"{store.path.name}: {store.model_id} block {store.block} at {store.precision}, "
        f"{counts.get('cell', 0)} cells in {len(store.sites())} sites"
    )
