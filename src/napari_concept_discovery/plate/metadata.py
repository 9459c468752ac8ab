"""Metadata tables: load them and join their rows to sites by plate, well and site.

A table may be per site (RxRx ``metadata.csv``), per well (a plate map) or per well on one of
several plates. Column names are matched case-insensitively, with CellProfiler's ``Metadata_``
prefix allowed, so JUMP load-data tables join without renaming.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import PlateError
from .model import Site, SiteKey, _listing, normalize_well, well_from_row_col

_ALIASES = {
    "plate": ("plate", "metadata_plate"),
    "experiment": ("experiment", "metadata_experiment"),
    "well": ("well", "metadata_well"),
    "row": ("row", "metadata_row"),
    "col": ("col", "column", "metadata_col", "metadata_column"),
    "site": ("site", "metadata_site", "field", "metadata_field"),
}


def find_column(table: pd.DataFrame, role: str) -> str | None:
    """The column of ``table`` that plays ``role`` (plate, well, site, ...), or None."""
    lower = {str(c).lower(): c for c in table.columns}
    for alias in _ALIASES[role]:
        if alias in lower:
            return lower[alias]
    return None


def load_table(source: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a path (csv, tsv, parquet) or a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True), "the metadata table"
    path = Path(source)
    if not path.is_file():
        raise PlateError(f"metadata table not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
            table = pd.read_csv(path, sep=sep)
    except Exception as exc:
        raise PlateError(f"cannot read metadata table {path}: {type(exc).__name__}: {exc}") from exc
    return table, str(path)


def _plate_value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def row_wells(table: pd.DataFrame, name: str) -> list[str]:
    """The normalised well of every row; PlateError names the row of an unparsable well."""
    well_col = find_column(table, "well")
    row_col, col_col = find_column(table, "row"), find_column(table, "col")
    if well_col is None and (row_col is None or col_col is None):
        raise PlateError(
            f"{name} has no well column (looked for well / Metadata_Well, or row and col); "
            f"its columns are: {', '.join(map(str, table.columns))}"
        )
    wells = []
    for i in range(len(table)):
        try:
            if well_col is not None:
                wells.append(normalize_well(table[well_col].iloc[i]))
            else:
                wells.append(well_from_row_col(table[row_col].iloc[i], table[col_col].iloc[i]))
        except (PlateError, ValueError) as exc:
            raise PlateError(f"{name}, row {i + 1}: {exc}") from None
    return wells


def row_plates(table: pd.DataFrame, image_plates: set[str]) -> list[str | None]:
    """Each row's plate key, choosing ``{experiment}_{plate}`` (RxRx) or ``{plate}``, whichever
    names more of the plates the images came from; None everywhere when there is no plate column."""
    plate_col, exp_col = find_column(table, "plate"), find_column(table, "experiment")
    if plate_col is None:
        return [None] * len(table)
    plain = [_plate_value(v) for v in table[plate_col]]
    if exp_col is None:
        return plain
    joined = [f"{e}_{p}" for e, p in zip(table[exp_col], plain, strict=True)]
    if sum(p in image_plates for p in joined) >= sum(p in image_plates for p in plain):
        return joined
    return plain


def join_metadata(
    sites: dict[SiteKey, Site], table: pd.DataFrame, name: str
) -> tuple[list[str], set[int]]:
    """Attach each site its row; return warnings and the row numbers that matched a site.

    Rows that match no site and sites with no row are reported, naming their wells; two rows
    for the same site are an error because either choice would be a guess.
    """
    wells = row_wells(table, name)
    plates = row_plates(table, {k.plate for k in sites})
    site_col = find_column(table, "site")
    site_vals: list[int | None] = [None] * len(table)
    if site_col is not None:
        try:
            site_vals = [int(v) for v in table[site_col]]
        except (TypeError, ValueError):
            raise PlateError(f"{name}: column {site_col!r} must hold site numbers") from None

    index: dict[tuple, int] = {}
    for i, key in enumerate(zip(plates, wells, site_vals, strict=True)):
        if key in index:
            plate, well, site = key
            where = f"well {well}" + (f" on plate {plate}" if plate else "")
            where += f" site {site}" if site is not None else ""
            raise PlateError(f"{name} has two rows for {where} (rows {index[key] + 1} and {i + 1})")
        index[key] = i

    has_plate, has_site = plates[0] is not None if plates else False, site_col is not None
    records = table.to_dict(orient="records")
    matched: set[int] = set()
    missing: list[SiteKey] = []
    for key, site in sites.items():
        lookup = (key.plate if has_plate else None, key.well, key.site if has_site else None)
        i = index.get(lookup)
        if i is None:
            missing.append(key)
            continue
        matched.add(i)
        site.metadata = dict(records[i])

    problems = []
    unmatched = [i for i in range(len(table)) if i not in matched]
    if unmatched:
        described = [
            " ".join(
                p
                for p in (
                    plates[i] or "",
                    wells[i],
                    "" if site_vals[i] is None else f"site {site_vals[i]}",
                )
                if p
            )
            for i in unmatched
        ]
        problems.append(f"{len(unmatched)} row(s) of {name} have no images: " + _listing(described))
        if has_plate and not matched:
            problems[-1] += (
                f" (the table names plates {_listing(sorted(set(plates)), 3)}; the images are on "
                f"plates {_listing(sorted({k.plate for k in sites}), 3)})"
            )
    if missing:
        problems.append(
            f"{len(missing)} site(s) have no row in {name}: " + _listing([str(k) for k in missing])
        )
    return problems, matched
