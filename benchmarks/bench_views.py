"""Whitened, within-type, centred, or several: which concepts each view of the tokens finds,
through the product's own path (``train_on_store`` with ``TrainSettings.views``,
``encode_store``).

For one plate set per ``--plates`` value (the default generator, seed ``--seed``), embedded with
the bundled default model, ICFL dictionaries are trained on the cell tokens with the library's
defaults (atoms and steps sized to the tokens; whitening on the negative controls) in five
arms: each view alone (whitened: the default before views; within-type: the covariance within
cell types; centred), the two views that were the default before the within-type view, and
all three (the default; one part per view, each sized by the rule). For every true concept
(``truth.truth_concepts``) the table shows the best single feature's AUROC, and for the
dictionaries in views the view of that feature; nulls should stay near the control-split
floor. The well-level test (``analysis.welltest``) counts features changed by each
perturbation.

What it is for: choosing the default views. Times are from a shared machine and are not
compared across runs.

Run: python benchmarks/bench_views.py [--plates 2 4] [--seeds 1 2] [--wells 12] [--size 384]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _report import add_threads, stamped_log, use_threads  # noqa: E402
from concept_recovery import CONTROLS, plates_for  # noqa: E402

#: (name, views, atoms per view: None sizes them by the rule)
ARMS = (
    ("whitened", "whitened", None),
    ("within-type", "within-type", None),
    ("centred", "centred", None),
    ("two views", "whitened,centred", None),
    ("three views", "whitened,within-type,centred", None),
)


def run_arm(store, table, concepts, views: str, atoms: int | None, seed: int) -> dict:
    from napari_concept_discovery.analysis.concepts import feature_auroc
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.analysis.profiles import concept_profiles
    from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings, train_on_store

    settings = TrainSettings(
        method="icfl",
        views=views,
        atoms=atoms,
        seed=seed,
        whiten=WhitenSettings(CONTROLS),
        checkpoint_every=0,
    )
    t = time.perf_counter()
    trained = train_on_store(store, settings)
    d = trained.dictionary
    codes, _ = encode_store(store, d)
    seconds = time.perf_counter() - t
    fviews = d.feature_views()
    out = {"concepts": {}, "seconds": seconds, "atoms": d.n_atoms}
    for c in concepts:
        auc = feature_auroc(codes[c.rows], c.member)
        best = int(np.nanargmax(auc))
        out["concepts"][c.name] = (float(auc[best]), "" if fviews is None else fviews[best])
    prof = concept_profiles(codes, table, "perturbation", CONTROLS, seed=seed)
    sig = prof.significant().sum(1)
    out["significant"] = {v: int(s) for v, s in zip(prof.values, sig, strict=True)}
    return out


def run_plates(n_plates: int, seed: int, args, log) -> str:
    from napari_concept_discovery.analysis.truth import join_truth, truth_concepts
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate

    work = Path(args.work) / f"plates{n_plates}-seed{seed}"
    plates = plates_for(work, seed, n_plates, args.wells, args.size)
    t = time.perf_counter()
    store = embed_plate(plates, EmbedSettings(batch_size=8), work / "store.zarr")
    table = join_truth(store.table("cell"), pd.read_csv(plates / "truth.csv"))
    concepts = truth_concepts(table)
    log(
        f"{n_plates} plates, seed {seed}: {len(table)} cells, store in {time.perf_counter() - t:.0f} s"
    )
    results = {}
    for name, views, atoms in ARMS:
        results[name] = run_arm(store, table, concepts, views, atoms, seed)
        log(f"  {name}: {results[name]['seconds']:.0f} s")
    names = list(results)
    lines = [
        f"{n_plates} plates x {args.wells} wells x {args.size} px, seed {seed}: {len(table)} "
        "cells; ICFL, library defaults (atoms and steps sized to the tokens, whitening on "
        f"{CONTROLS}); best single-feature AUROC (in views: and the view of that feature)",
        f"{'concept':22s} {'kind':18s} "
        + " ".join(f"{n:>24s}" if " views" in n else f"{n:>11s}" for n in names),
    ]

    def cell(n, value, fmt) -> str:
        return f"{value:{fmt}}" + (" " * 13 if " views" in n else "")

    for c in concepts:
        row = f"{c.name:22s} {c.kind:18s} "
        for n in names:
            auc, view = results[n]["concepts"][c.name]
            row += f" {auc:11.3f}" + (f" {view:>12s}" if " views" in n else "")
        lines.append(row)
    for label, get, fmt in (
        ("atoms", lambda r: r["atoms"], "11d"),
        ("train + encode seconds (loaded machine)", lambda r: r["seconds"], "11.0f"),
        *(
            (f"well test: significant, {v}", lambda r, v=v: r["significant"][v], "11d")
            for v in results[names[0]]["significant"]
        ),
    ):
        lines.append(f"{label:41s} " + " ".join(cell(n, get(results[n]), fmt) for n in names))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-views-work", help="plates and stores (reused)")
    ap.add_argument("--plates", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--wells", type=int, default=12)
    ap.add_argument("--size", type=int, default=384)
    add_threads(ap, 1)
    args = ap.parse_args()
    use_threads(args.threads)
    log = stamped_log()

    for n in args.plates:
        for seed in args.seeds:
            print(run_plates(n, seed, args, log), flush=True)
            print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
