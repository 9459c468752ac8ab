"""Similar-cell search: exact cosine over every cell's codes, against scikit-learn's brute-force
nearest neighbours on the same sparse matrix (the anchor), at growing store sizes.

``cell_selection.cosine_to`` scores every cell with one sparse matrix-vector product, so its
cost is linear in the non-zeros (cells x L0) and needs no index; this prints, per size, the
median time of one query for both, their ratio, and the memory the codes take, so that "exact
up to a million cells" is a measured statement. Codes are random with the store's sparsity
(L0 non-zeros per cell among M features, fixed seed). On a shared machine compare the columns of
one run:

    python benchmarks/bench_similar.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from napari_concept_discovery.analysis.cell_selection import cosine_to


def random_codes(n: int, m: int, l0: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, m, (n, l0))
    vals = rng.random((n, l0)).astype(np.float32)
    rows = np.repeat(np.arange(n), l0)
    return sp.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, m))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=int, default=20)
    ap.add_argument("--top", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from sklearn.neighbors import NearestNeighbors

    print(f"M={args.features} features, L0={args.l0}, top {args.top}, median of {args.repeats}")
    print(f"{'cells':>9} {'codes MB':>9} {'ours s':>8} {'sklearn s':>10} {'ratio':>6} {'same':>5}")
    for n in (int(s) for s in args.sizes.split(",")):
        codes = random_codes(n, args.features, args.l0, args.seed)
        mb = (codes.data.nbytes + codes.indices.nbytes + codes.indptr.nbytes) / 1e6
        row = n // 2

        def ours(codes=codes, row=row):
            sim = cosine_to(codes, row)
            sim[row] = -np.inf
            return np.argpartition(-sim, args.top)[: args.top]

        nn = NearestNeighbors(n_neighbors=args.top + 1, metric="cosine", algorithm="brute")
        nn.fit(codes)

        def anchor(nn=nn, codes=codes, row=row):
            return nn.kneighbors(codes[row], return_distance=False)[0]

        t_ours = median_time(ours, args.repeats)
        t_anchor = median_time(anchor, args.repeats)
        same = set(ours().tolist()) == set(anchor().tolist()) - {row}
        print(
            f"{n:>9} {mb:>9.0f} {t_ours:>8.3f} {t_anchor:>10.3f} "
            f"{t_anchor / t_ours:>6.1f} {'yes' if same else 'no':>5}"
        )


if __name__ == "__main__":
    main()
