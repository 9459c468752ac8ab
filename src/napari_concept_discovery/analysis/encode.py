"""The one store encoder: a dictionary's codes for the tokens of a unit (all of them, or one
range of rows such as a site's), read in the form the dictionary was trained on and streamed in
batches, with tokens and codes that are not finite refused by name.

``analyze``, the report and the viewer's explorer call :func:`encode_store`; the Dask executor
(:mod:`.cluster`) runs the same pieces per block of rows and gives the same codes bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..dictionary.rows import where_rows
from ..errors import DictionaryError
from ..progress import Cancel, ProgressCallback

if TYPE_CHECKING:  # the applied dictionary imports torch; the explorer imports this module
    from ..dictionary.applied import Dictionary


def dictionary_tokens(store, dictionary: Dictionary, unit: str):
    """The ``unit`` tokens of ``store`` in the form ``dictionary`` reads (zarr, not loaded):
    the per-channel tokens side by side or their mean (``dictionary.token_form``)."""
    return store.tokens(unit, dictionary.token_form)


class WatchedRows:
    """Row blocks of an (N, D) array (or of its rows ``rows``), read as the array itself, noting
    the rows that are not finite: the encode loop reads every token once, so the check costs no
    second read. Rows are counted from the start of ``rows``, plus ``offset``."""

    def __init__(self, data, offset: int = 0, rows: slice | None = None):
        self.data = data
        n, *rest = (int(k) for k in data.shape)
        self.start, self.stop, _ = (rows or slice(None)).indices(n)
        self.stop = max(self.stop, self.start)
        self.shape = (self.stop - self.start, *rest)
        self.offset = int(offset)
        self.bad: list[np.ndarray] = []

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("WatchedRows reads blocks of consecutive rows (a slice)")
        lo, hi, _ = key.indices(self.shape[0])
        part = np.asarray(self.data[self.start + lo : self.start + max(lo, hi)])
        finite = np.isfinite(part).all(axis=1)
        if not finite.all():
            self.bad.append(np.flatnonzero(~finite) + lo + self.offset)
        return part

    def bad_rows(self) -> np.ndarray:
        return np.concatenate(self.bad) if self.bad else np.zeros(0, dtype=np.int64)


def check_finite_codes(
    codes: sp.csr_matrix, table: pd.DataFrame, bad_tokens, dictionary: Dictionary, store, unit
) -> None:
    """Refuse codes that are not finite, or that came from tokens that are not: naming the
    store, the dictionary file and the sites. A NaN token can give ICFL no atom at all (all-zero
    codes that look sound), so the tokens are checked as well as the codes."""
    n = codes.shape[0]
    bad = np.zeros(n, dtype=bool)
    bad[np.asarray(bad_tokens, dtype=np.int64)] = True
    tokens_bad = int(bad.sum())
    rows = np.repeat(np.arange(n), np.diff(codes.indptr))[~np.isfinite(codes.data)]
    bad[rows] = True
    if not bad.any():
        return
    name = f"the dictionary {dictionary.path}" if dictionary.path else "the dictionary"
    where = f"{int(bad.sum())} of {n} {unit} tokens of the store at {getattr(store, 'path', '?')}"
    if tokens_bad:
        raise DictionaryError(
            f"{where} hold NaN or Inf ({tokens_bad} tokens), {where_rows(table, bad)}; their codes "
            f"from {name} would be wrong, so nothing is written. Embed those sites again "
            "with sound model weights"
        )
    raise DictionaryError(
        f"{name} gives NaN or Inf codes for {where}, {where_rows(table, bad)}, although those "
        "tokens are finite: its tensors overflow; train it again, nothing is written"
    )


def encode_store(
    store,
    dictionary: Dictionary,
    unit: str | None = None,
    *,
    rows: slice | None = None,
    batch_size: int = 4096,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Codes (N, M) CSR of the ``unit`` tokens of ``store`` (default: the dictionary's unit;
    all of them, or the rows ``rows``, such as a site's ``store.site_rows``), with their token
    table (index from 0). Refuses a store of another model, weights, block or width, and tokens
    or codes that are not finite (:func:`check_finite_codes`).

    Tokens of another unit than the dictionary was trained on (a cell dictionary on patch
    tokens, as the viewer's activation maps do) come from the same model, block and width, so
    they are accepted; the CLI says when it does this. ``analysis.cluster.encode_store_on_cluster``
    gives the same codes from the workers of a Dask cluster.
    """
    unit = unit or dictionary.unit
    dictionary.check_compatible_store(store)
    tokens = WatchedRows(dictionary_tokens(store, dictionary, unit), rows=rows)
    table = store.table(unit)
    if rows is not None:
        table = table.iloc[tokens.start : tokens.stop].reset_index(drop=True)
    codes = dictionary.encode_table(
        tokens, table, batch_size=batch_size, progress=progress, cancel=cancel
    )
    check_finite_codes(codes, table, tokens.bad_rows(), dictionary, store, unit)
    return codes, table
