"""Feature families: features that point the same way or fire on the same cells, read as one.

A dictionary with many atoms splits a broad concept over several features (docs/architecture.md,
"Concepts come at several scales"): copies of one direction that each take part of the cells,
or atoms the pursuit picks together. No single member then scores the concept, but their
summed code does. A family is a cluster of features under average-linkage agglomerative
clustering on the distance ``1 - max(decoder cosine, co-activation)``, cut at
``FAMILY_DISTANCE``:

- decoder cosine: the cosine of two atoms (negative counts as 0: opposite directions are not
  one concept), which is high for split copies even when they fire on disjoint cells;
- co-activation: the Jaccard index of the sets of tokens the two features are active on,
  which is high for features that fire together whatever their directions.

Taking the larger of the two lets either kind of kinship join features; average linkage asks
the whole family, not one chain of neighbours, to be that close. Clustering is deterministic
(no random start). Features in no family of two or more get family -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .concepts import _active, _csr, feature_auroc, require_columns, selectivity

#: Families are cut where the average ``1 - max(cosine, co-activation)`` between two groups
#: exceeds this: members are on average at least as similar as atoms at 60 degrees (cos 0.5),
#: or as features sharing half of their joint cells.
FAMILY_DISTANCE = 0.5


def family_distance(atoms: np.ndarray, codes) -> np.ndarray:
    """(M, M) ``1 - max(max(cos, 0), Jaccard co-activation)`` with zeros on the diagonal."""
    w = np.asarray(atoms, dtype=np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cos = np.clip(w @ w.T, 0.0, 1.0)
    act = _active(codes).tocsc()
    both = np.asarray((act.T @ act).todense(), dtype=np.float64)
    n = np.diag(both).copy()
    union = n[:, None] + n[None, :] - both
    jaccard = np.divide(both, union, out=np.zeros_like(both), where=union > 0)
    dist = 1.0 - np.maximum(cos, jaccard)
    np.fill_diagonal(dist, 0.0)
    return np.clip((dist + dist.T) / 2, 0.0, 1.0)


def feature_families(atoms: np.ndarray, codes, threshold: float = FAMILY_DISTANCE) -> np.ndarray:
    """(M,) family of every feature: 0, 1, ... for families of two or more (largest first,
    ties by their first feature), -1 for a feature in none."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    m = int(np.asarray(atoms).shape[0])
    if m < 2:
        return np.full(m, -1, dtype=np.int64)
    dist = family_distance(atoms, codes)
    tree = linkage(squareform(dist, checks=False), method="average")
    cluster = fcluster(tree, t=threshold, criterion="distance")
    sizes = np.bincount(cluster)
    groups = [c for c in np.unique(cluster) if sizes[c] >= 2]
    first = {c: int(np.flatnonzero(cluster == c)[0]) for c in groups}
    order = sorted(groups, key=lambda c: (-sizes[c], first[c]))
    out = np.full(m, -1, dtype=np.int64)
    for i, c in enumerate(order):
        out[cluster == c] = i
    return out


def family_matrix(families: np.ndarray) -> sp.csr_matrix:
    """(M, F) indicator of each feature's family; codes @ it are the families' summed codes."""
    families = np.asarray(families)
    member = np.flatnonzero(families >= 0)
    n_fam = int(families.max()) + 1 if member.size else 0
    return sp.csr_matrix(
        (np.ones(member.size), (member, families[member])), shape=(len(families), n_fam)
    )


def summed_codes(codes, families: np.ndarray) -> sp.csr_matrix:
    """(N, F) each family's summed code: the sum of its members' codes on each token."""
    return _csr(_csr(codes) @ family_matrix(families))


