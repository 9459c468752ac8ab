"""Form fields made from the settings dataclasses' descriptions (``settings.describe``).

A field's label, tooltip, choices and default come from the dataclass that the CLI uses too,
so a form and ``--help`` say the same thing (docs/architecture.md, "Conventions every step
shares"). Optional numbers show "default" at the bottom of their range and give None there;
a subset of names (``option(items=)``) is a row of check boxes, one of which stays ticked.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLineEdit,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..settings import Settings
from ..views.forms import form_fields

INT_RANGE = (0, 2**31 - 1)


class Field:
    """One setting as a Qt widget: ``value()`` gives what the dataclass takes."""

    def __init__(self, desc: dict, *, minimum: float | None = None, maximum: float | None = None):
        self.name: str = desc["name"]
        self.label: str = desc["label"][:1].upper() + desc["label"][1:]
        self.optional: bool = desc["optional"]
        tp, default, choices = desc["type"], desc["default"], desc["choices"]
        self.widget: QWidget
        self.boxes: dict[str, QCheckBox] = {}  # a subset field's check box per name
        if desc.get("items"):
            self.widget = QWidget()
            row = QHBoxLayout(self.widget)
            row.setContentsMargins(0, 0, 0, 0)
            for item, words in desc["items"].items():
                box = QCheckBox(item)
                box.setObjectName(f"{self.name}:{item}")
                box.setToolTip(f"{item}: {words}" if words else item)
                box.toggled.connect(lambda on, box=box: self._keep_one(box, on))
                self.boxes[item] = box
                row.addWidget(box)
            row.addStretch(1)
        elif choices:
            combo = QComboBox()
            for c in choices:
                combo.addItem(str(c), c)
            self.widget = combo
        elif tp is bool:
            self.widget = QCheckBox()
        elif tp is int:
            spin = QSpinBox()
            lo = INT_RANGE[0] if minimum is None else int(minimum)
            hi = INT_RANGE[1] if maximum is None else int(maximum)
            if self.optional:
                lo -= 1
                spin.setSpecialValueText("default")
            spin.setRange(lo, hi)
            self.widget = spin
        elif tp is float:
            dspin = QDoubleSpinBox()
            dspin.setDecimals(6)
            lo = 0.0 if minimum is None else float(minimum)
            dspin.setRange(lo - (1 if self.optional else 0), 1e9 if maximum is None else maximum)
            if self.optional:
                dspin.setSpecialValueText("default")
            self.widget = dspin
        else:
            line = QLineEdit()
            if self.optional:
                line.setPlaceholderText("default")
            self.widget = line
        self.widget.setToolTip(desc["help"])
        self.widget.setObjectName(self.name)
        self.set_value(default)

    def _keep_one(self, box: QCheckBox, on: bool) -> None:
        """A subset is never empty: unticking the last box ticks it again."""
        if not on and not any(b.isChecked() for b in self.boxes.values()):
            box.setChecked(True)

    def value(self) -> Any:
        w = self.widget
        if self.boxes:
            return ",".join(n for n, b in self.boxes.items() if b.isChecked())
        if isinstance(w, QComboBox):
            return w.currentData()
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QSpinBox | QDoubleSpinBox):
            if self.optional and w.value() == w.minimum():
                return None
            return w.value()
        text = w.text().strip()
        return None if self.optional and not text else text

    def set_value(self, value: Any) -> None:
        w = self.widget
        if self.boxes:
            names = [n.strip() for n in str(value or "").split(",") if n.strip()]
            unknown = [n for n in names if n not in self.boxes]
            if unknown or not names:
                raise ValueError(
                    f"{self.name}: {value!r}; give one or more of {', '.join(self.boxes)}"
                )
            for n in names:  # tick the wanted ones first, so the subset is never empty
                self.boxes[n].setChecked(True)
            for n, b in self.boxes.items():
                b.setChecked(n in names)
            return
        if isinstance(w, QComboBox):
            i = w.findData(value)
            if i < 0:
                raise ValueError(f"{self.name}: {value!r} is not a choice")
            w.setCurrentIndex(i)
        elif isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, QSpinBox | QDoubleSpinBox):
            w.setValue(w.minimum() if value is None else value)
        else:
            w.setText("" if value is None else str(value))


def make_fields(cls: type[Settings], names: list[str]) -> dict[str, Field]:
    """Fields for ``names`` of ``cls``, in order; a number's range is the setting's own
    (``option(min=, max=)``), the one its ``validate`` checks."""
    return {
        d["name"]: Field(d, minimum=d["min"], maximum=d["max"]) for d in form_fields(cls, names)
    }


def add_rows(layout: QFormLayout, fields: dict[str, Field]) -> None:
    for f in fields.values():
        layout.addRow(f.label, f.widget)


def values(fields: dict[str, Field]) -> dict[str, Any]:
    return {name: f.value() for name, f in fields.items()}


def scrolling_layout(widget: QWidget) -> QVBoxLayout:
    """A layout for ``widget``'s content inside a scroll area, so a long form does not force its
    dock (and the docks tabbed with it) to its full height."""
    content = QWidget()
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setWidget(content)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    return QVBoxLayout(content)
