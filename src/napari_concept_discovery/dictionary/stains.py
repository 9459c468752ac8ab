"""Which stains an atom reads: for a dictionary on per-channel tokens, each channel block's
share of the atom (docs/architecture.md, "Dictionaries", stain attribution)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import DictionaryError


def channel_shares(vectors, n_groups: int) -> np.ndarray:
    """Share of each row's squared norm in each of ``n_groups`` equal column blocks, (M, G).

    Rows of (M, G*D) vectors with channel g in columns g*D:(g+1)*D; each row of the result sums
    to 1 (a zero row gives equal shares).
    """
    v = np.asarray(vectors, dtype=np.float64)
    m, width = v.shape
    if n_groups < 1 or width % n_groups:
        raise DictionaryError(f"cannot split {width} columns into {n_groups} channel blocks")
    energy = (v.reshape(m, n_groups, width // n_groups) ** 2).sum(2)
    total = energy.sum(1, keepdims=True)
    return np.divide(energy, total, out=np.full_like(energy, 1.0 / n_groups), where=total > 0)


def stain_table(shares, names: Sequence[str]) -> pd.DataFrame:
    """``stain_<name>`` columns of (M, C) shares and ``top_stain``, the largest, per feature."""
    shares = np.asarray(shares, dtype=np.float64)
    names = [str(n) for n in names]
    if shares.ndim != 2 or shares.shape[1] != len(names):
        raise DictionaryError(f"{shares.shape} stain shares for {len(names)} stain names")
    out = pd.DataFrame({f"stain_{n}": shares[:, i] for i, n in enumerate(names)})
    out["top_stain"] = np.asarray(names, dtype=object)[shares.argmax(1)] if len(out) else []
    return out
