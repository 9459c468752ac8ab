"""Linear probe of a model's cell tokens on held-out synthetic plates, against intensity statistics.

Does the bundled model see the perturbations? Held-out plates (generator seed 2000, never used in
training; defaults of the generator, each plate with its own batch effect) are drawn in memory
with their cell labels and per-cell truth. Two kinds of per-cell features are probed the same way:

- the model's cell tokens after every block, with the per-channel tokens concatenated (C x D),
  pooled exactly as ``embed.Embedder`` pools them (coverage-weighted mean of patch tokens);
- the anchor: per-cell intensity statistics (mean, sd and max of every stain over the cell's
  pixels, plus its area: 3C + 1 numbers), computed here from the same images and labels.

Concepts (cells of non-mitotic controls are the negatives of every perturbation, drawn per cell
type in the proportions of the positives, so that cell type cannot separate them):

- each non-null perturbation: its responded cells vs control cells (bar: AUROC >= the anchor's);
- each null perturbation: all its non-mitotic cells vs control cells (bar: AUROC <= 0.6);
- each cell type: one vs the rest, on all cells (bar: AUROC >= 0.95); mitosis (reported only).

Classifier: standardised logistic regression (``StandardScaler`` + ``LogisticRegression``, fixed
C), AUROC of the decision function, averaged over 5 folds that keep every well whole
(``StratifiedGroupKFold`` grouped by plate and well, so no site's cells are on both sides).
Fitting on one plate and scoring on the other (both ways, averaged) is reported beside it.
The default block is the one that meets the most bars, then has the largest smallest margin
over the anchor across the non-null perturbations.

    python scripts/probe_default_model.py [--weights .../default.safetensors] [--no-card]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src/napari_concept_discovery/models/weights"

#: Held-out plates: a generator seed the training never used, every condition on every plate.
HELDOUT = dict(seed=2000, n_plates=2, n_wells=96, n_sites=1, size=512)
#: Logistic-regression inverse regularisation (on standardised features), the same for all inputs.
PROBE_C = 0.1
CELL_TYPE_BAR = 0.95
NULL_BAR = 0.6
#: At most this many control cells per positive cell (matched per cell type).
NEG_PER_POS = 2.0
#: Cell-type and mitosis probes use at most this many cells (stratified draw).
MAX_CELLS = 4000


@dataclass
class HeldoutSite:
    plate: int
    well: str
    site: int
    image: np.ndarray  # (C, H, W) uint8
    cells: np.ndarray  # (H, W) int32 labels
    truth: pd.DataFrame  # one row per label


def _site_job(args) -> HeldoutSite:
    from napari_concept_discovery.synth import planned_site

    plan, site, size, seed = args
    s = planned_site(plan, site, size, seed)
    return HeldoutSite(plan.plate, plan.well, site, s.image, s.cells, s.truth)


def heldout_sites(
    seed: int = 2000,
    n_plates: int = 2,
    n_wells: int = 48,
    n_sites: int = 1,
    size: int = 512,
    workers: int | None = None,
) -> list[HeldoutSite]:
    """The sites ``write_synthetic_plates`` would write for these arguments, in memory."""
    from napari_concept_discovery.synth import plan_plate

    jobs = [
        (plan, s, size, seed)
        for p in range(1, n_plates + 1)
        for plan in plan_plate(p, n_wells, seed)
        for s in range(1, n_sites + 1)
    ]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_site_job(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_site_job, jobs, chunksize=2))


def cell_table(sites: list[HeldoutSite]) -> pd.DataFrame:
    """One row per cell (label order within each site, sites in order) with its truth."""
    rows = []
    for s in sites:
        t = s.truth.sort_values("label")
        rows.append(
            pd.DataFrame(
                {
                    "plate": s.plate,
                    "well": f"{s.plate}_{s.well}",
                    "site": s.site,
                    "label": t.label.to_numpy(),
                    "cell_type": t.cell_type.to_numpy(),
                    "perturbation": t.perturbation.to_numpy(),
                    "responded": t.responded.to_numpy(bool),
                    "mitotic": t.mitotic.to_numpy(bool),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def intensity_stats(sites: list[HeldoutSite]) -> tuple[np.ndarray, list[str]]:
    """The anchor: mean, sd and max of every stain over each cell's pixels, and its area."""
    from scipy import ndimage as ndi

    from napari_concept_discovery.synth import CHANNELS

    out = []
    for s in sites:
        ids = np.unique(s.cells[s.cells > 0])
        cols = []
        for c in range(s.image.shape[0]):
            img = s.image[c].astype(np.float64)
            cols.append(ndi.mean(img, s.cells, ids))
            cols.append(ndi.standard_deviation(img, s.cells, ids))
            cols.append(ndi.maximum(img, s.cells, ids))
        cols.append(np.bincount(s.cells.ravel())[ids])
        out.append(np.stack(cols, axis=1))
    names = [f"{c}_{k}" for c in CHANNELS for k in ("mean", "sd", "max")] + ["area"]
    return np.concatenate(out).astype(np.float32), names


