"""A dictionary in views: parts trained on the whitened and on the centred tokens, read as one.

Each part is a whole :class:`.Dictionary` (coder and whitening) trained on one view of the same
tokens (:mod:`.views`). Encoding runs every part on the same raw tokens and puts their codes
side by side, so features ``0 .. M1-1`` are the first view's and ``M1 .. M1+M2-1`` the next's;
every reader of codes (``analyze``, the explorer, the report, AnnData) works unchanged and
reads each feature's view from :meth:`CombinedDictionary.feature_views`. The parts' atoms live
in different spaces (each view's whitening), so what compares atoms (feature families) does so
within a view only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..errors import DictionaryError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report
from .applied import Dictionary, _as_rows
from .meta import DictionaryMeta
from .views import feature_views


@dataclass
class CombinedDictionary(Dictionary):
    """Parts ``(view, Dictionary)`` applied side by side; ``meta`` is the whole's provenance.

    ``model`` and ``whitener`` are the first part's (the fields every dictionary has: its
    method, and the whitening groups, which all parts share); the atoms are the parts'.
    """

    parts: tuple[tuple[str, Dictionary], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, parts, meta: DictionaryMeta | dict | None = None, path=None) -> CombinedDictionary:
        parts = tuple((str(name), part) for name, part in parts)
        if len(parts) < 2:
            raise DictionaryError(
                f"a dictionary in views needs two parts or more, got {len(parts)}"
            )
        names = [name for name, _ in parts]
        if len(set(names)) != len(names):
            raise DictionaryError(f"the parts' views must differ, got {names}")
        first = parts[0][1]
        widths = {part.input_width for _, part in parts}
        if len(widths) != 1:
            raise DictionaryError(f"the parts take activations of different widths {widths}")
        meta = DictionaryMeta.of(meta if meta is not None else first.meta)
        return cls(first.model, first.whitener, meta, path=path, parts=parts)

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    def part(self, view: str) -> Dictionary:
        for name, part in self.parts:
            if name == view:
                return part
        raise DictionaryError(f"this dictionary has no view {view!r}; it has {self.view_names}")

    def feature_views(self) -> np.ndarray:
        """(M,) the view of every feature."""
        return feature_views(self.view_names, [p.n_atoms for _, p in self.parts])

    def view_slices(self) -> list[tuple[str, slice]]:
        """(view, the slice of its features) per part, in order."""
        out, start = [], 0
        for name, part in self.parts:
            out.append((name, slice(start, start + part.n_atoms)))
            start += part.n_atoms
        return out

    @property
    def n_atoms(self) -> int:
        return sum(p.n_atoms for _, p in self.parts)

    def feature_levels(self) -> np.ndarray:
        return np.concatenate([p.feature_levels() for _, p in self.parts])

    def describe(self) -> str:
        return super().describe() + f", views {' + '.join(self.view_names)}"

    def stain_attribution(self) -> np.ndarray | None:
        shares = [p.stain_attribution() for _, p in self.parts]
        return None if any(s is None for s in shares) else np.vstack(shares)

    def encode(
        self,
        tokens,
        groups=None,
        *,
        batch_size: int = 8192,
        progress: ProgressCallback = None,
        cancel: Cancel = None,
    ) -> sp.csr_matrix:
        """Codes (N, M) of raw tokens: each part's codes of the same rows, side by side.

        Tokens are read once per batch of rows; each part encodes that batch as it would alone
        (same rows per batch, so its codes equal those of the part applied by itself).
        """
        tokens = _as_rows(tokens)
        if len(tokens.shape) != 2:
            raise DictionaryError(
                f"this dictionary takes (N, {self.input_width}) activations; got shape "
                f"{tuple(tokens.shape)}"
            )
        self.check_compatible(width=tokens.shape[1])
        if batch_size < 1:
            raise DictionaryError(f"batch size must be at least 1, got {batch_size}")
        n = int(tokens.shape[0])
        g = None if groups is None else np.asarray(groups).astype(str)
        if g is not None and len(g) != n:
            raise DictionaryError(f"got {len(g)} whitening group labels for {n} tokens")
        blocks = []
        report(progress, "encode", 0, n)
        for start in range(0, n, batch_size):
            if is_cancelled(cancel):
                raise Cancelled(f"encode cancelled after {start} of {n} tokens")
            stop = min(start + batch_size, n)
            rows = np.asarray(tokens[start:stop], dtype=np.float32)
            part_g = None if g is None else g[start:stop]
            blocks.append(
                sp.hstack(
                    [p.encode(rows, part_g, batch_size=batch_size) for _, p in self.parts],
                    format="csr",
                )
            )
            report(progress, "encode", stop, n)
        if not blocks:
            return sp.csr_matrix((0, self.n_atoms), dtype=np.float32)
        return sp.vstack(blocks, format="csr")
