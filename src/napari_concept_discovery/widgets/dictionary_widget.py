"""Dictionary dock widget: train ICFL or TopK on the session's store, or load a dictionary file.

The form comes from ``TrainSettings`` and ``WhitenSettings``; the control and group dropdowns
from the store's token table (:func:`~napari_concept_discovery.views.forms.metadata_choices`).
Training is :func:`~napari_concept_discovery.dictionary.pipeline.train_on_store` in a thread
worker, the call ``concept-discovery train`` makes; cancel keeps the dictionary after the last
complete step. A loaded file is checked against the store (``check_compatible_store``) and
refused with both sides named (docs/architecture.md, "Dictionaries").
"""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from ..dictionary.config import FIRST_ATOMS
from ..dictionary.io import load_dictionary, save_dictionary
from ..dictionary.overfit import check_words
from ..dictionary.pipeline import train_on_store
from ..dictionary.settings import (
    FIRST_STEPS,
    TrainSettings,
    WhitenSettings,
    first_atoms,
    first_steps,
)
from ..errors import ConceptDiscoveryError
from ..progress import Progress
from ..views.forms import TrainingCurves, group_choices, guess_control, metadata_choices
from ._form import make_fields, scrolling_layout, values
from ._jobs import Job
from ._plot import TrainingPlot
from ._step import StepWidget
from ._viewer import observe, user_message

_ALL = "\x00all"  # "whiten per": one whitening for all tokens
TRAIN_FIELDS = [
    "method",
    "unit",
    "atoms",
    "levels",
    "sparsity",
    "steps",
    "batch_size",
    "seed",
    "views",
]
#: Training settings that are whitenings: drawn in the Whitening group, greyed out without it.
WHITENING_FIELDS = ("views",)


