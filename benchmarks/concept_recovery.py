"""Concept recovery on synthetic plates with ground truth: the paper's table, with its anchor.

What it measures (arXiv 2412.16247, Table 1 and the AUROC figure, on our synthetic plates): for
ICFL and a TopK SAE, each with PCA whitening on each plate's control wells (+W) and with
centring on the controls only, ICFL whitened on each plate and cell type's own controls
(+Wct), and ICFL on the whitened tokens reduced to the directions in which cells vary beyond
the controls (+Wc, contrastive PCA; see below), at the same dictionary size and the same
non-zeros per token, trained through the product's own path (``embed_plate`` ->
``train_on_store`` -> ``encode_store``) on cell tokens of the bundled default model
(whatever ``load_model("default")`` gives), in the token form the product defaults to (the
channel tokens side by side):

- dead features, FVU and mean cosine (in the space each dictionary models);
- how many features have average selectivity above 0.5 and 0.2 for cell type, perturbation and
  plate (batch; among control cells, since the plates hold different treatments and every
  perturbation feature would otherwise count as a plate feature);
- for every true concept (``concepts.truth_concepts``: each cell type, each perturbation's
  responding cells against control cells of the same plates and cell types and against its own
  non-responders, the mitotic subpopulation, each null perturbation's cells against the same
  controls), the best single-feature AUROC, beside the best single
  per-cell intensity statistic (mean, sd and max of each stain over the cell, and its area:
  CellProfiler's MeasureObjectIntensity and AreaShape by cp-measure, from the module that
  describes features, on the same images and the same cell labels), and
  beside a linear probe on the same tokens (5-fold cross-validated; the ceiling a single
  feature can approach, so the table shows what the model loses and what the dictionary loses).
  For perturbations, W/type is the best single ICFL+W feature within each cell type, averaged
  over cell types (a different feature may win in each).

Two plate sets (seeds 1 and 2 by default; never the seed the model was trained on, read from
its card) are embedded and analysed separately; the table shows the mean of the two. A feature's
AUROC is its code as a score in the direction it fires (a feature is a direction); a statistic
counts in either direction (small nuclei are as much a statistic as large ones), which favours
the anchor.

Bars: every non-null concept has an ICFL (whitened) feature whose AUROC is at least
the anchor's, and >= 0.9 wherever the anchor is >= 0.9; null perturbations stay <= 0.6; ICFL
with whitening has fewer dead features and no lower selectivity than TopK with whitening (the
paper's finding); fewer features are selective for plate with whitening than without.

Where concepts are lost (measured here, see benchmarks/results/concept_recovery.txt):

Numbers below marked "old" are from the first bundled model (4 blocks), on seed 1 with
perturbations judged against controls only; the others are from this table with the retrained
model (6 blocks), means of both seeds.

- The token form. The mean over channel tokens erases what is specific to one stain: ICFL
  (M = 256, 8 non-zeros) on control-whitened mean tokens found ER / nuclear / nucleolar at
  0.53 / 0.58 / 0.53, the same dictionary on the channel tokens side by side at 0.72 / 0.80 /
  0.63 (old). Concatenation is the default (``TrainSettings.tokens``).
- Whitening when controls are fewer than dimensions (868 control cells, 6 x 192 = 1152
  dimensions): the sample covariance is singular, so unregularised PCA whitening cannot be
  fitted at all. Keeping the top 64 control components lost concepts (ER 0.71 against 0.77,
  nuclear 0.74 against 0.81), as expected: they are the directions the controls vary along
  most. Ledoit-Wolf shrinkage (intensity 0.02-0.04 here), 0.3 and 0.7 gave best AUROCs within
  0.03 of each other. Default: ``--whiten-shrinkage auto`` with every component kept.
- Atoms, non-zeros, steps: at M = 256 and 32 non-zeros the best ER / nuclear / nucleolar
  features reached 0.77 / 0.81 / 0.67; at M = 64 and 8 non-zeros 0.85 / 0.88 / 0.77, and M = 32,
  k = 4 about the same. With a few thousand cells, an atom has to average over many cells to
  line up with a concept: the best atom's cosine with a perturbation's mean shift was only
  0.26-0.74 at M = 256 (old). 300 to 1500 steps added up to 0.11; beyond 1000 steps (M = 64) and for
  J x L = 8 x 1 instead of 2 x 4, learning rates 3e-4 to 3e-3, k = 16 nothing moved by more
  than 0.04. Here M = 64, k = 8, 1000 steps; the library's defaults (M = 1024, k = 32) are for
  screens of 1e5+ cells.
- Unit: training on patch tokens (14 times more tokens) and encoding cells was no better at
  matched settings (M = 64, 1500 steps: ER 0.86 both, nuclear 0.82 against 0.87; old).
- Encoder: TopK and ICFL are within a few hundredths at this size (TopK's learned encoder was
  ahead on the ER feature of the retrained model, 1.00 against 0.90, on one seed).
- What remains is the dictionary itself against a supervised read-out: the linear probe on the
  same tokens reaches 0.87-1.00 for every perturbation of the retrained model, the best single
  feature 0.59-0.77. With ~200 responding cells per perturbation in 1152 whitened dimensions,
  where every direction the controls vary in has unit variance, no unsupervised direction
  separates them as well. The stain of the best feature is right for 5 of the 6 perturbations.
- More cells do not close it (measured, seed 1, 4 plates x 48 wells = 13,888 cells, 4000 steps,
  the same passes as the 2-plate table): ICFL+W fell to 0.55-0.61 on every perturbation and its
  FVU rose to 0.92 (0.80 on 3.5k cells). With more control wells per plate the whitening is
  fitted better, the whitened tokens come out close to isotropic in 1152 dimensions, and 64
  atoms with 8 non-zeros explain 8 % of their variance. On the same cells TopK without
  whitening found ER at 0.89 (anchor 0.85) and nuclear enlargement at 0.87 (anchor 0.75),
  nucleolar at 0.81 (anchor 0.95). At the library's default size (M = 1024, k = 32) the
  whitened arms stay at 0.51-0.63 (FVU 0.59), while TopK without whitening reaches ER 0.998 /
  0.995, nuclear 0.956 / 0.757, nucleolar 0.914 / 0.935 (seeds 1 / 2), above the anchor in 5
  of 6. Shrinking the whitening toward the identity (0.9) did not help. So whitening on the controls, which the
  paper does, is what loses these concepts at this size (results file, "More cells").
- Contrastive reduction (+Wc). After whitening on controls, the second moment of all tokens
  is I plus what cells add beyond the controls, so its top eigenvectors (the generalised
  eigenproblem of all tokens' against the controls' covariance) should hold the perturbation
  directions, and a dictionary on them should not spend its atoms on isotropic control noise.
  It does not help. On both seeds (table), actin / ER / golgi / mito / nuclear / nucleolar
  with +Wc were 0.56 / 0.71 / 0.58 / 0.56 / 0.74 / 0.70 against 0.63 / 0.74 / 0.59 / 0.65 /
  0.77 / 0.73 with +W (12-16 components kept). On seed 1 (ICFL, M = 64, k = 8, 500 steps; +W
  0.63 / 0.74 / 0.60 / 0.65 / 0.78 / 0.73), keeping the top 16, 32, 64 or 128 components,
  scaled or not by 1 / sqrt(eigenvalue), gave 0.54-0.62 / 0.66-0.75 / 0.54-0.58 /
  0.55-0.64 / 0.68-0.80 / 0.62-0.72. Why: cells that
  the whitening was not fitted on are far from isotropic in the whitened space. The controls'
  mean squared norm there is 319 (434 control cells per plate span 433 of 1152 directions),
  the other cells' 1550; with the whitening fitted on half of the control wells, the held-out
  control wells' top eigenvalue is 53, as large as the treated cells' (26). The excess
  variance is what a few hundred controls cannot span (Ledoit-Wolf's 0.05 leaves the unspanned
  directions scaled up about 4.5-fold), not perturbations: a perturbation whose ~6 % responding
  cells shift by d' ~ 3 adds ~0.5 to the variance along its direction, at the edge of what any
  variance-based method can see in 1152 dimensions with 3.5k cells (sqrt(D / n) ~ 0.58).
  Within one stain's block (192 dimensions, fewer than the controls; held-out / in-sample
  norm ratio 1.5 instead of 4.9) the shifts of the ER, nuclear and nucleolar perturbations lie
  83-93 % in the top 4 contrastive components of their own stain's block, but ICFL on the six
  blocks' top 4, 8 or 16 components was no better either (0.77 / 0.72-0.79 / 0.68-0.75).
  Shrinkage 0.3 and 0.7, PCA of all cells (32-256 components) before whitening, M = 16-256,
  k = 2-8, unit norm before whitening: all within about 0.05 of +W; centring each well on its
  own mean lost the perturbations (ER 0.61), as it removes their mean effect.
- What limits a single feature is not where the atoms point but that the model's tokens
  encode one perturbation differently in each cell type. A single direction does exist: the
  responders' mean shift, estimated on half of the cells, separates the other half at
  0.93 / 1.00 / 0.85 / 0.91 / 0.98 / 0.97 in the whitened space. But within one cell type the
  best ICFL+W feature reaches ER 1.00 (HUVEC) and 0.98 (U2OS), nuclear 0.95 (HepG2),
  nucleolar 0.92 (HUVEC), actin 0.87 (U2OS), each by a feature of that cell type (ER: one
  atom in HUVEC, another in U2OS; the two cell types' ER shifts are orthogonal, cosine -0.02,
  in the six blocks' top 8 contrastive components); pooled over cell types the best feature
  covers one cell type's response (there it was active in 54-60 % of the ER and nucleolar
  responders and 4-16 % of their controls). The anchor (e.g. the ER stain's sd) moves the
  same way in every cell type. On both seeds (table, W/type against ICFL+W): actin / ER /
  golgi / mito / nuclear / nucleolar 0.74 / 0.90 / 0.70 / 0.73 / 0.81 / 0.78 within cell types
  against 0.63 / 0.74 / 0.59 / 0.65 / 0.77 / 0.73 pooled; the probe's 0.87-1.00 is a
  combination of such features. A concept that a screen reads per cell type is found better
  than the pooled bar says; one feature for all cell types would need tokens in which the
  response looks alike across cell types (the model), or many more cells.
- Whitening on controls that mix cell types removes the cell types (0.55-0.61, against
  0.62-0.76 centred only and 1.00 for the probe) and the mitotic cells (0.63 against 0.91).
  Estimating the covariance within cell types (``--whiten-within cell_type``) keeps the cell
  types (HUVEC 0.93 on one seed) but, with one control well per cell type and plate, has not
  seen how wells differ and amplifies that: null perturbations reached 0.74-0.77 in the demo.
  Whitening each plate and cell type on its own controls (+Wct) removes cell types by design
  and finds perturbations a little less well than per-plate whitening here (0.59-0.70 against
  0.59-0.77).

Where the result differs from the paper, and why: dead features are none for either method
when whitened (the paper: 341 of 8192 for ICFL, 8026 for TopK): at M = 64, 3.5k tokens and 1000
steps every TopK latent keeps firing (AuxK revives it); the paper's collapse came with 8192
latents and 300k steps. Unwhitened, ICFL has the dead atoms here (about 19 of 64: centred
tokens are dominated by a few directions, and duplicate atoms are redrawn onto the sphere where
no token scores on them). ICFL's selectivity is about TopK's, not higher. Plate (batch)
selectivity is small in every arm (best average selectivity 0.04 whitened against 0.14-0.19
centred, no feature above 0.2 in either): the synthetic batch effects are gain, offset and
illumination, which the model's per-tile instance normalisation removes before the tokens;
whitening on each plate's controls removes what is left. The anchor beats the dictionary on
most concepts; it is a single number per cell chosen with the truth in hand, from 19 that
were designed for exactly these stains.

Threads: one torch thread by default (``--threads``): on a shared 2-core machine one thread per
process ran ICFL's many short operations 5 to 10 times faster than two.

Run: python benchmarks/concept_recovery.py [--quick] [--work DIR] [--seeds 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

CONTROLS = "well_type=negative_control"
ARMS = (  # name, method, whitening: per plate on its controls | centred only | per plate and type
    ("ICFL+W", "icfl", "plate"),
    ("ICFL", "icfl", None),
    ("TopK+W", "topk", "plate"),
    ("TopK", "topk", None),
    ("ICFL+Wct", "icfl", "plate,cell_type"),
    ("ICFL+Wc", "icfl", "plate contrastive"),
)
SELECTIVITY_COLUMNS = ("cell_type", "perturbation", "plate")


# --- data --------------------------------------------------------------------------------


def plates_for(work: Path, seed: int, n_plates: int, n_wells: int, size: int) -> Path:
    """Synthetic plates of ``seed`` under ``work``, written again only if the parameters changed."""
    from napari_concept_discovery.synth import write_synthetic_plates

    params = dict(n_plates=n_plates, n_wells=n_wells, n_sites=1, size=size, seed=seed)
    target = work / f"seed{seed}" / "plates"
    stamp = target / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return target
    write_synthetic_plates(target, workers=1, **params)
    stamp.write_text(json.dumps(params))
    return target


def intensity_statistics(store, names) -> pd.DataFrame:
    """Per cell (rows of the store's cell table): area and mean, sd, max of every stain.

    Read from the product's CellProfiler measurements of every cell
    (``analysis.measurements.store_measurements``, cp-measure over the cell labels the store
    pooled its tokens over, cached beside the store), so anchor, tokens and the feature
    descriptions describe the same cells with the same module.
    """
    from napari_concept_discovery.analysis.measurements import store_measurements

    meas = store_measurements(store, max_cells=None)
    cols = {"area": "Cells_AreaShape_Area"}
    for name in names:
        for stat, cp in (("mean", "Mean"), ("sd", "Std"), ("max", "Max")):
            cols[f"{name}_{stat}"] = f"Cells_Intensity_{cp}Intensity_{name}"
    stats = meas[list(cols.values())].astype(np.float64)
    stats.columns = list(cols)
    return stats.fillna(stats.median())


def best_statistic_auroc(stats: pd.DataFrame, rows, member) -> tuple[float, str]:
    """The best single statistic's AUROC for a concept, in either direction, and its name."""
    from sklearn.metrics import roc_auc_score

    best, name = 0.0, ""
    for col in stats.columns:
        auc = roc_auc_score(member, stats[col].to_numpy()[rows])
        auc = max(auc, 1.0 - auc)
        if auc > best:
            best, name = auc, col
    return best, name


def probe_auroc(x: np.ndarray, rows, member, seed: int) -> float:
    """5-fold cross-validated AUROC of a linear probe (standardised, L2, C = 0.1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=200))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    score = cross_val_predict(clf, x[rows], member, cv=folds, method="decision_function")
    return float(roc_auc_score(member, score))


# --- one plate set -----------------------------------------------------------------------


def run_seed(seed: int, args, log) -> dict:
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.analysis.truth import join_truth, truth_concepts
    from napari_concept_discovery.dictionary import train_on_store
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.synth.concepts import PERTURBATION_BY_NAME

    work = Path(args.work)
    t0 = time.perf_counter()
    plates = plates_for(work, seed, args.plates, args.wells, args.size)
    store_path = work / f"seed{seed}" / f"store-{args.weights[:12]}.zarr"  # one per model
    store = embed_plate(plates, EmbedSettings(model=args.model, batch_size=8), store_path)
    t_embed = time.perf_counter() - t0
    table = join_truth(store.table("cell"), pd.read_csv(plates / "truth.csv"))
    stats = intensity_statistics(store, store.channel_names)
    concepts = {c.name: c for c in truth_concepts(table)}
    log(
        f"seed {seed}: {len(table)} cells, {len(store.sites())} sites, tokens "
        f"{store.token_groups} x {store.embed_dim} ({'reused' if store.reused else 'embedded'} "
        f"in {t_embed:.0f} s)"
    )
    out: dict = {"n_cells": len(table), "concepts": {}, "arms": {}, "kinds": {}}
    tokens = None
    if not args.no_probe:
        tokens = np.asarray(store.tokens("cell", store.default_token_form), dtype=np.float32)
    for name, c in concepts.items():
        anchor, stat = best_statistic_auroc(stats, c.rows, c.member)
        row = {"anchor": anchor, "statistic": stat, "n": int(c.member.sum())}
        if tokens is not None:
            row["probe"] = probe_auroc(tokens, c.rows, c.member, seed)
        out["concepts"][name] = row
        kind = c.kind
        if kind == "perturbation":
            kind += f" ({', '.join(PERTURBATION_BY_NAME[name].channels)})"
        out["kinds"][name] = kind
    control = (table["well_type"] == "negative_control").to_numpy()
    cell_types = table["cell_type"].astype(str).to_numpy()
    for arm, method, by in ARMS:
        t = time.perf_counter()
        if by == "plate contrastive":
            settings = arm_settings(method, "plate", seed, args)
            codes, metrics, n_kept = contrastive_arm(store, table, settings)
            res = analyse(codes, metrics, None, table, concepts, control, cell_types, store)
            res["kept"] = n_kept
            out["arms"][arm] = res
            log(
                f"  {arm:7s} ({n_kept} components) trained and analysed in "
                f"{time.perf_counter() - t:.0f} s"
            )
            continue
        trained = train_on_store(store, arm_settings(method, by, seed, args))
        codes, _ = encode_store(store, trained.dictionary)
        shares = trained.dictionary.stain_attribution()
        res = analyse(codes, trained.metrics, shares, table, concepts, control, cell_types, store)
        out["arms"][arm] = res
        log(f"  {arm:7s} trained and analysed in {time.perf_counter() - t:.0f} s")
    return out


def arm_settings(method: str, by: str | None, seed: int, args):
    """The training settings of one arm: whitened per ``by`` on controls, or centred only."""
    from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings

    whiten = (
        WhitenSettings(CONTROLS, by=by, shrinkage=args.shrinkage)
        if by
        else WhitenSettings(CONTROLS, mode="center")
    )
    return TrainSettings(
        method=method,
        atoms=args.atoms,
        sparsity=args.sparsity,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=seed,
        whiten=whiten,
        views="whitened",  # each arm one view, as named (bench_views.py compares the views)
        checkpoint_every=0,
    )


def contrastive_arm(store, table, settings):
    """Codes, metrics and kept width of a dictionary on contrastively reduced tokens.

    The tokens are whitened on each plate's controls as in +W (without the unit norm), then
    projected onto the eigenvectors of all tokens' second moment in that space whose eigenvalue
    exceeds the Marchenko-Pastur edge (1 + sqrt(D / n))^2 of n isotropic control tokens (n: the
    fewest controls of a plate): the directions in which cells vary beyond the controls (the
    generalised eigenproblem of all tokens' against the controls' covariance, contrastive PCA).
    It uses only the control flag whitening already uses. Unit norm follows, then the same
    training as the other arms.
    """
    import torch

    from napari_concept_discovery.dictionary import build_model, evaluate, train
    from napari_concept_discovery.dictionary.pipeline import fit_whitener
    from napari_concept_discovery.dictionary.training import whiten_once
    from napari_concept_discovery.dictionary.whiten import group_labels

    tokens = store.tokens("cell", store.default_token_form)
    whitener = fit_whitener(tokens, table, settings.whiten)
    whitener.unit_norm = False
    z, _, _ = whiten_once(tokens, whitener, group_labels(table, settings.whiten.by), limit=1 << 62)
    z = np.asarray(z, dtype=np.float64)
    lam, vec = np.linalg.eigh(z.T @ z / len(z))
    lam, vec = lam[::-1], vec[:, ::-1]
    edge = (1.0 + np.sqrt(z.shape[1] / whitener.n_samples_.min())) ** 2
    kept = max(int((lam > edge).sum()), 1)
    y = (z @ vec[:, :kept]).astype(np.float32)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    model = build_model(settings.method, kept, settings.method_config(), seed=settings.seed)
    torch.manual_seed(settings.seed)
    train(
        model,
        y,
        steps=settings.steps,
        batch_size=settings.batch_size,
        seed=settings.seed,
        checkpoint_every=0,
    )
    metrics, codes = evaluate(model, y, return_codes=True)
    return codes, metrics, kept


def analyse(codes, m, shares, table, concepts, control, cell_types, store) -> dict:
    """One arm's dictionary statistics, selectivity and best feature per true concept.

    ``auroc`` is the best single feature over all cells a concept is judged on; ``per type``
    (perturbations only) is the mean over cell types of the best single feature among that
    cell type's cells, where a feature may differ between cell types.
    """
    from napari_concept_discovery.analysis.concepts import feature_auroc, selectivity

    res = {
        "dead": m["n_dead"],
        "fvu": m["fvu"],
        "cosine": m["mean_cosine"],
        "auroc": {},
        "per type": {},
        "stain": {},
    }
    for col in SELECTIVITY_COLUMNS:
        # plate among control cells only: the plates hold different treatments, so over all
        # cells every perturbation feature would count as a plate (batch) feature
        rows = control if col == "plate" else slice(None)
        sel = selectivity(codes[rows], table[col].to_numpy()[rows], col)
        c = sel.counts()
        res[f"sel {col} >0.5"] = c["n_avg_above_0.5"]
        res[f"sel {col} >0.2"] = c["n_avg_above_0.2"]
        res[f"best sel {col}"] = float(sel.avg.max(1).mean())
    for name, c in concepts.items():
        auc = feature_auroc(codes[c.rows], c.member)
        best = int(np.nanargmax(auc))
        res["auroc"][name] = float(auc[best])
        if c.kind == "perturbation":
            types = cell_types[c.rows]
            within = []
            for t in np.unique(types[c.member]):
                sel = types == t
                if c.member[sel].sum() >= 10 and (~c.member[sel]).sum() >= 10:
                    within.append(
                        float(np.nanmax(feature_auroc(codes[c.rows[sel]], c.member[sel])))
                    )
            res["per type"][name] = float(np.mean(within)) if within else float("nan")
        if shares is not None:
            top = int(shares[best].argmax())
            res["stain"][name] = (store.channel_names[top], float(shares[best, top]))
    return res


# --- the table -----------------------------------------------------------------------------


def mean_over(runs: list[dict], get) -> float:
    return float(np.mean([get(r) for r in runs]))


def report(runs: list[dict], args) -> tuple[str, list[tuple[str, bool, str]]]:
    names = list(runs[0]["concepts"])
    kinds = runs[0]["kinds"]
    arms = [a for a, _, _ in ARMS]
    has_probe = "probe" in runs[0]["concepts"][names[0]]
    lines = []
    head = f"{'concept':22s} {'kind':26s} {'anchor':>7s} "
    head += f"{'probe':>6s} " if has_probe else ""
    head += " ".join(f"{a:>7s}" for a in arms) + f" {'W/type':>7s}   stain of the ICFL+W feature"
    lines.append(head)
    lines.append("-" * len(head))
    for name in names:
        anchor = mean_over(runs, lambda r, n=name: r["concepts"][n]["anchor"])
        row = f"{name:22s} {kinds[name]:26s} {anchor:7.3f} "
        if has_probe:
            row += f"{mean_over(runs, lambda r, n=name: r['concepts'][n]['probe']):6.3f} "
        row += " ".join(
            f"{mean_over(runs, lambda r, a=a, n=name: r['arms'][a]['auroc'][n]):7.3f}" for a in arms
        )
        per_type = [r["arms"]["ICFL+W"]["per type"].get(name) for r in runs]
        row += f" {np.mean(per_type):7.3f}" if all(v is not None for v in per_type) else " " * 8
        stains = [r["arms"]["ICFL+W"]["stain"].get(name) for r in runs]
        if all(stains):
            row += "   " + ", ".join(f"{s} {v:.2f}" for s, v in stains)
        lines.append(row)
    lines.append("")
    rows = [("dead features", "dead", "d"), ("FVU", "fvu", ".3f"), ("mean cosine", "cosine", ".3f")]
    for col in SELECTIVITY_COLUMNS:
        rows.append((f"selective >0.5 {col}", f"sel {col} >0.5", ".1f"))
        rows.append((f"selective >0.2 {col}", f"sel {col} >0.2", ".1f"))
        rows.append((f"best avg sel. {col}", f"best sel {col}", ".3f"))
    lines.append(f"{'dictionary (M=' + str(args.atoms) + ', k=' + str(args.sparsity) + ')':49s} ")
    for label, key, fmt in rows:
        vals = [mean_over(runs, lambda r, a=a, k=key: r["arms"][a][k]) for a in arms]
        shown = " ".join(f"{v:7{'.1f' if fmt == 'd' else fmt}}" for v in vals)
        lines.append(f"{label:{49 + (7 if has_probe else 0)}s} {shown}")
    kept = ", ".join(str(r["arms"]["ICFL+Wc"]["kept"]) for r in runs)
    lines.append(f"ICFL+Wc: whitened as +W, then the {kept} components above the MP edge")
    lines.append("W/type: ICFL+W, best single feature within each cell type, mean over cell types")
    lines.append("(means over seeds " + ", ".join(str(s) for s in args.seeds) + ")")

    bars: list[tuple[str, bool, str]] = []

    def arm_mean(a, key):
        return mean_over(runs, lambda r: r["arms"][a][key])

    for name in names:
        kind = kinds[name]
        got = mean_over(runs, lambda r, n=name: r["arms"]["ICFL+W"]["auroc"][n])
        anchor = mean_over(runs, lambda r, n=name: r["concepts"][n]["anchor"])
        if kind == "null perturbation":
            bars.append((f"null {name} <= 0.6", got <= 0.6, f"{got:.3f}"))
            continue
        need = max(anchor, 0.9) if anchor >= 0.9 else anchor
        bars.append((f"{name} >= anchor", got >= need, f"{got:.3f} vs {need:.3f}"))
    d_icfl, d_topk = arm_mean("ICFL+W", "dead"), arm_mean("TopK+W", "dead")
    bars.append(("ICFL+W fewer dead than TopK+W", d_icfl < d_topk, f"{d_icfl:.1f} vs {d_topk:.1f}"))
    for col in ("cell_type", "perturbation"):
        a, b = arm_mean("ICFL+W", f"best sel {col}"), arm_mean("TopK+W", f"best sel {col}")
        bars.append((f"ICFL+W selectivity {col} >= TopK+W", a >= b, f"{a:.3f} vs {b:.3f}"))
    for method in ("ICFL", "TopK"):
        w = arm_mean(f"{method}+W", "sel plate >0.2")
        c = arm_mean(method, "sel plate >0.2")
        bars.append(
            (f"{method}: fewer plate-selective (>0.2) with whitening", w < c, f"{w:.1f} vs {c:.1f}")
        )
    return "\n".join(lines), bars


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller plates and fewer steps")
    ap.add_argument("--work", default="concept-recovery-work", help="plates and stores (reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="default")
    ap.add_argument("--plates", type=int, default=2)
    ap.add_argument("--wells", type=int, default=24)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--atoms", type=int, default=None)
    ap.add_argument("--sparsity", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--shrinkage", default="auto", help="whitening shrinkage (auto|none|0..1)")
    ap.add_argument("--no-probe", action="store_true", help="skip the linear-probe column")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from napari_concept_discovery.dictionary.settings import TrainSettings
    from napari_concept_discovery.models import load_model

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    defaults = TrainSettings()
    if args.quick:
        args.wells, args.size = min(args.wells, 12), min(args.size, 384)
    args.atoms = args.atoms or DEFAULT_ATOMS
    args.sparsity = args.sparsity or DEFAULT_SPARSITY
    args.steps = args.steps or (DEFAULT_STEPS // 2 if args.quick else DEFAULT_STEPS)
    backend = load_model(args.model)
    args.weights = backend.weights_hash
    trained_on = backend.card.get("data", {}).get("synthetic", {}).get("seed")
    clash = [s for s in args.seeds if trained_on is not None and s == int(trained_on)]
    if clash:
        print(f"error: seed {clash[0]} is the seed the model was trained on", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    log(
        f"model {backend.model_id} ({backend.embed_dim} wide, block {backend.default_block}, "
        f"trained on synthetic seed {trained_on}); plates {args.plates} x {args.wells} wells x "
        f"{args.size} px per seed; M={args.atoms}, k={args.sparsity}, {args.steps} steps x "
        f"{args.batch_size} (library defaults M={defaults.atoms}, "
        f"{defaults.steps or 'steps sized to the tokens'})"
    )
    runs = [run_seed(seed, args, log) for seed in args.seeds]
    table, bars = report(runs, args)
    print(
        f"concept recovery: {backend.model_id} model, block {backend.default_block}, cell tokens "
        f"(channel tokens side by side), seeds {args.seeds}, {runs[0]['n_cells']} cells per seed"
    )
    print(table)
    print()
    for what, ok, detail in bars:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}")
    n_ok = sum(ok for _, ok, _ in bars)
    print(f"\n{n_ok} of {len(bars)} bars met; total {time.perf_counter() - t0:.0f} s")
    return 0


DEFAULT_ATOMS = 64
DEFAULT_SPARSITY = 8
DEFAULT_STEPS = 1000

if __name__ == "__main__":
    sys.exit(main())
