"""Embed dock widget: run a model on the plate (or the site in view) into an activation store.

The form is built from ``EmbedSettings`` and the model menu from ``models.list_models``; the
run is :func:`~napari_concept_discovery.embed.plate.embed_plate` in a thread worker, the
same call as ``concept-discovery embed``, so a store that matches is reused, not recomputed.
An existing store can be opened instead. Either way the store becomes the session's
(docs/architecture.md, "The activation store").

The site may also come from image and labels layers a user already has, from any reader
("Layers in the viewer"): a form maps layers to stains, the site is saved as a one-site plate
folder and embedded the same way (:mod:`..views.layer_site`), and those layers become the
session's site.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from ..views.layer_site import embed_layer_site, site_image, stains_for, whitening_groups
from ..views.workspace import default_store_path, one_site_plate
from ._form import make_fields, scrolling_layout, values
from ._jobs import Job
from ._layer_form import LayerSiteForm, layer_pixels
from ._layers import FEATURE_ROLES
from ._step import StepWidget
from ._viewer import get_link, get_painter, observe, user_message

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
        # the precision's "auto" says what it is on the device chosen
        self.device_combo.currentTextChanged.connect(self._say_auto_precision)
        self._say_auto_precision(self.device_combo.currentText())
        self.whole_plate = QRadioButton("Whole plate")
        self.whole_plate.setToolTip("Embed every site of the plate into one store.")
        self.site_in_view = QRadioButton("Site in view")
        self.site_in_view.setToolTip("Embed only the site shown now (quick, to try a model).")
        self.from_layers = QRadioButton("Layers in the viewer")
        self.from_layers.setToolTip(
            "Embed image layers you opened with any reader (napari's own, napari-ome-zarr, "
            "drag and drop): say which layer is which stain below."
        )
        self.whole_plate.setChecked(True)
        self._scope = QButtonGroup(self)
        self._scope.addButton(self.whole_plate)
        self._scope.addButton(self.site_in_view)
        self._scope.addButton(self.from_layers)
        self.layer_form = LayerSiteForm(napari_viewer, self._stains())
        self.layer_form.setVisible(False)
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
        form.addRow("", self.from_layers)
        form.addRow(self.layer_form)
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
        self.from_layers.toggled.connect(self._on_source_toggled)
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
                (self.session.dictionary_changed, self._update_stains),
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

    def _say_auto_precision(self, device: str) -> None:
        combo = self.fields["precision"].widget
        combo.setItemText(combo.findData("auto"), f"auto ({_auto_precision(device)})")

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
        if self.from_layers.isChecked():
            return self._run_layers()
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

    def _stains(self) -> tuple[str, ...]:
        s = self.session
        return stains_for(s.dictionary, s.store, s.plate)

    def _update_stains(self, *_) -> None:
        if not self.panel.running:
            self.layer_form.set_stains(self._stains())
            self.layer_form.set_groups(*whitening_groups(self.session.dictionary))

    def _on_source_toggled(self, on: bool) -> None:
        self.layer_form.setVisible(on)
        if on:
            self._update_stains()
            self.layer_form.refresh()
        self._enable(self.panel.running)
        self._update_out()

    def _layers_parent(self, names) -> Path:
        """Where the layers' site is saved: beside the store the user chose, else beside the
        first stain's file when its reader names one, else the working folder."""
        out = self.out_path()
        if self._out_edited and out is not None:
            return out.parent
        for layer in self.viewer.layers:
            path = getattr(layer.source, "path", None)
            if layer.name in names and path:
                return Path(path).parent
        return Path.cwd()

    def _run_layers(self) -> Job | None:
        """Embed the site the layers make (stains as mapped, cells from the chosen layer)."""
        form = self.layer_form
        try:
            settings = self.settings()
            mapping = form.mapping()
            image = site_image(mapping, form.arrays())
            cells = form.cells_layer()
            labels = None if cells is None else np.asarray(layer_pixels(cells))
            world = form.geometry()
            metadata = form.metadata()
            names = {p.layer for p in mapping.values()}
            out = self.out_path() if self._out_edited else None
            parent = self._layers_parent(names)
        except ConceptDiscoveryError as exc:
            self.panel.fail(user_message(exc, "Cannot embed these layers"))
            return None
        stains = list(mapping)
        what = "segmenting the stains" if cells is None else f"cells of layer {cells.name!r}"
        return self.panel.start(
            Job(
                embed_layer_site,
                parent,
                image,
                stains,
                labels,
                settings,
                out,
                labels_name="cells" if cells is None else cells.name,
                metadata=metadata,
            ),
            f"Embedding the layers' site ({', '.join(stains)}; {what}) with {settings.model}…",
            failed="Embedding the layers failed",
            progressed=self._on_progress,
            returned=lambda store: self._on_layers_embedded(store, cells, world),
        )

    def _on_layers_embedded(self, store, cells: Labels | None, world) -> None:
        """The layers become the session's site: their plate and store, their cells layer
        (or one of the segmentation, added) the one whose ``features`` get the codes; features
        are painted where the layers lie in the world (``world``: their scale and translate)."""
        if not self.jobs.alive or store is None:
            self._on_embedded(store)
            return
        try:
            plate = reopen_plate(store)
        except ConceptDiscoveryError as exc:
            self.panel.fail(user_message(exc, "Cannot open the saved site"))
            return
        remember_plate(plate)
        key = plate.keys[0]
        root = str(plate.root)
        get_link(self.viewer).user_sites.add((root, tuple(key)))
        get_painter(self.viewer).world[(root, tuple(key))] = world
        tag = {"role": "cells", "plate_path": root, "site_key": tuple(key)}
        self.session.set_plate(plate, key)
        for stain, plane in self.layer_form.mapping().items():  # gallery colours follow them
            layer = next((x for x in self.viewer.layers if plane and x.name == plane.layer), None)
            if layer is not None and plane.channel is None:
                layer.metadata = {**layer.metadata, "stain": stain}
        if cells is not None:
            cells.metadata = {**cells.metadata, **tag}
        elif not any(
            layer.metadata.get("role") == "cells" and layer.metadata.get("plate_path") == root
            for layer in self.viewer.layers
        ):
            scale, translate = world
            self.viewer.add_labels(
                store.site_labels(key),
                name="cells",
                metadata=tag,
                scale=scale,
                translate=translate,
            )
        self._on_embedded(store)
        self.layer_form.refresh()

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
        if self._out_edited or self.model_source.startswith("\x00"):
            return
        if self.from_layers.isChecked():
            self.out_edit.setText("")
            self.out_edit.setPlaceholderText("beside the saved layers (layers-<hash>-…zarr)")
            return
        if plate is None:
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
            self.plate_label.setText("none: open a plate folder, or embed layers in the viewer")
        else:
            self.plate_label.setText(f"{plate.root.name} ({len(plate)} sites)")
            self.plate_label.setToolTip(str(plate.root))
        self.run_button.setEnabled(
            (plate is not None or self.from_layers.isChecked()) and not self.jobs.busy
        )
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
        ready = self.session.plate is not None or self.from_layers.isChecked()
        self.run_button.setEnabled(not running and ready)
        self.open_button.setEnabled(not running)


def _resolved_precision(settings: EmbedSettings) -> str:
    """What ``auto`` means on the device the form names (bf16 where it is native)."""
    from ..embed.compute import resolve_precision
    from ..models import pick_device

    try:
        return resolve_precision(settings.precision, pick_device(settings.device))
    except ConceptDiscoveryError:
        return settings.precision


def _auto_precision(device: str) -> str:
    """What ``auto`` is on ``device`` and why: "bf16: this CPU has native bf16"."""
    from ..embed.compute import auto_precision_reason, resolve_precision
    from ..models import pick_device

    try:
        dev = pick_device(device)
    except ConceptDiscoveryError:
        return f"{device} is not available here"
    return f"{resolve_precision('auto', dev)}: {auto_precision_reason(dev)}"


def _describe(store: ActivationStore) -> str:
    counts = store.attrs.get("counts", {})
    return (
        f"{store.path.name}: {store.model_id} block {store.block} at {store.precision}, "
        f"{counts.get('cell', 0)} cells in {len(store.sites())} sites"
    )
