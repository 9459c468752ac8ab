"""Concept recovery over training seeds: is a difference between two arms the arm or the seed?

``concept_recovery.py`` trains each arm once, with the setting's seed. A concept one arm finds
at 0.99 and another at 0.74 may be a seed away from equal: this trains each arm on the same
cached store with several training seeds (the data, the truth and the control splits stay
those of the setting) and prints, per arm, each seed's best feature or family per concept and
the mean (min-max) over seeds. Issue 24e used it to tell whether estimating the whitening's
covariance within cell types lost ER aggregation at 2 plates by the seed or by the whitening
(benchmarks/results/concept_recovery.txt, "Over training seeds").

Run (after concept_recovery.py has built the setting under --work):
    python benchmarks/concept_recovery_seeds.py --work DIR --setting default:2:1 --seeds 1 2 3 \
        --arm 'within:{"views": "whitened", "within": "cell_type"}' \
        --arm 'pooled:{"views": "whitened"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import concept_recovery as cr  # noqa: E402

KINDS = ("cell type", "perturbation", "null perturbation")


def parse_arm(text: str) -> tuple[str, dict]:
    name, sep, spec = text.partition(":")
    try:
        arm = json.loads(spec) if sep else None
    except json.JSONDecodeError:
        arm = None
    if not name or not isinstance(arm, dict):
        raise SystemExit(
            f'error: --arm takes NAME:JSON (e.g. \'pooled:{{"views": "whitened"}}\'), got {text!r}'
        )
    return name, arm


def load_setting(work: Path, setting: cr.Setting, model: str, wells: int, size: int):
    """(store, table, concepts) of a setting concept_recovery.py has built (refused otherwise)."""
    from napari_concept_discovery.analysis.truth import join_truth, truth_concepts
    from napari_concept_discovery.embed.store import ActivationStore
    from napari_concept_discovery.models import load_model

    plates = cr.setting_plates(work, setting, wells, size)
    weights = load_model(model).weights_hash
    path = work / setting.folder / f"store-{weights[:12]}.zarr"
    if not path.is_dir():
        raise SystemExit(f"error: no store at {path}: run concept_recovery.py --work {work} first")
    store = ActivationStore.open(path)
    table = join_truth(store.table("cell"), pd.read_csv(plates / "truth.csv"))
    return store, table, {c.name: c for c in truth_concepts(table)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="concept_recovery.py's --work (reused)")
    ap.add_argument("--setting", default="default:2:1", help="VARIANT:PLATES:SEED")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--arm", action="append", required=True, help="NAME:JSON, as ARMS")
    ap.add_argument("--model", default="default")
    ap.add_argument("--wells", type=int, default=24)
    ap.add_argument("--size", type=int, default=384)
    args = ap.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    setting = cr.Setting.parse(args.setting)

    import torch

    torch.set_num_threads(1)
    store, table, concepts = load_setting(
        Path(args.work), setting, args.model, args.wells, args.size
    )
    shown = [n for n, c in concepts.items() if c.kind in KINDS]
    train = cr.arm_settings
    head = f"{'arm':14s} {'seed':>4s} " + " ".join(f"{n[:9]:>9s}" for n in shown) + "   floor"
    print(f"{setting.name}: best feature or family per concept, per training seed\n{head}")
    summary = {}
    for name, arm in arms:
        rows = []
        for seed in args.seeds:
            cr.arm_settings = lambda a, s, seed=seed: train(a, s).replace(seed=seed)
            try:
                r = cr.run_arm(store, table, concepts, arm, setting.seed)
            finally:
                cr.arm_settings = train
            best = [cr.best_of({"arms": {name: r}}, name, n) for n in shown]
            floor = float(np.nanmax([r["floor feature"], r["floor family"]]))
            rows.append([*best, floor])
            print(
                f"{name[:14]:14s} {seed:4d} " + " ".join(f"{v:9.3f}" for v in rows[-1]), flush=True
            )
        summary[name] = np.array(rows)
    print(f"\nmean (min-max) over training seeds {', '.join(map(str, args.seeds))}")
    for i, concept in enumerate([*shown, "floor"]):
        cells = [
            f"{v[:, i].mean():.3f} ({v[:, i].min():.2f}-{v[:, i].max():.2f})"
            for v in summary.values()
        ]
        if i == 0:
            print(f"{'concept':22s} " + " ".join(f"{n[:18]:>18s}" for n in summary))
        print(f"{concept:22s} " + " ".join(f"{c:>18s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
