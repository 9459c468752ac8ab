"""Input preparation for a dictionary: centre on controls, PCA-whiten on controls, unit norm.

Whitening fitted on control tokens maps the controls to zero mean and identity covariance, so
a dictionary spends its atoms on what differs from the controls rather than on the directions of
largest nuisance variance (docs/architecture.md, "Dictionaries"). Fitting per group (per plate, as
typical-variation normalisation does, or per cell type) also removes batch effects between the
groups. Note that controls mixing two cell types whiten the cell-type difference away.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

from ..errors import DictionaryError

MODES = ("pca", "center")
_MAX_LISTED = 20
_RANK_TOL = 1e-7  # eigenvalues below this fraction of the largest are numerical zeros


def parse_control(spec: str) -> tuple[str, str]:
    """``"well_type=negative_control"`` -> ``("well_type", "negative_control")``."""
    column, sep, value = spec.partition("=")
    if not sep or not column.strip() or not value.strip():
        raise DictionaryError(f"controls must be given as COLUMN=VALUE, got {spec!r}")
    return column.strip(), value.strip()


def _listed(values: Sequence) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def control_mask(table, column: str, value) -> np.ndarray:
    """Boolean mask of the rows of ``table`` whose ``column`` equals ``value``.

    Values compare as text, so ``value`` can come straight from a command line. Raises a
    :class:`DictionaryError` naming the column and the values present when nothing matches.
    """
    if column not in table.columns:
        raise DictionaryError(
            f"no column {column!r} to choose controls by; columns are {_listed(list(table.columns))}"
        )
    col = table[column].astype(str).to_numpy()
    mask = col == str(value)
    if not mask.any():
        present = sorted(set(col.tolist()))
        raise DictionaryError(
            f"no rows with {column} == {value!r} to use as controls; "
            f"values present in {column!r}: {_listed(present)}"
        )
    return mask


class Whitener:
    """Control-based centring or PCA whitening, optionally fitted per group, then unit norm.

    Parameters are only stored here; :meth:`fit` learns ``mean_`` (G, D), ``transform_``
    (G, K, D) (``None`` in ``"center"`` mode), ``eigenvalues_`` (G, K), ``groups_`` (the G group
    names, ``(None,)`` when not grouped), ``n_samples_`` (G,), ``n_features_in_`` (D) and
    ``n_components_`` (K). For PCA, transform = diag(1 / sqrt(l + eps)) U^T with U, l the
    eigenvectors and eigenvalues of the controls' covariance. Without ``n_components``, K is the
    numerical rank of the covariance (so that null directions are not blown up by 1/sqrt(eps)).
    """

    def __init__(
        self,
        mode: Literal["pca", "center"] = "pca",
        eps: float = 1e-6,
        n_components: int | None = None,
        unit_norm: bool = True,
        group_by: str | None = None,
    ):
        self.mode = mode
        self.eps = eps
        self.n_components = n_components
        self.unit_norm = unit_norm
        self.group_by = group_by

    # -- fitting -------------------------------------------------------------------------------

    def _needed(self, d: int) -> int:
        if self.mode == "center":
            return 1
        return (self.n_components or d) + 1

    def fit(self, tokens, groups: Sequence[Hashable] | None = None) -> Whitener:
        """Fit on control tokens (N, D); ``groups`` (N,) labels them when ``group_by`` is set."""
        if self.mode not in MODES:
            raise DictionaryError(f"whitening mode must be one of {MODES}, got {self.mode!r}")
        x = np.asarray(tokens, dtype=np.float64)
        if x.ndim != 2:
            raise DictionaryError(f"control tokens must be (N, D), got shape {x.shape}")
        n, d = x.shape
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise DictionaryError(
                f"{int((~finite).sum())} of {n} control tokens hold NaN or Inf; whitening on "
                "them would give no usable components (leave them out first)"
            )
        if self.n_components is not None and not 1 <= self.n_components <= d:
            raise DictionaryError(f"n_components must be in 1..{d}, got {self.n_components}")
        if self.group_by is not None:
            if groups is None:
                raise DictionaryError(
                    f"whitening per {self.group_by!r} needs a group label for every control token"
                )
            labels = np.asarray(groups).astype(str)
            if labels.shape != (n,):
                raise DictionaryError(f"got {labels.shape[0]} group labels for {n} control tokens")
            names = tuple(sorted(set(labels.tolist())))
            parts = [x[labels == g] for g in names]
        else:
            names, parts = (None,), [x]
        needed = self._needed(d)
        for name, part in zip(names, parts, strict=True):
            if len(part) < needed:
                where = "" if name is None else f" in {self.group_by} {name!r}"
                what = (
                    "to centre on"
                    if self.mode == "center"
                    else f"to estimate a {needed - 1}-component covariance in {d} dimensions"
                )
                raise DictionaryError(
                    f"{len(part)} control tokens{where}; whitening needs at least {needed} {what}"
                    + (" (choose controls with --whiten COLUMN=VALUE)" if len(part) == 0 else "")
                )
        means, vecs, vals = [], [], []
        for part in parts:
            mu = part.mean(0)
            means.append(mu)
            if self.mode == "pca":
                cov = np.cov(part - mu, rowvar=False).reshape(d, d)
                lam, u = np.linalg.eigh(cov)
                order = np.argsort(lam)[::-1]
                vals.append(np.clip(lam[order], 0, None))
                vecs.append(u[:, order])
        self.groups_ = names
        self.n_samples_ = np.array([len(p) for p in parts])
        self.n_features_in_ = d
        self.mean_ = np.stack(means)
        if self.mode == "center":
            self.n_components_ = d
            self.transform_ = None
            self.eigenvalues_ = None
            return self
        if self.n_components is not None:
            k = self.n_components
        else:
            k = min(int((lam > _RANK_TOL * max(lam[0], 1e-300)).sum()) for lam in vals)
        self.n_components_ = k
        self.eigenvalues_ = np.stack([lam[:k] for lam in vals])
        self.transform_ = np.stack(
            [(u[:, :k] / np.sqrt(lam[:k] + self.eps)).T for u, lam in zip(vecs, vals, strict=True)]
        )
        return self

    # -- applying ------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise DictionaryError("this Whitener is not fitted yet; call fit(control_tokens)")

    def group_index(self, groups: Sequence[Hashable] | None, n: int) -> np.ndarray:
        """Index into ``groups_`` for each of ``n`` tokens; unknown groups are refused."""
        if self.groups_ == (None,):
            return np.zeros(n, dtype=np.intp)
        if groups is None:
            raise DictionaryError(
                f"this whitening was fitted per {self.group_by!r}; give the {self.group_by} of every token"
            )
        labels = np.asarray(groups).astype(str)
        names = np.asarray(self.groups_, dtype=str)
        pos = np.searchsorted(names, labels)
        pos = np.clip(pos, 0, len(names) - 1)
        bad = names[pos] != labels
        if bad.any():
            unknown = sorted(set(labels[bad].tolist()))
            raise DictionaryError(
                f"no whitening fitted for {self.group_by} {_listed(unknown)}; "
                f"fitted on {_listed(list(self.groups_))} (controls are needed in every {self.group_by})"
            )
        return pos

    def transform(self, tokens, groups: Sequence[Hashable] | None = None) -> np.ndarray:
        """Whitened (and unit-norm) tokens as float32 (N, K)."""
        self._check_fitted()
        x = np.asarray(tokens, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise DictionaryError(
                f"whitening was fitted on {self.n_features_in_}-dimensional tokens, "
                f"got shape {x.shape}"
            )
        gi = self.group_index(groups, len(x))
        mean = self.mean_.astype(np.float32)
        tr = None if self.transform_ is None else self.transform_.astype(np.float32)
        if len(self.groups_) == 1:
            out = x - mean[0]
            if tr is not None:
                out = out @ tr[0].T
        else:
            out = np.empty((len(x), self.n_components_), dtype=np.float32)
            for g in np.unique(gi):
                rows = gi == g
                y = x[rows] - mean[g]
                out[rows] = y if tr is None else y @ tr[g].T
        if self.unit_norm:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def fit_transform(self, tokens, groups=None) -> np.ndarray:
        return self.fit(tokens, groups).transform(tokens, groups)

    # -- state for the dictionary file ---------------------------------------------------------

    def get_params(self) -> dict:
        return {
            "mode": self.mode,
            "eps": self.eps,
            "n_components": self.n_components,
            "unit_norm": self.unit_norm,
            "group_by": self.group_by,
        }

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able description, arrays) for saving; inverse of :meth:`from_state`."""
        self._check_fitted()
        meta = {
            "params": self.get_params(),
            "groups": list(self.groups_),
            "n_samples": self.n_samples_.tolist(),
            "n_features_in": self.n_features_in_,
            "n_components": self.n_components_,
        }
        arrays = {"whiten_mean": self.mean_}
        if self.transform_ is not None:
            arrays["whiten_transform"] = self.transform_
            arrays["whiten_eigenvalues"] = self.eigenvalues_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> Whitener:
        w = cls(**meta["params"])
        w.groups_ = tuple(meta["groups"])
        w.n_samples_ = np.asarray(meta["n_samples"])
        w.n_features_in_ = int(meta["n_features_in"])
        w.n_components_ = int(meta["n_components"])
        w.mean_ = np.asarray(arrays["whiten_mean"])
        w.transform_ = arrays.get("whiten_transform")
        w.eigenvalues_ = arrays.get("whiten_eigenvalues")
        return w

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"Whitener({args})"
