"""What the widgets' forms offer, decided Qt-free: fields, metadata choices, training curves.

The dictionary widget builds its fields from the settings dataclasses (``settings.describe``),
fills its control and group dropdowns from the store's token table, and plots the training
reports; the choices and the bookkeeping live here so they are tested without a display (see
docs/architecture.md, "Conventions every step shares").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..plate.model import natural_key
from ..progress import Progress
from ..settings import Settings, describe

# Token-table columns that identify a token or measure it; never a metadata label to pick by.
UNIT_COLUMNS = frozenset(
    {"label", "centroid_y", "centroid_x", "area", "row", "col", "tile_row", "tile_col"}
)
MAX_CHOICES = 100  # a column with more distinct values is an identifier, not a label
# Values that name negative controls on the plates we know (RxRx, JUMP, our synthetic plates).
CONTROL_WORDS = ("negative_control", "negative", "control", "dmso", "untreated", "mock", "ctrl")


def form_fields(cls: type[Settings], names: Sequence[str]) -> list[dict]:
    """``settings.describe(cls)`` for ``names``, in that order; an unknown name is an error."""
    by_name = {d["name"]: d for d in describe(cls)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(missing)}")
    return [by_name[n] for n in names]


def metadata_choices(table: pd.DataFrame, max_values: int = MAX_CHOICES) -> dict[str, list[str]]:
    """Columns a user can pick tokens by, each with its values (as text, naturally sorted).

    Identifier and measurement columns (label, centroids, area) are left out, and so is any
    column with more than ``max_values`` distinct values or none at all. Values are the text
    that ``COLUMN=VALUE`` settings match (``whiten.control_mask`` compares as text).
    """
    out: dict[str, list[str]] = {}
    for col in table.columns:
        if col in UNIT_COLUMNS:
            continue
        values = table[col].dropna()
        if values.empty or pd.api.types.is_float_dtype(values):
            continue
        uniq = pd.unique(values.astype(str))
        if len(uniq) > max_values:
            continue
        out[str(col)] = sorted((str(v) for v in uniq), key=natural_key)
    return out


def group_choices(choices: dict[str, list[str]]) -> list[str]:
    """Columns worth whitening per group of: at least two groups (plate, cell type, ...)."""
    return [c for c, values in choices.items() if len(values) >= 2]


def guess_control(choices: dict[str, list[str]]) -> tuple[str, str] | None:
    """The (column, value) most likely to name negative controls, or None when nothing does.

    A value matching a word of :data:`CONTROL_WORDS` (earlier words first) wins; columns named
    like ``well_type`` or ``control`` are preferred among equals.
    """
    best: tuple[int, int, str, str] | None = None
    for col, values in choices.items():
        col_rank = 0 if any(w in col.lower() for w in ("type", "control")) else 1
        for value in values:
            low = value.lower()
            for rank, word in enumerate(CONTROL_WORDS):
                if word in low:
                    cand = (rank, col_rank, col, value)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
                    break
    return None if best is None else (best[2], best[3])


@dataclass
class TrainingCurves:
    """Loss, FVU and dead fraction per reported training step, gathered from Progress reports.

    ``add`` takes every report of a training run and keeps the ``"train"`` ones; the live plot
    draws these lists. A run that restarts (step going back to 0) starts new curves.
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    total: int = 0

    def add(self, progress: Progress) -> bool:
        """Keep a training report; False (nothing kept) for other stages."""
        if progress.stage != "train":
            return False
        if self.steps and progress.done < self.steps[-1]:
            self.clear()
        info = progress.info
        self.steps.append(int(progress.done))
        self.loss.append(float(info.get("loss", np.nan)))
        self.fvu.append(float(info.get("fvu", np.nan)))
        self.dead_fraction.append(float(info.get("dead_fraction", np.nan)))
        self.total = int(progress.total)
        return True

    def extend(self, reports: Iterable[Progress]) -> None:
        for p in reports:
            self.add(p)

    def clear(self) -> None:
        for values in (self.steps, self.loss, self.fvu, self.dead_fraction):
            values.clear()
        self.total = 0

    def __len__(self) -> int:
        return len(self.steps)

    def summary(self) -> str:
        """The last step's numbers in one line, for a status label."""
        if not self.steps:
            return ""
        return (
            f"step {self.steps[-1]}/{self.total}: loss {self.loss[-1]:.4g}, "
            f"FVU {self.fvu[-1]:.3f}, dead {self.dead_fraction[-1]:.0%}"
        )
