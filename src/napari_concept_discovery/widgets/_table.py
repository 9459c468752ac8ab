"""A pandas DataFrame as a Qt table model, sortable by value and filterable by text.

Display text is formatted for reading (three significant digits, fractions as percent where the
column says so); the sort role holds the raw value, so 10 sorts after 9 and NaN sorts last.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt

SORT_ROLE = Qt.ItemDataRole.UserRole
PERCENT = {"frequency"}
#: Columns where a negative number means "none" (a feature in no family): shown blank.
NONE_BELOW_ZERO = {"family"}


def format_value(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return "" if column in NONE_BELOW_ZERO and value < 0 else str(int(value))
    if isinstance(value, float | np.floating):
        if column in PERCENT:
            return f"{100 * float(value):.2g}%" if value < 0.1 else f"{100 * float(value):.0f}%"
        return f"{float(value):.3g}"
    return str(value)


class DataFrameModel(QAbstractTableModel):
    """Read-only model of a DataFrame with given (header, tooltip) per column."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.frame = pd.DataFrame()
        self.header_info: list[tuple[str, str]] = []
        self._values: list[np.ndarray] = []

    def set_frame(self, frame: pd.DataFrame, header_info: list[tuple[str, str]] | None = None):
        self.beginResetModel()
        self.frame = frame.reset_index(drop=True)
        self.header_info = header_info or [(str(c), "") for c in frame.columns]
        self._values = [frame[c].to_numpy() for c in frame.columns]
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.frame)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.frame.columns)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        value = self._values[index.column()][index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return format_value(str(self.frame.columns[index.column()]), value)
        if role == SORT_ROLE:
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                return -math.inf
            return value
        if role == Qt.ItemDataRole.ToolTipRole and isinstance(value, str) and len(value) > 30:
            return value  # long text (a description) is cut in its column: whole here
        if role == Qt.ItemDataRole.TextAlignmentRole and isinstance(value, int | float | np.number):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal or section >= len(self.header_info):
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.header_info[section][0]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.header_info[section][1] or None
        return None

    def row_value(self, row: int, column: str):
        return self.frame[column].iloc[row]


class FeatureFilter(QSortFilterProxyModel):
    """Sorts by raw value; keeps rows whose text matches the filter in any column, and, with
    ``active_only``, rows whose ``n_active`` column is positive."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setSortRole(SORT_ROLE)
        self.setFilterKeyColumn(-1)
        self.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.active_only = False

    def set_active_only(self, on: bool) -> None:
        self.active_only = bool(on)
        self.invalidateFilter()

    def filterAcceptsRow(self, row: int, parent) -> bool:
        model = self.sourceModel()
        if self.active_only and isinstance(model, DataFrameModel):
            if "n_active" in model.frame.columns and not model.frame["n_active"].iloc[row] > 0:
                return False
        return super().filterAcceptsRow(row, parent)
