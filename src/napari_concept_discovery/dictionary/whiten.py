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
#: Separates the values of several ``group_by`` columns in a group's name.
GROUP_SEP = " / "
_MAX_LISTED = 20
_RANK_TOL = 1e-7  # eigenvalues below this fraction of the largest are numerical zeros


def _listed(values: Sequence) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def group_columns(by: str | None) -> tuple[str, ...]:
    """The column names of a ``group_by`` setting: ``"plate,cell_type"`` -> both."""
    if by is None:
        return ()
    return tuple(c.strip() for c in str(by).split(",") if c.strip())


def group_labels(table, by: str) -> np.ndarray:
    """Each row's whitening group: the value of ``by``, or of its columns joined by " / "."""
    columns = group_columns(by)
    missing = [c for c in columns if c not in table.columns]
    if not columns or missing:
        raise DictionaryError(
            f"no column {', '.join(map(repr, missing or [by]))} to whiten by; columns are "
            f"{_listed(list(table.columns))}"
        )
    labels = table[columns[0]].astype(str).to_numpy()
    for c in columns[1:]:
        labels = np.char.add(np.char.add(labels.astype(str), GROUP_SEP), table[c].astype(str))
    return np.asarray(labels, dtype=str)


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity of centred samples (N, D) towards mu * I.

    The same estimate as scikit-learn's ``ledoit_wolf_shrinkage``, computed from the Gram
    matrix side when N < D, so it costs O(N^2 D) rather than O(N D^2).
    """
    n, d = x.shape
    if n < 2:
        return 1.0
    sq = np.einsum("ij,ij->i", x, x)  # squared row norms
    mu = sq.sum() / (n * d)
    gram = x @ x.T if n <= d else x.T @ x
    fro = float((gram * gram).sum()) / n**2  # ||X^T X / n||_F^2
    beta = (float((sq * sq).sum()) / n - fro) / (n * d)
    delta = (fro - 2.0 * mu * sq.sum() / n + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else float(beta / delta)


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


def _times_transposed(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``x @ t.T`` through torch's BLAS: numpy's own BLAS threads keep spinning after the
    product and slow the torch products that follow (the coder's), by ~40 ms per site. torch
    is imported here: the settings and the command-line parser import this module without it."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(x)) @ torch.from_numpy(t).T).numpy()


class Whitener:
    """Control-based centring or PCA whitening, optionally fitted per group, then unit norm.

    Parameters are only stored here; :meth:`fit` learns ``mean_`` (G, D), ``transform_``
    (G, K, D) (``None`` in ``"center"`` mode), ``eigenvalues_`` (G, K), ``groups_`` (the G group
    names, ``(None,)`` when not grouped), ``n_samples_`` (G,), ``n_features_in_`` (D) and
    ``n_components_`` (K) and ``shrinkage_`` (G,). For PCA, transform = diag(1 / sqrt(l + eps))
    U^T with U, l the eigenvectors and eigenvalues of the controls' covariance, after shrinking
    it towards mu * I (mu its mean eigenvalue): l = (1 - a) l_sample + a mu with ``shrinkage``
    a, estimated by Ledoit-Wolf when "auto", none when None or 0. ``eigenvalues_`` holds the
    shrunk l. Without ``n_components``, K is the numerical rank of the (shrunk) covariance: all D
    with shrinkage, so null directions are not blown up by 1/sqrt(eps) either way.
    """

    def __init__(
        self,
        mode: Literal["pca", "center"] = "pca",
        eps: float = 1e-6,
        n_components: int | None = None,
        unit_norm: bool = True,
        group_by: str | None = None,
        shrinkage: float | str | None = None,
        within: str | None = None,
    ):
        self.mode = mode
        self.eps = eps
        self.n_components = n_components
        self.unit_norm = unit_norm
        self.group_by = group_by
        self.shrinkage = shrinkage
        self.within = within

    # -- fitting -------------------------------------------------------------------------------

    def _needed(self, d: int) -> int:
        if self.mode == "center":
            return 1
        if self._shrinks():
            return 2  # the shrunk covariance is full rank from two samples on
        return (self.n_components or d) + 1

    def _shrinks(self) -> bool:
        return self.shrinkage == "auto" or bool(self.shrinkage)

    def _check_shrinkage(self) -> None:
        a = self.shrinkage
        if a is None or a == "auto":
            return
        if isinstance(a, str) or not 0.0 <= float(a) <= 1.0:
            raise DictionaryError(f"shrinkage must be 'auto' or a number in [0, 1], got {a!r}")

    def fit(
        self,
        tokens,
        groups: Sequence[Hashable] | None = None,
        within: Sequence[Hashable] | None = None,
    ) -> Whitener:
        """Fit on control tokens (N, D); ``groups`` (N,) labels them when ``group_by`` is set,
        ``within`` (N,) when ``within`` is set."""
        if self.mode not in MODES:
            raise DictionaryError(f"whitening mode must be one of {MODES}, got {self.mode!r}")
        self._check_shrinkage()
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
            rows = [labels == g for g in names]
        else:
            names, parts, rows = (None,), [x], [np.ones(n, dtype=bool)]
        sub = None
        if self.within == "auto":
            raise DictionaryError(
                "within='auto' names no column yet: resolve it against the token table first "
                "(dictionary.within.resolve_within, as pipeline.fit_whitener does)"
            )
        if self.within is not None and self.mode == "pca":
            if within is None:
                raise DictionaryError(
                    f"whitening within {self.within!r} needs a {self.within} label for every "
                    "control token"
                )
            sub = np.asarray(within).astype(str)
            if sub.shape != (n,):
                raise DictionaryError(f"got {sub.shape[0]} {self.within} labels for {n} controls")
        needed = self._needed(d)
        for name, part in zip(names, parts, strict=True):
            if len(part) < needed:
                where = "" if name is None else f" in {self.group_by} {name!r}"
                if self.mode == "center":
                    what = "to centre on"
                elif self._shrinks():
                    what = "to estimate a shrunk covariance"
                else:
                    what = (
                        f"to estimate a {needed - 1}-component covariance in {d} dimensions "
                        "(or shrink the covariance: --whiten-shrinkage auto)"
                    )
                raise DictionaryError(
                    f"{len(part)} control tokens{where}; whitening needs at least {needed} {what}"
                    + (" (choose controls with --whiten COLUMN=VALUE)" if len(part) == 0 else "")
                )
        means, vecs, vals, shrink = [], [], [], []
        for part, in_group in zip(parts, rows, strict=True):
            mu = part.mean(0)
            means.append(mu)
            if self.mode == "pca":
                centred, dof = part - mu, len(part) - 1
                if sub is not None:  # pooled within subgroups: each centred on its own mean
                    kinds = sub[in_group]
                    centred = np.empty_like(part)
                    for k in np.unique(kinds):
                        centred[kinds == k] = part[kinds == k] - part[kinds == k].mean(0)
                    dof = len(part) - len(np.unique(kinds))
                cov = (centred.T @ centred / max(dof, 1)).reshape(d, d)
                lam, u = np.linalg.eigh(cov)
                order = np.argsort(lam)[::-1]
                lam, u = np.clip(lam[order], 0, None), u[:, order]
                a = 0.0
                if self.shrinkage == "auto":
                    a = ledoit_wolf_shrinkage(centred)
                elif self.shrinkage:
                    a = float(self.shrinkage)
                lam = (1.0 - a) * lam + a * lam.mean()
                shrink.append(a)
                vals.append(lam)
                vecs.append(u)
        self.groups_ = names
        self.n_samples_ = np.array([len(p) for p in parts])
        self.n_features_in_ = d
        self.mean_ = np.stack(means)
        if self.mode == "center":
            self.n_components_ = d
            self.transform_ = None
            self.eigenvalues_ = None
            self.shrinkage_ = None
            return self
        self.shrinkage_ = np.asarray(shrink)
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
                out = _times_transposed(out, tr[0])
        else:
            out = np.empty((len(x), self.n_components_), dtype=np.float32)
            for g in np.unique(gi):
                rows = gi == g
                y = x[rows] - mean[g]
                out[rows] = y if tr is None else _times_transposed(y, tr[g])
        if self.unit_norm:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def fit_transform(self, tokens, groups=None) -> np.ndarray:
        return self.fit(tokens, groups).transform(tokens, groups)

    def inverse_directions(self, vectors) -> np.ndarray:
        """Directions (M, K) of the whitened space as raw-token directions (G, M, D), per group.

        The whitening maps a raw change dx to T dx with T = diag(1 / sqrt(l + eps)) U^T; the
        raw direction whose image is v is T^+ v = U diag(sqrt(l + eps)) v (the pseudo-inverse,
        exact on the kept components). This is what an atom adds to a raw token where it is
        active, up to the per-token unit-norm scale, which changes no direction. Without a
        transform ("center" mode) the spaces are the same.
        """
        self._check_fitted()
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.n_components_:
            raise DictionaryError(
                f"expected (M, {self.n_components_}) whitened directions, got shape {v.shape}"
            )
        if self.transform_ is None:
            return np.broadcast_to(v, (len(self.groups_), *v.shape)).copy()
        scale = self.eigenvalues_ + self.eps  # (G, K): T^+ = T^T diag(l + eps)
        return np.stack([(v * scale[g]) @ self.transform_[g] for g in range(len(self.groups_))])

    # -- state for the dictionary file ---------------------------------------------------------

    def get_params(self) -> dict:
        return {
            "mode": self.mode,
            "eps": self.eps,
            "n_components": self.n_components,
            "unit_norm": self.unit_norm,
            "group_by": self.group_by,
            "shrinkage": self.shrinkage,
            "within": self.within,
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
            "shrinkage": None if self.shrinkage_ is None else self.shrinkage_.tolist(),
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
        shrink = meta.get("shrinkage")
        w.shrinkage_ = None if shrink is None else np.asarray(shrink)
        return w

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"Whitener({args})"
