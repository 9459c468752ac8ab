"""Concepts at every scale: dictionary size, nested (Matryoshka) levels and feature families,
measured on synthetic plates with ground truth through the product's own path.

For one plate set per ``--plates`` value (the default generator, seed ``--seed``), embedded
with the bundled default model, the cell tokens are whitened on each plate's control wells and
ICFL dictionaries are trained with the same non-zeros per token (``--sparsity``) and steps sized
to the tokens, at several sizes M, plain and nested. For every true concept
(``truth.truth_concepts``) the table shows the best single feature's AUROC and the best
feature family's summed-code AUROC (``analysis.families``), then per arm: FVU, FVU of the
first 16 atoms alone (each prefix coded by its own pursuit), the largest fraction of cells a
feature fires on, the families, and how many features the well-level test
(``analysis.welltest``) finds changed by each perturbation (for a null perturbation, any is
false). ``sized`` is the atoms rule (``settings.first_atoms``) for this plate set's cells.

What it is for: choosing the atoms rule and whether nested dictionaries are the default. The
machine it ran on is named in the results file, with its load; times are not compared.

Run: python benchmarks/bench_scales.py [--plates 2 4] [--seed 1] [--wells 12] [--size 384]
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


def arms(n_cells: int):
    from napari_concept_discovery.dictionary.settings import first_atoms

    sized = first_atoms(n_cells)
    return [
        ("M16", 16, "none"),
        ("M64", 64, "none"),
        ("M256", 256, "none"),
        ("M256 nest", 256, "16,64,M"),
        ("M64 nest", 64, "16,M"),
        (f"sized={sized}", sized, "none"),
    ]


def prefix_fvu(dictionary, store, width: int) -> float:
    """FVU of the first ``width`` atoms alone on the store's cells (their own pursuit)."""
    import torch

    from napari_concept_discovery.dictionary.base import sparse_decode

    tokens = np.asarray(store.tokens("cell", dictionary.token_form), dtype=np.float32)
    x = torch.from_numpy(
        dictionary.whitener.transform(tokens, dictionary.groups_of(store.table("cell")))
    ).float()
    model = dictionary.model
    with torch.no_grad():
        codes = model.encode_prefix(x, min(width, model.n_atoms))
        x_hat = sparse_decode(codes, model.atoms) + model.bias
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def run_arm(store, table, concepts, name, atoms, levels, args) -> dict:
    from napari_concept_discovery.analysis.analyze import dictionary_families
    from napari_concept_discovery.analysis.concepts import _active, feature_auroc
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.analysis.families import summed_codes
    from napari_concept_discovery.analysis.profiles import concept_profiles
    from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings, train_on_store

    settings = TrainSettings(
        method="icfl",
        atoms=atoms,
        levels=levels,
        sparsity=args.sparsity,
        batch_size=args.batch_size,
        seed=args.seed,
        whiten=WhitenSettings(CONTROLS, by="plate"),
        views="whitened",  # the whitened view's sizes (bench_views.py compares the views)
        checkpoint_every=0,
    )
    t = time.perf_counter()
    trained = train_on_store(store, settings)
    codes, _ = encode_store(store, trained.dictionary)
    fam = dictionary_families(trained.dictionary, codes)
    summed = summed_codes(codes, fam)
    out = {"concepts": {}, "seconds": time.perf_counter() - t}
    for c in concepts:
        feat = feature_auroc(codes[c.rows], c.member)
        fams = feature_auroc(summed[c.rows], c.member) if summed.shape[1] else np.array([np.nan])
        out["concepts"][c.name] = (float(np.nanmax(feat)), float(np.nanmax(fams)))
    prof = concept_profiles(codes, table, "perturbation", CONTROLS, seed=args.seed)
    sig = prof.significant().sum(1)
    out["significant"] = {v: int(s) for v, s in zip(prof.values, sig, strict=True)}
    freq = np.asarray(_active(codes).mean(0)).ravel()
    out.update(
        fvu=trained.metrics["fvu"],
        fvu16=prefix_fvu(trained.dictionary, store, 16),
        max_freq=float(freq.max()),
        families=int(fam.max()) + 1 if (fam >= 0).any() else 0,
        in_families=int((fam >= 0).sum()),
    )
    return out


def run_plates(n_plates: int, args, log) -> str:
    from napari_concept_discovery.analysis.truth import join_truth, truth_concepts
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate

    work = Path(args.work) / f"plates{n_plates}"
    plates = plates_for(work, args.seed, n_plates, args.wells, args.size)
    t = time.perf_counter()
    store = embed_plate(plates, EmbedSettings(batch_size=8), work / "store.zarr")
    table = join_truth(store.table("cell"), pd.read_csv(plates / "truth.csv"))
    concepts = truth_concepts(table)
    log(f"{n_plates} plates: {len(table)} cells, store in {time.perf_counter() - t:.0f} s")
    results = {}
    for name, atoms, levels in arms(len(table)):
        results[name] = run_arm(store, table, concepts, name, atoms, levels, args)
        log(f"  {name}: {results[name]['seconds']:.0f} s")
    names = list(results)
    lines = [
        f"{n_plates} plates x {args.wells} wells x {args.size} px, seed {args.seed}: "
        f"{len(table)} cells; ICFL whitened per plate on controls, {args.sparsity} non-zeros; "
        "each cell: best feature / best family AUROC",
        f"{'concept':24s} {'kind':18s} " + " ".join(f"{n:>13s}" for n in names),
    ]
    for c in concepts:
        row = f"{c.name:24s} {c.kind:18s} "
        row += " ".join("{:>6.3f}/{:<6.3f}".format(*results[n]["concepts"][c.name]) for n in names)
        lines.append(row)
    for label, key, fmt in (
        ("FVU", "fvu", "13.3f"),
        ("FVU of atoms 0-15 alone", "fvu16", "13.3f"),
        ("most cells one feature fires on", "max_freq", "13.3f"),
        ("families (2+ features)", "families", "13d"),
        ("features in families", "in_families", "13d"),
        ("seconds (loaded machine)", "seconds", "13.0f"),
    ):
        lines.append(f"{label:43s} " + " ".join(f"{results[n][key]:{fmt}}" for n in names))
    values = list(results[names[0]]["significant"])
    for v in values:
        lines.append(
            f"{'well test: significant, ' + v:43s} "
            + " ".join(f"{results[n]['significant'][v]:13d}" for n in names)
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-scales-work", help="plates and stores (reused)")
    ap.add_argument("--plates", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wells", type=int, default=12)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--sparsity", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    add_threads(ap, 1)
    args = ap.parse_args()
    use_threads(args.threads)
    log = stamped_log()

    for n in args.plates:
        print(run_plates(n, args, log), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
