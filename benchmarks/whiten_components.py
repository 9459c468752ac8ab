"""Whitened components sized to the control cells (or more shrinkage): concept bars and the
well-level test.

    python benchmarks/whiten_components.py --work <concept_recovery's work folder> \
        --setting default-p4-s1 --ratios all 2 4 8 [--shrinkage auto 0.3 0.6]

For each ratio r, the default dictionary of ``concept_recovery.py`` is trained with the whitening
kept to (control cells / r) principal components (``WhitenSettings.n_components``; "all" is the
default, every component with Ledoit-Wolf shrinkage), and scored as ``concept_recovery`` scores its
arms: the best feature or family per true concept against its bar (* where missed; anchors from
the setting's results.json, so run concept_recovery on the folder first) and the features the
well-level test calls changed for the null and the real perturbations. The question: whether
whitening with fewer directions than the controls can estimate stops every non-control well from
looking changed (results in benchmarks/results/concept_recovery.txt).
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="concept_recovery's --work folder")
    ap.add_argument("--setting", default="default-p4-s1", help="a setting's folder in it")
    ap.add_argument("--ratios", nargs="+", default=["all", "2", "4", "8"])
    ap.add_argument(
        "--shrinkage",
        nargs="+",
        default=["auto"],
        help="the whitening's shrinkage towards the identity (auto: Ledoit-Wolf), each tried",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from napari_concept_discovery.analysis.truth import join_truth, truth_concepts
    from napari_concept_discovery.embed.store import ActivationStore

    torch.set_num_threads(args.threads)
    folder = Path(args.work) / args.setting
    store = ActivationStore.open(next(folder.glob("store-*.zarr")))
    table = join_truth(store.table("cell"), pd.read_csv(folder / "plates" / "truth.csv"))
    concepts = {c.name: c for c in truth_concepts(table)}
    res = json.loads((folder / "results.json").read_text())
    n_ctrl = int((table["well_type"].astype(str) == "negative_control").sum())
    default_settings = cr.arm_settings
    runs = [(r, sh) for sh in args.shrinkage for r in args.ratios]
    for ratio, shrink in runs:
        nc = None if ratio == "all" else int(n_ctrl / float(ratio))
        shrinkage = str(shrink)  # "auto" or a number, as --whiten-shrinkage takes it

        def sized(arm, seed, nc=nc, shrinkage=shrinkage):
            s = default_settings(arm, seed)
            return s.replace(whiten=s.whiten.replace(n_components=nc, shrinkage=shrinkage))

        cr.arm_settings = sized
        out = cr.run_arm(store, table, concepts, {}, 1)
        floor = max(out["floor feature"], np.nan_to_num(out["floor family"]))
        met_c = met_n = 0
        detail = []
        for name, c in res["concepts"].items():
            got = float(np.nanmax([out["feature"][name], out["family"][name]]))
            if c["kind"] == "null perturbation":
                ok = got <= floor + cr.NULL_MARGIN
                met_n += ok
            else:
                ok = got >= cr.need(c["anchor"])
                met_c += ok
            detail.append(f"{name[:8]} {got:.3f}{'' if ok else '*'}")
        sig = out["significant"]
        nulls = [k for k in sig if res["concepts"].get(k, {}).get("kind") == "null perturbation"]
        print(
            f"{args.setting} controls {n_ctrl} ratio {ratio} components {nc or 'all'} shrinkage "
            f"{shrink}: concepts "
            f"{met_c}/{len(res['concepts']) - len(nulls)} nulls {met_n}/{len(nulls)} (floor "
            f"{floor:.3f}); significant features: nulls {[sig[k] for k in nulls]} real "
            f"{[v for k, v in sig.items() if k not in nulls]}",
            flush=True,
        )
        print("   " + "  ".join(detail), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