def _all_block_tokens(model, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Per-channel patch tokens (B, C, N, D) after each block in ``blocks``, in one pass."""
    b, c = x.shape[:2]
    t, _ = model.embed_patches(x)
    t = model.prepend_cls(t)
    outs = []
    for i, blk in enumerate(model.blocks[: max(blocks) + 1]):
        t = blk(t)
        if i in blocks:
            u = model.norm(t) if i == model.num_blocks - 1 else t
            u = u[:, model.num_prefix_tokens :]
            outs.append(u.reshape(b, c, -1, u.shape[-1]).float().cpu())
    return outs


@torch.inference_mode()
def model_cell_tokens(
    backend, sites: list[HeldoutSite], blocks: list[int] | None = None, batch_size: int = 16
) -> dict[int, np.ndarray]:
    """Cell tokens (N, C*D) per block, pooled by ``Embedder.finish`` (the product's pooling)."""
    from napari_concept_discovery.embed.compute import Embedder

    blocks = list(range(backend.num_blocks)) if blocks is None else sorted(blocks)
    emb = Embedder(backend, blocks[0], batch_size, channel_tokens=True)
    model, dev = backend.model, backend.device
    feats: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
    for s in sites:
        tiles, layout = emb.prepare(s.image)
        per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
        for i in range(0, len(tiles), batch_size):  # fp32, as the probe always ran
            x = torch.from_numpy(tiles[i : i + batch_size]).to(dev)
            for k, t in enumerate(_all_block_tokens(model, x, blocks)):
                per_block[k].append(t)
        for k, b in enumerate(blocks):
            st = emb.finish(None, s.image.shape[-2:], layout, torch.cat(per_block[k]), s.cells)
            feats[b].append(st.cell_channels.reshape(len(st.cell_channels), -1))
    return {b: np.concatenate(f).astype(np.float32) for b, f in feats.items()}


def concept_sets(table: pd.DataFrame, seed: int = 0) -> dict[str, dict]:
    """Rows and labels of every probed concept (see the module docstring)."""
    from napari_concept_discovery.synth import CELL_TYPES, PERTURBATIONS

    rng = np.random.default_rng(seed)
    ctrl = (table.perturbation == "control").to_numpy() & ~table.mitotic.to_numpy()
    out = {}
    for p in PERTURBATIONS:
        in_p = (table.perturbation == p.name).to_numpy()
        pos = in_p & (~table.mitotic.to_numpy() if p.is_null else table.responded.to_numpy())
        pos_idx = np.flatnonzero(pos)
        types = table.cell_type.to_numpy()
        counts = {t: int((types[pos_idx] == t).sum()) for t in np.unique(types[pos_idx])}
        ratio = min(
            [NEG_PER_POS] + [(ctrl & (types == t)).sum() / n for t, n in counts.items() if n]
        )
        neg_idx = []
        for t, n in counts.items():
            pool = np.flatnonzero(ctrl & (types == t))
            neg_idx.append(rng.choice(pool, int(round(ratio * n)), replace=False))
        neg_idx = np.sort(np.concatenate(neg_idx)) if neg_idx else np.zeros(0, int)
        rows = np.concatenate([pos_idx, neg_idx])
        y = np.r_[np.ones(len(pos_idx), bool), np.zeros(len(neg_idx), bool)]
        kind = "null" if p.is_null else "perturbation"
        out[p.name] = {"rows": rows, "y": y, "kind": kind}

    def capped(mask_pos: np.ndarray, universe: np.ndarray) -> dict:
        rows = np.flatnonzero(universe)
        if len(rows) > MAX_CELLS:
            rows = np.sort(rng.choice(rows, MAX_CELLS, replace=False))
        return {"rows": rows, "y": mask_pos[rows]}

    everyone = np.ones(len(table), bool)
    for ct in CELL_TYPES:
        out[ct.name] = capped((table.cell_type == ct.name).to_numpy(), everyone) | {
            "kind": "cell_type"
        }
    out["mitotic"] = capped(table.mitotic.to_numpy(), everyone) | {"kind": "mitotic"}
    return out


def _fit_score(x_tr, y_tr, x_te, y_te, C: float) -> float | None:
    """AUROC on the test rows of a probe fitted on the training rows (None: one class only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_tr)) < 2 or len(np.unique(y_te)) < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
    clf.fit(x_tr, y_tr)
    return float(roc_auc_score(y_te, clf.decision_function(x_te)))


def probe_concept(x: np.ndarray, table: pd.DataFrame, concept: dict, C: float = PROBE_C) -> dict:
    """AUROC of the probe: 5 well-grouped folds (mean), and plate to plate (mean both ways).

    With fewer than 5 wells on either side, there are as many folds as that side has wells.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    rows, y = concept["rows"], concept["y"]
    xs = x[rows]
    groups = table.well.to_numpy()[rows]
    n_splits = min(5, len(np.unique(groups[y])), len(np.unique(groups[~y])))
    cv = []
    if n_splits >= 2:
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=0)
        cv = [_fit_score(xs[tr], y[tr], xs[te], y[te], C) for tr, te in folds.split(xs, y, groups)]
        cv = [v for v in cv if v is not None]
    plates = table.plate.to_numpy()[rows]
    cross = [
        _fit_score(xs[plates == p], y[plates == p], xs[plates != p], y[plates != p], C)
        for p in np.unique(plates)
    ]
    cross = [v for v in cross if v is not None]
    return {
        "auroc": round(float(np.mean(cv)), 4) if cv else None,
        "auroc_folds": [round(v, 4) for v in cv],
        "auroc_plate_to_plate": round(float(np.mean(cross)), 4) if cross else None,
    }


def _probe_task(args):
    name, x, table, concept, C = args
    return name, probe_concept(x, table, concept, C)


def probe_features(
    features: dict[str, np.ndarray],
    table: pd.DataFrame,
    concepts: dict[str, dict],
    C: float = PROBE_C,
    workers: int = 1,
) -> dict[str, dict[str, dict]]:
    """{feature set: {concept: probe result}} for every feature set and concept."""
    tasks = [((f, c), x, table, concepts[c], C) for f, x in features.items() for c in concepts]
    if workers > 1:
        from joblib import Parallel, delayed

        done = Parallel(n_jobs=workers)(delayed(_probe_task)(t) for t in tasks)
    else:
        done = [_probe_task(t) for t in tasks]
    out: dict[str, dict[str, dict]] = {}
    for (f, c), r in done:
        out.setdefault(f, {})[c] = r
    return out


def bars(block: dict[str, dict], anchor: dict[str, dict], concepts: dict[str, dict]) -> dict:
    """Each concept's bar, the model's and the anchor's AUROC, and whether the bar is met."""
    out = {}
    for name, c in concepts.items():
        m, a = block[name]["auroc"], anchor[name]["auroc"]
        if m is None or a is None:
            bar, met = None, None
        elif c["kind"] == "perturbation":
            bar, met = a, m >= a
        elif c["kind"] == "null":
            bar, met = NULL_BAR, m <= NULL_BAR
        elif c["kind"] == "cell_type":
            bar, met = CELL_TYPE_BAR, m >= CELL_TYPE_BAR
        else:
            bar, met = None, None
        out[name] = {"kind": c["kind"], "model": m, "anchor": a, "bar": bar, "met": met}
    return out


def _margins(bars_of_block: dict) -> list[float]:
    """Model minus anchor AUROC of every non-null perturbation that could be probed."""
    return [
        r["model"] - r["anchor"]
        for r in bars_of_block.values()
        if r["kind"] == "perturbation" and r["met"] is not None
    ]


def choose_block(table: dict[str, dict]) -> int:
    """Most bars met, then the largest smallest margin over the anchor on perturbations."""

    def key(b):
        rows = table[b].values()
        met = sum(bool(r["met"]) for r in rows if r["met"] is not None)
        margins = _margins(table[b]) or [-1.0]
        return (met, min(margins), float(np.mean(margins)))

    return int(max(table, key=key))


def format_table(result: dict) -> str:
    """Markdown table: concept, bar, anchor, the model per block (default block starred)."""
    blocks = sorted(result["blocks"], key=int)
    best = str(result["default_block"])
    head = ["concept", "bar", "anchor"] + [
        f"block {b}" + ("*" if b == best else "") for b in blocks
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    for name, r in result["bars"][best].items():
        bar = "" if r["bar"] is None else f"{'<=' if r['kind'] == 'null' else '>='} {r['bar']:.3f}"
        cells = [name, bar, num(r["anchor"])]
        for b in blocks:
            v = result["bars"][b][name]
            cells.append(num(v["model"]) + (" x" if v["met"] is False else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_probe(
    weights: Path | None = None,
    *,
    backend=None,
    device: str | None = None,
    workers: int | None = None,
    heldout: dict | None = None,
    C: float = PROBE_C,
    log=print,
) -> dict:
    """Every probe number for the model card (see the module docstring)."""
    from napari_concept_discovery.models import load_card_model

    t0 = time.time()
    heldout = {**HELDOUT, **(heldout or {})}
    workers = workers or os.cpu_count() or 1
    if backend is None:
        weights = Path(weights)
        backend = load_card_model(weights, weights.with_suffix(".json"))
    backend.to(device)
    sites = heldout_sites(**heldout, workers=workers)
    table = cell_table(sites)
    log(f"probe: {len(sites)} held-out sites, {len(table)} cells ({time.time() - t0:.0f}s)")
    anchor_x, anchor_names = intensity_stats(sites)
    tokens = model_cell_tokens(backend, sites)
    log(f"probe: cell tokens of {len(tokens)} blocks ({time.time() - t0:.0f}s)")
    concepts = concept_sets(table)
    feats = {"anchor": anchor_x, **{str(b): x for b, x in tokens.items()}}
    del tokens
    res = probe_features(feats, table, concepts, C=C, workers=min(workers, 16))
    per_block = {b: bars(res[b], res["anchor"], concepts) for b in res if b != "anchor"}
    best = choose_block(per_block)
    chosen = per_block[str(best)]
    short = {
        k: round(abs(r["model"] - r["bar"]), 4) for k, r in chosen.items() if r["met"] is False
    }
    cell_types = [
        r["model"] for r in chosen.values() if r["kind"] == "cell_type" and r["model"] is not None
    ]
    nulls = [r["model"] for r in chosen.values() if r["kind"] == "null" and r["model"] is not None]
    margins = _margins(chosen)
    result = {
        "heldout": {
            **heldout,
            "generator": "napari_concept_discovery.synth.generate_site, its defaults",
            "n_cells": int(len(table)),
        },
        "unit": "cell token, the C per-channel tokens concatenated (C x D), pooled by embed",
        "anchor": f"per-cell intensity statistics: {', '.join(anchor_names)}",
        "classifier": (
            f"StandardScaler + LogisticRegression(C={C}); AUROC of the decision function, mean of "
            "5 well-grouped folds (StratifiedGroupKFold by plate and well); plate-to-plate AUROC "
            "(fit on one plate, score the other, mean both ways) beside it"
        ),
        "concepts": {
            k: {
                "kind": c["kind"],
                "positives": int(c["y"].sum()),
                "negatives": int((~c["y"]).sum()),
            }
            for k, c in concepts.items()
        },
        "anchor_auroc": res["anchor"],
        "blocks": {b: res[b] for b in sorted(per_block, key=int)},
        "bars": per_block,
        "default_block": best,
        "summary": {
            "block": best,
            "all_bars_met": all(r["met"] is not False for r in chosen.values()),
            "bars_met": sum(bool(r["met"]) for r in chosen.values()),
            "bars": sum(r["met"] is not None for r in chosen.values()),
            "shortfalls": short,
            "cell_type_trained": min(cell_types) if cell_types else None,
            "perturbation_margin_min": round(min(margins), 4) if margins else None,
            "null_max": max(nulls) if nulls else None,
        },
    }
    result["seconds"] = round(time.time() - t0, 1)
    result["table"] = format_table(result)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR / "default.safetensors")
    ap.add_argument("--device", default=None, help="torch device (default: CUDA if available)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--wells", type=int, default=HELDOUT["n_wells"])
    ap.add_argument("--size", type=int, default=HELDOUT["size"])
    ap.add_argument("--sites", type=int, default=HELDOUT["n_sites"])
    ap.add_argument("--C", type=float, default=PROBE_C)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("--no-card", action="store_true", help="print only; leave the card alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))
    heldout = {"n_wells": args.wells, "size": args.size, "n_sites": args.sites}
    result = run_probe(
        args.weights, device=args.device, workers=args.workers, heldout=heldout, C=args.C
    )
    print(result["table"])
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if not args.no_card:
        card_path = args.weights.with_suffix(".json")
        card = json.loads(card_path.read_text())
        card["probe"] = result
        card["default_block"] = result["default_block"]
        card_path.write_text(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