class DictionaryWidget(StepWidget):
    """Dock widget: train a dictionary with a live plot, or load one; save it to a file."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(
            napari_viewer,
            parent,
            cancel_tip="Stop after the current step and keep the dictionary so far.",
            cancelling="Cancelling: the dictionary after the last full step is kept…",
        )
        self.curves = TrainingCurves()
        self.choices: dict[str, list[str]] = {}
        self.last_trained = None  # the TrainedDictionary of the last run, cancelled or not

        self.store_label = QLabel()
        self.store_label.setWordWrap(True)
        self.fields = make_fields(TrainSettings, TRAIN_FIELDS)
        self.fields["atoms"].set_value(FIRST_ATOMS)  # then sized to the store (first_atoms)
        self._auto_atoms: int | None = FIRST_ATOMS  # None once the user typed a number
        self.fields["steps"].set_value(FIRST_STEPS[1])  # then sized to the store (first_steps)
        self._auto_steps: int | None = FIRST_STEPS[1]  # None once the user typed a number
        self.whiten_box = QCheckBox("Whiten on control cells")
        self.whiten_box.setToolTip(
            "Centre (and PCA-whiten) the activations on control tokens before training, so "
            "features describe how cells differ from the controls. Mixing cell types in the "
            "controls scales the cell-type difference down like any control variation."
        )
        self.control_column = QComboBox()
        self.control_column.setToolTip("The metadata column that marks control wells.")
        self.control_value = QComboBox()
        self.control_value.setToolTip("The value of that column the control tokens have.")
        self.group_combo = QComboBox()
        self.group_combo.setToolTip(
            "Fit one whitening per group of this column (e.g. per plate or cell type); "
            "every group then needs its own controls."
        )
        self.whiten_fields = make_fields(WhitenSettings, ["mode", "within", "n_components"])
        self.whiten_fields["within"].widget.setPlaceholderText("none (pooled)")
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip(
            "Learn a dictionary on the store's tokens (off the GUI thread)."
        )
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Apply a dictionary file (.safetensors) to the store.")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Write the dictionary in use to a file (.safetensors).")
        self.save_button.setEnabled(False)
        self.plot = TrainingPlot(napari_viewer)

        train_form = QFormLayout()
        train_form.addRow("Store", self.store_label)
        for name, f in self.fields.items():
            if name not in WHITENING_FIELDS:
                train_form.addRow(f.label, f.widget)
        whiten_form = QFormLayout()
        whiten_form.addRow(self.whiten_box)
        control_row = QHBoxLayout()
        control_row.addWidget(self.control_column, 1)
        control_row.addWidget(QLabel("="))
        control_row.addWidget(self.control_value, 1)
        whiten_form.addRow("Controls", control_row)
        whiten_form.addRow("Whiten per", self.group_combo)
        for f in self.whiten_fields.values():
            whiten_form.addRow(f.label, f.widget)
        for name in WHITENING_FIELDS:
            whiten_form.addRow(self.fields[name].label, self.fields[name].widget)
        whiten_group = QGroupBox("Whitening")
        whiten_group.setLayout(whiten_form)
        run_row = QHBoxLayout()
        run_row.addWidget(self.train_button)
        run_row.addWidget(self.cancel_button)
        file_row = QHBoxLayout()
        file_row.addWidget(self.load_button)
        file_row.addWidget(self.save_button)
        layout = scrolling_layout(self)
        layout.addLayout(train_form)
        layout.addWidget(whiten_group)
        layout.addLayout(run_row)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addLayout(file_row)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.whiten_box.toggled.connect(self._on_whiten_toggled)
        self.control_column.currentIndexChanged.connect(self._fill_values)
        self.fields["unit"].widget.currentIndexChanged.connect(self._read_choices)
        self.fields["unit"].widget.currentIndexChanged.connect(self._size_steps)
        self.fields["batch_size"].widget.valueChanged.connect(self._size_steps)
        self.fields["steps"].widget.valueChanged.connect(self._on_steps_edited)
        self.fields["atoms"].widget.valueChanged.connect(self._on_atoms_edited)
        self.train_button.clicked.connect(self.train)
        self.load_button.clicked.connect(self._choose_load)
        self.save_button.clicked.connect(self._choose_save)
        observe(
            self,
            (
                (self.session.store_changed, self._on_store_changed),
                (self.session.dictionary_changed, self._on_dictionary_changed),
            ),
        )
        self._on_store_changed(self.session.store)
        self._on_dictionary_changed(self.session.dictionary)

    # --- what a user does -----------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self.panel.running

    def set_control(self, column: str, value: str) -> None:
        """Pick the control tokens as COLUMN=VALUE (as in the two dropdowns)."""
        i = self.control_column.findText(column)
        if i < 0:
            raise ValueError(f"no column {column!r}; choices: {list(self.choices)}")
        self.control_column.setCurrentIndex(i)
        j = self.control_value.findText(value)
        if j < 0:
            raise ValueError(f"{column} has no value {value!r}; values: {self.choices[column]}")
        self.control_value.setCurrentIndex(j)
        self.whiten_box.setChecked(True)

    def set_group(self, column: str | None) -> None:
        i = self.group_combo.findData(_ALL if column is None else column)
        if i < 0:
            raise ValueError(f"cannot whiten per {column!r}")
        self.group_combo.setCurrentIndex(i)

    def settings(self) -> TrainSettings:
        """The form as ``TrainSettings`` with its whitening (SettingsError names a bad field)."""
        whiten = None
        if self.whiten_box.isChecked():
            column, value = self.control_column.currentText(), self.control_value.currentText()
            if not column or not value:
                raise ConceptDiscoveryError(
                    "controls: the store's table has no column to pick control tokens by; "
                    "untick 'Whiten on control cells' to train on the tokens as stored"
                )
            by = self.group_combo.currentData()
            whiten = WhitenSettings(
                controls=f"{column}={value}",
                by=None if by == _ALL else by,
                **values(self.whiten_fields),
            )
        return TrainSettings(whiten=whiten, **values(self.fields))

    def train(self) -> Job | None:
        """Train on the session's store; the dictionary becomes the session's when done."""
        if self.training:
            return self.job
        store = self.session.store
        if store is None:
            self.panel.fail("Embed the plate or open an activation store first (Embed widget).")
            return None
        try:
            settings = self.settings()
        except ConceptDiscoveryError as exc:
            self.panel.fail(user_message(exc, "Cannot train"))
            return None
        self.curves.clear()
        self.plot.show_curves(self.curves)
        return self.panel.start(
            Job(train_on_store, store, settings),
            f"Training {settings.method} with {settings.atoms} atoms…",
            failed="Training failed",
            progressed=self._on_progress,
            returned=self._on_trained,
        )

    def load(self, path: str | Path):
        """Apply a dictionary file to the session's store; refused when made for other data."""
        store = self.session.store
        try:
            if store is None:
                raise ConceptDiscoveryError(
                    "a dictionary is applied to a store's activations: embed the plate or open "
                    "a store first (Embed widget)"
                )
            dictionary = load_dictionary(path)
            dictionary.check_compatible_store(store)
        except (ConceptDiscoveryError, OSError) as exc:
            self.panel.fail(user_message(exc, f"Cannot use {Path(path).name}"))
            return None
        self.session.set_dictionary(dictionary)
        self.status.setText(f"Loaded {Path(path).name}: {_describe(dictionary)}.")
        return dictionary

    def save(self, path: str | Path) -> Path | None:
        """Write the session's dictionary to ``path`` (atomically)."""
        dictionary = self.session.dictionary
        if dictionary is None:
            self.panel.fail("There is no dictionary to save yet: train or load one.")
            return None
        try:
            written = save_dictionary(path, dictionary)
        except (ConceptDiscoveryError, OSError) as exc:
            self.panel.fail(user_message(exc, f"Could not save {path}"))
            return None
        dictionary.path = Path(written)  # names given to its features are kept beside it
        self.status.setText(f"Saved to {written}.")
        return written

    # --- reactions ------------------------------------------------------------------------

    def _choose_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a dictionary", "", "Dictionaries (*.safetensors);;All files (*)"
        )
        if path:
            self.load(path)

    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the dictionary", "dictionary.safetensors", "Dictionaries (*.safetensors)"
        )
        if path:
            self.save(path)

    def _on_store_changed(self, store) -> None:
        if store is None:
            self.store_label.setText("none: embed the plate or open a store (Embed widget)")
        else:
            self.store_label.setText(f"{store.path.name} ({store.model_id}, block {store.block})")
            self.store_label.setToolTip(str(store.path))
        self._read_choices()
        self._size_steps()
        self.panel.set_running(self.training)

    def _size_steps(self, *_) -> None:
        """Steps (:func:`first_steps`) and atoms (:func:`first_atoms`) for the store's number
        of tokens, each unless the user chose it."""
        store = self.session.store
        if store is None or (self._auto_steps is None and self._auto_atoms is None):
            return
        try:
            n = int(store.sites()[f"{self.fields['unit'].value()}_count"].sum())
        except KeyError:  # a unit the store lacks: training will say so
            return
        if self._auto_atoms is not None:
            atoms = first_atoms(n)
            self._auto_atoms = atoms
            self.fields["atoms"].set_value(atoms)
        if self._auto_steps is not None:
            steps = first_steps(n, self.fields["batch_size"].value())
            self._auto_steps = steps
            self.fields["steps"].set_value(steps)

    def _on_steps_edited(self, value: int) -> None:
        if value != self._auto_steps:
            self._auto_steps = None  # the user's number stays

    def _on_atoms_edited(self, value: int) -> None:
        if value != self._auto_atoms:
            self._auto_atoms = None  # the user's number stays

    def _read_choices(self, *_) -> None:
        """Fill the control and group dropdowns from the store's table (read off the GUI thread)."""
        store = self.session.store
        if store is None:
            self._set_choices({})
            return
        unit = self.fields["unit"].value()
        job = Job(lambda: metadata_choices(store.table(unit)), keywords=())
        job.returned.connect(
            lambda choices: (
                self._set_choices(choices)
                if self.jobs.alive and self.session.store is store
                else None
            )
        )
        job.errored.connect(lambda exc: self.panel.fail(user_message(exc, "Cannot read the store")))
        self.jobs.run(job)

    def _set_choices(self, choices: dict[str, list[str]]) -> None:
        self.choices = choices
        previous = (self.control_column.currentText(), self.control_value.currentText())
        self.control_column.blockSignals(True)
        self.control_column.clear()
        self.control_column.addItems(list(choices))
        self.control_column.blockSignals(False)
        self.group_combo.clear()
        self.group_combo.addItem("(all tokens together)", _ALL)
        for column in group_choices(choices):
            self.group_combo.addItem(column, column)
        pick = previous if previous[0] in choices and previous[1] in choices[previous[0]] else None
        pick = pick or guess_control(choices)
        if pick is not None:
            self.control_column.setCurrentIndex(self.control_column.findText(pick[0]))
        self._fill_values()
        if pick is not None:
            self.control_value.setCurrentIndex(self.control_value.findText(pick[1]))
        self.whiten_box.setChecked(pick is not None)
        self._on_whiten_toggled(self.whiten_box.isChecked())

    def _fill_values(self, *_) -> None:
        column = self.control_column.currentText()
        self.control_value.clear()
        self.control_value.addItems(self.choices.get(column, []))

    def _on_whiten_toggled(self, on: bool) -> None:
        for w in (self.control_column, self.control_value, self.group_combo):
            w.setEnabled(on)
        for f in [*self.whiten_fields.values(), *(self.fields[n] for n in WHITENING_FIELDS)]:
            f.widget.setEnabled(on)

    def _on_dictionary_changed(self, dictionary) -> None:
        self.save_button.setEnabled(dictionary is not None)

    def _on_progress(self, p: Progress) -> None:
        if not self.jobs.alive:
            return
        if p.stage == "train":
            self.curves.add(p)
            self.plot.show_curves(self.curves)
            self.panel.show_progress(p.done, p.total, self.curves.summary())
        elif p.stage == "whiten":
            self.status.setText("Fitting the whitening on the control tokens…")
        elif p.stage == "evaluate":
            self.panel.show_progress(p.done, p.total, f"Evaluating: {p.done} of {p.total} tokens")

    def _on_trained(self, trained) -> None:
        if not self.jobs.alive:
            return
        self.last_trained = trained
        self.session.set_dictionary(trained.dictionary)
        if trained.cancelled:
            text = (
                f"Cancelled: keeping the dictionary after step {trained.result.steps_done} of "
                f"{self.curves.total}; Save it or train again."
            )
        else:
            m = trained.metrics
            views = trained.dictionary.view_names
            per = f" per view ({' + '.join(views)}; FVU the views' mean)" if views else ""
            text = (
                f"Trained {trained.result.steps_done} steps{per}: FVU {m['fvu']:.3f}, L0 "
                f"{m['l0']:.1f}, dead {m['n_dead']}/{m['n_atoms']}."
            )
            within = trained.dictionary.meta.within_chosen
            if within:  # how "covariance within: auto" came out, and why
                text += f" Whitening: {within}."
            check = check_words(m)
            if check:  # how far the whitening overfits its controls, as train says it
                said, warning = check
                text += f" {said[0].upper()}{said[1:]}." + (
                    f" Warning: {warning}." if warning else ""
                )
        self.status.setText(text)
        show_info(text)

    def _enable(self, running: bool) -> None:
        self.train_button.setEnabled(not running and self.session.store is not None)
        self.load_button.setEnabled(not running)


def _describe(dictionary) -> str:
    m = dictionary.meta
    method = dictionary.model.method if hasattr(dictionary.model, "method") else "dictionary"
    return f"{method}, {dictionary.n_atoms} atoms, trained on {dictionary.describe()}" + (
        f", {m.steps} steps" if m.steps is not None else ""
    )
