"""Which column the whitening's control covariance is estimated within: ``"auto"`` resolved.

Controls that mix cell types vary by cell type, so PCA whitening on their pooled covariance
takes the cell-type difference for control variation and scales it to unit variance, like
any nuisance: on issue 24's plates the default dictionary's best feature or family told the
cell types apart at 0.68-0.85 AUROC, the same with the covariance within cell types at
0.84-0.99.
``within="auto"`` estimates it within the table's cell-type column where the controls of a
whitening group hold more than one cell type, and pools it otherwise (one cell type, or no
such column). It is not the default for the whitened view: at 16 atoms the cell types take
atoms from the perturbations, and the four-setting benchmark lost one perturbation on two
settings and let one more null through on one (benchmarks/results/concept_recovery.txt); the
default dictionary has a ``within-type`` part of its own instead (:mod:`.views`). Training resolves the
setting once, against the token table, and records the column and the reason in the dictionary
(``WhitenSettings.within``, ``DictionaryMeta.within_chosen``).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from ..errors import DictionaryError
from .control import Control
from .settings import WhitenSettings
from .whiten import _listed, control_mask, group_columns, group_labels

AUTO = "auto"
NONE = "none"
#: How the reasons point the user to the other --whiten-within setting (see :func:`without_hints`).
_KEEPS_HINT = "; the controls mix "
_POOLS_HINT = f" (--whiten-within {NONE} pools them)"
#: Names of a cell-type column, matched case-insensitively, with CellProfiler's ``Metadata_``
#: prefix allowed (``Metadata_CellLine`` in a JUMP load-data table); the first present wins.
CELL_TYPE_NAMES = ("cell_type", "celltype", "cell_line", "cellline")
_SHOWN = 5


def cell_type_column(columns: Iterable) -> str | None:
    """The column of ``columns`` that names the cell type (see :data:`CELL_TYPE_NAMES`)."""
    by_key = {}
    for c in columns:
        key = str(c).lower()
        key = key[len("metadata_") :] if key.startswith("metadata_") else key
        by_key.setdefault(key.replace("-", "_"), str(c))
    return next((by_key[n] for n in CELL_TYPE_NAMES if n in by_key), None)


def _check_columns(table: pd.DataFrame, within: str) -> None:
    missing = [c for c in group_columns(within) if c not in table.columns]
    if missing:
        raise DictionaryError(
            f"--whiten-within (within): no column {', '.join(map(repr, missing))} to estimate "
            f"the controls' covariance within; columns are {_listed(list(table.columns))} "
            f"(or {AUTO}: the cell-type column where controls mix cell types; {NONE}: pooled)"
        )


def resolve_within(
    table: pd.DataFrame, control: Control, within: str | None, by: str | None = None
) -> tuple[str | None, str]:
    """(column or None for pooled, why in words) for a ``within`` setting on ``table``.

    ``"auto"`` gives the cell-type column (:func:`cell_type_column`) when the controls of some
    whitening group (``by``, all tokens when None) hold more than one of its values, else None.
    A column named outright is checked to exist; None (``"none"``) stays pooled.
    """
    if within is None or str(within).lower() == NONE:
        column, _ = resolve_within(table, control, AUTO, by)
        hint = "" if column is None else f"{_KEEPS_HINT}{column}: --whiten-within {AUTO} keeps it"
        return None, f"pooled (--whiten-within {NONE}){hint}"
    if str(within).lower() != AUTO:
        _check_columns(table, within)
        return within, f"covariance within {within} (as given)"
    column = cell_type_column(table.columns)
    if column is None:
        return None, (
            f"pooled: the table has no cell-type column ({', '.join(CELL_TYPE_NAMES)}) to "
            "estimate the controls' covariance within (--whiten-within COLUMN names one)"
        )
    mask = control_mask(table, *control)
    kinds = table.loc[mask, column]
    known = kinds.notna().to_numpy()
    values = sorted(set(kinds[known].astype(str)))
    if by is not None and all(c in table.columns for c in group_columns(by)):
        groups = pd.Series(group_labels(table, by)[mask][known])
        mixed = bool((kinds[known].astype(str).groupby(groups.to_numpy()).nunique() > 1).any())
    else:
        mixed = len(values) > 1
    shown = ", ".join(values[:_SHOWN]) + (", ..." if len(values) > _SHOWN else "")
    if not mixed:
        where = f" in each {by} group" if by is not None and len(values) > 1 else ""
        return None, (
            f"pooled: the controls hold one {column}{where} ({shown}), so there is no "
            "cell-type difference among them to keep"
        )
    return column, (
        f"covariance within {column}: the controls hold {len(values)} values of it ({shown}), "
        f"whose difference pooled whitening would scale away{_POOLS_HINT}"
    )


def without_hints(why: str) -> str:
    """A :func:`resolve_within` reason less its pointer to the other ``--whiten-within``
    setting: beside the within-type view (:mod:`.views`), that view is the other setting."""
    return why.split(_KEEPS_HINT)[0].removesuffix(_POOLS_HINT)


def resolved_whitening(settings: WhitenSettings, table: pd.DataFrame) -> tuple[WhitenSettings, str]:
    """(``settings`` with ``within`` a column or None, why): how training records it.

    Centring alone estimates no covariance, so its ``within`` is None whatever was asked."""
    if settings.mode != "pca":
        return settings.replace(within=None), "centring only: no covariance to estimate"
    column, why = resolve_within(table, settings.control, settings.within, settings.by)
    return settings.replace(within=column), why
