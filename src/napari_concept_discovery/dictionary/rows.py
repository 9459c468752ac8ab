"""Row access to a store's tokens without torch: rows read in blocks, a subset that reads as an
array, the rows that are not finite and where they are (sites named), for training, the store
encoder and the explorer."""

from __future__ import annotations

import numpy as np
import pandas as pd


def take_rows(data, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """Rows ``rows`` (sorted) of an (N, D) numpy or zarr array, as float32, read in blocks."""
    rows = np.asarray(rows)
    if isinstance(data, np.ndarray):
        return np.asarray(data[rows], dtype=np.float32)
    out = np.empty((len(rows), data.shape[1]), dtype=np.float32)
    for s in range(0, len(rows), block):
        part = rows[s : s + block]
        lo, hi = int(part[0]), int(part[-1]) + 1
        if hi - lo <= 4 * len(part):  # dense enough: one contiguous read
            out[s : s + len(part)] = np.asarray(data[lo:hi])[part - lo]
        else:
            out[s : s + len(part)] = np.asarray(data.get_orthogonal_selection((part, slice(None))))
    return out


class RowSubset:
    """Some rows (sorted) of an (N, D) numpy or zarr array, read like the array itself.

    Training, whitening and evaluation slice their tokens; this lets them run on the finite
    rows of a store without copying it.
    """

    def __init__(self, data, rows: np.ndarray):
        self.data = data
        self.rows = np.asarray(rows)
        self.shape = (len(self.rows), int(data.shape[1]))
        chunks = getattr(data, "chunks", None)
        if chunks is not None:
            self.chunks = (int(chunks[0]), self.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows = self.rows[key]
        if np.ndim(rows) == 0:
            return take_rows(self.data, np.asarray([rows]))[0]
        return take_rows(self.data, rows) if len(rows) else np.zeros((0, self.shape[1]), "f4")

    def get_orthogonal_selection(self, selection) -> np.ndarray:
        rows, cols = selection
        return self[np.asarray(rows)][:, cols]


def nonfinite_rows(tokens, block: int = 65536) -> np.ndarray:
    """Boolean (N,) mask of the tokens holding NaN or Inf, read in blocks of rows."""
    n = int(tokens.shape[0])
    bad = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        part = np.asarray(tokens[start : start + block])
        bad[start : start + len(part)] = ~np.isfinite(part).all(axis=1)
    return bad


def where_rows(table: pd.DataFrame, mask: np.ndarray, limit: int = 5) -> str:
    """The sites of the masked rows, for a message: 'at 3 sites: P1 B02 site 1, ...'."""
    keys = [c for c in ("plate", "well", "site") if c in table.columns]
    if not keys:
        rows = np.flatnonzero(mask)
        return f"at rows {', '.join(map(str, rows[:limit]))}" + (
            " ..." if len(rows) > limit else ""
        )
    sites = table.loc[mask, keys].drop_duplicates()
    shown = "; ".join(" ".join(str(v) for v in row) for row in sites.head(limit).itertuples(False))
    more = f"; ... and {len(sites) - limit} more" if len(sites) > limit else ""
    return f"at {len(sites)} site(s): {shown}{more}"
