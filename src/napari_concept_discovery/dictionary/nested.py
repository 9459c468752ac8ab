"""Nested (Matryoshka) dictionaries: prefixes of the atom list that must each reconstruct alone.

A dictionary with many atoms on few tokens splits a broad concept (a cell type, mitosis) over
dozens of small features (docs/architecture.md, "Concepts come at several scales"). Training
the first m atoms, for a few nested m (say 16, 64, 256 and all M), to reconstruct the tokens
by themselves makes the first atoms carry what is shared by many tokens and the later ones
refine it (Bussmann et al. 2025, "Learning multi-level features with Matryoshka SAEs"). The
loss is the sum of the reconstruction losses of the prefixes; how a prefix codes a token is
the method's own sparse-coding step restricted to its atoms (see ``ICFL.forward`` and
``TopKSAE.forward``).

A feature's *level* is the smallest prefix that holds it: with levels (16, 64, 256, 1024),
atoms 0-15 are level 16, atoms 16-63 level 64, and so on. This module is torch-free, so the
settings, the analysis and the views can read levels without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DictionaryError

#: What ``TrainSettings.levels`` spells "no nesting" as.
NO_LEVELS = "none"


def parse_levels(text: str | Sequence | None, n_atoms: int) -> list[int] | None:
    """The prefix sizes of a ``levels`` setting for a dictionary of ``n_atoms`` atoms.

    ``text`` is ``none`` (or empty, or None) for a plain dictionary, or comma-separated sizes
    where ``M`` stands for all atoms, e.g. ``16,64,256,M``. Sizes of ``n_atoms`` or more are
    dropped and ``n_atoms`` always ends the list, so one setting fits dictionaries of every
    size (atoms are sized to the data); when only ``n_atoms`` is left, the dictionary is plain
    (None). Sizes must be positive whole numbers in increasing order.
    """
    if text is None:
        return None
    items = [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if not items or (len(items) == 1 and items[0].lower() == NO_LEVELS):
        return None
    sizes = []
    for t in items:
        if t.upper() == "M":
            sizes.append(np.inf)  # all atoms, however many: after every number
            continue
        try:
            sizes.append(int(t))
        except ValueError:
            raise DictionaryError(
                f"levels: {t!r} is not a number of atoms; give sizes such as 16,64,256,M "
                f"(M: all atoms) or {NO_LEVELS}"
            ) from None
    if any(s < 1 for s in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise DictionaryError(
            f"levels: sizes must be positive and increasing, got {','.join(items)}"
        )
    kept = [int(s) for s in sizes if s < n_atoms] + [int(n_atoms)]
    return kept if len(kept) > 1 else None


def check_levels(levels: Sequence[int] | None, n_atoms: int) -> list[int] | None:
    """``levels`` as stored in a method config: None, or increasing sizes ending at ``n_atoms``."""
    if levels is None:
        return None
    out = [int(v) for v in levels]
    if (
        not out
        or out[-1] != int(n_atoms)
        or out[0] < 1
        or any(b <= a for a, b in zip(out, out[1:], strict=False))
    ):
        raise DictionaryError(
            f"levels must be increasing atom counts ending at the {n_atoms} atoms, got {levels}"
        )
    return out


def feature_levels(levels: Sequence[int] | None, n_atoms: int) -> np.ndarray:
    """(M,) the level of every feature: the size of the smallest prefix holding it.

    A plain dictionary (``levels`` None) has every feature at level M.
    """
    bounds = np.asarray(check_levels(levels, n_atoms) or [int(n_atoms)], dtype=np.int64)
    return bounds[np.searchsorted(bounds, np.arange(int(n_atoms)), side="right")]


def describe_levels(levels: Sequence[int] | None) -> str:
    """``16/64/256/1024`` for a nested dictionary, ``none`` for a plain one."""
    return "/".join(str(v) for v in levels) if levels else NO_LEVELS