def family_table(
    codes,
    families: np.ndarray,
    table: pd.DataFrame | None = None,
    columns: Sequence[str] = (),
    truth_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per family of two or more: ``members`` (space-separated feature numbers),
    ``n_members``, ``frequency`` of its summed code; for label ``columns`` the (column, value)
    its summed code is most selective for (``selectivity_family``, avg form) with the best
    single member for that same value (``best_member``, ``selectivity_best_member``); for
    ``truth_columns`` the true concept its summed code recovers best (``concept``,
    ``auroc_family``) with the best member's AUROC for that concept (``auroc_best_member``).
    """
    csr = _csr(codes)
    fam = np.asarray(families)
    n_fam = int(fam.max()) + 1 if (fam >= 0).any() else 0
    summed = summed_codes(csr, fam)
    freq = np.asarray((_active(summed)).sum(0)).ravel() / max(csr.shape[0], 1)
    members = [np.flatnonzero(fam == i) for i in range(n_fam)]
    out = pd.DataFrame(
        {
            "family": np.arange(n_fam),
            "n_members": [len(x) for x in members],
            "members": [" ".join(map(str, x)) for x in members],
            "frequency": freq,
        }
    )
    if n_fam == 0:
        return out
    if columns:
        require_columns(table, columns, "family selectivity")
        best = np.full(n_fam, -np.inf)
        col_of = np.full(n_fam, "", dtype=object)
        val_of = np.full(n_fam, "", dtype=object)
        member_best = np.full(n_fam, -1)
        member_sel = np.full(n_fam, np.nan)
        for col in columns:
            labels = table[col].to_numpy()
            s_fam = selectivity(summed, labels, col)
            s_feat = selectivity(csr, labels, col)
            i = s_fam.avg.argmax(0)
            v = s_fam.avg[i, np.arange(n_fam)]
            better = v > best
            for f in np.flatnonzero(better):
                own = s_feat.avg[i[f], members[f]]
                best[f], col_of[f], val_of[f] = v[f], col, s_fam.values[i[f]]
                member_best[f] = members[f][int(own.argmax())]
                member_sel[f] = float(own.max())
        out["top_column"] = col_of
        out["top_label"] = val_of
        out["selectivity_family"] = best
        out["best_member"] = member_best
        out["selectivity_best_member"] = member_sel
    if truth_columns:
        concept, auc_fam, auc_member = family_concepts(csr, summed, members, table, truth_columns)
        out["concept"] = concept
        out["auroc_family"] = auc_fam
        out["auroc_best_member"] = auc_member
    return out


def _concepts(table: pd.DataFrame, truth_columns: Sequence[str]):
    """(name, judged rows, membership) of every true concept, as ``truth.concept_auroc``."""
    for col in truth_columns:
        known = table[col].notna().to_numpy()
        series = table[col][known].infer_objects()
        rows = np.flatnonzero(known)
        if series.dtype == bool:
            yield str(col), rows, series.to_numpy()
        else:
            s = series.astype(str).to_numpy()
            for v in sorted(set(s)):
                yield f"{col}={v}", rows, s == v


def family_concepts(csr, summed, members, table, truth_columns):
    """Per family: the concept its summed code scores best, that AUROC, and its best member's."""
    require_columns(table, truth_columns, "family concepts")
    n_fam = summed.shape[1]
    best = np.full(n_fam, -np.inf)
    name = np.full(n_fam, "", dtype=object)
    member_auc = np.full(n_fam, np.nan)
    for concept, rows, member in _concepts(table, truth_columns):
        auc = feature_auroc(summed[rows], member)
        feat = feature_auroc(csr[rows], member)
        better = np.nan_to_num(auc, nan=-np.inf) > best
        for f in np.flatnonzero(better):
            best[f], name[f] = auc[f], concept
            member_auc[f] = float(np.nanmax(feat[members[f]]))
    return name, np.where(np.isfinite(best), best, np.nan), member_auc


def concept_families(codes, families: np.ndarray, table, truth_columns) -> pd.DataFrame:
    """Per true concept: the family whose summed code scores it best (``best_family``,
    ``family_auroc``, ``family_members``), to sit beside the best single feature."""
    csr = _csr(codes)
    fam = np.asarray(families)
    summed = summed_codes(csr, fam)
    rows = []
    for concept, judged, member in _concepts(table, truth_columns):
        auc = feature_auroc(summed[judged], member) if summed.shape[1] else np.array([])
        ok = np.isfinite(auc)
        f = int(np.flatnonzero(ok)[np.argmax(auc[ok])]) if ok.any() else -1
        rows.append(
            {
                "concept": concept,
                "best_family": f,
                "family_auroc": float(auc[f]) if f >= 0 else float("nan"),
                "family_members": " ".join(map(str, np.flatnonzero(fam == f))) if f >= 0 else "",
            }
        )
    return pd.DataFrame(rows)
