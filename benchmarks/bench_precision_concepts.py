"""Do bf16 embeddings change the concept figures a user gets? Paired over seeds, in one run.

A demo-sized synthetic plate set (2 plates x 16 wells, 512 px, seed 1) is embedded with the
bundled model at fp32 and at bf16. For each training setting and each seed s, three ICFL runs
give the best single-feature AUROC per true concept (``recovery_table``, cell level):

- ``A[s]``: a dictionary trained on the fp32 tokens with seed s, encoding the fp32 tokens;
- ``B[s]``: the same dictionary encoding the bf16 tokens: the effect of the tokens alone;
- ``C[s]``: a dictionary trained on the bf16 tokens with seed s, encoding them: what a user of
  bf16 gets.

Printed per setting:

(a) precision alone: max over concepts and seeds of |B[s] - A[s]|;
(b) trained on bf16 vs on fp32, paired by seed: per concept the mean of C[s] - A[s] over seeds
    and its spread (standard deviation), beside the seed-to-seed spread of fp32 itself (the
    standard deviation of A over seeds, and the largest |A[s] - A[t]|);
and a verdict against the 0.01 bar. The bar is about the figures a user gets: the precision must
move them by no more than 0.01. (a) measures that directly. (b) can only say so as far as
training itself is reproducible: every concept's mean paired difference must lie within 0.01
with its 95% interval (t over seeds, simultaneous over the concepts by Bonferroni) for a PASS;
a concept whose interval lies wholly beyond 0.01 is a FAIL (a systematic shift, not chaos);
anything between is "unresolved: training chaos" (more seeds narrow it), never a pass.

Whitening (``--tokens``): the bf16 - fp32 token difference in the whitened space each setting
trains in, per principal direction of the controls, as a fraction of the controls' own spread
there (1 by construction), for the Ledoit-Wolf shrinkage the project uses and for smaller fixed
ones: does dividing by sqrt(eigenvalue) blow the bf16 rounding up in low-variance directions?

With ``--perturbations``, two more arms C trained on fp32 tokens perturbed by the bf16 error
reversed, and by the bf16 errors shuffled between cells (``perturbed_stores``).

    python benchmarks/bench_precision_concepts.py [--seeds 0 1 ...] [--settings sized bench ...]
        [--tokens] [--perturbations] [--raw runs.csv] | --from-raw runs.csv ...
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

BAR = 0.01
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training setting: ICFL sizes, steps and whitening (None: not whitened)."""

    name: str
    atoms: int | None = 64
    sparsity: int | None = 8
    steps: int | None = 300
    whiten: bool = True
    shrinkage: str = "auto"
    lr: float | None = None
    views: str = "whitened"

    def describe(self) -> str:
        atoms = "M sized" if self.atoms is None else f"M={self.atoms}"
        k = "k default" if self.sparsity is None else f"k={self.sparsity}"
        steps = "steps sized" if self.steps is None else f"{self.steps} steps"
        white = (
            f"whitened per plate (shrinkage {self.shrinkage})" if self.whiten else "not whitened"
        )
        lr = "" if self.lr is None else f", lr {self.lr:g}"
        views = "" if self.views == "whitened" or not self.whiten else f", views {self.views}"
        return f"{atoms} {k}, {steps}{lr}, {white}{views}"


SETTINGS = {
    s.name: s
    for s in (
        Setting("bench"),  # bench_embed's concept dictionary
        Setting("sized", atoms=None, sparsity=None, steps=None),  # what `train` does by default
        Setting("converged", steps=None),  # the project's sized steps: 50 passes
        Setting("long", steps=1000),
        Setting("nowhite", whiten=False),
        # the product's default since views: a whitened and a centred part, each sized
        Setting("default", atoms=None, sparsity=None, steps=None, views="whitened,centred"),
    )
}


def embed_stores(work: Path, device: str = "cpu", precisions=PRECISIONS) -> dict:
    """{precision: store} of the demo-sized plate set, embedded once per ``work`` folder."""
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.embed.store import ActivationStore
    from napari_concept_discovery.synth import write_synthetic_plates

    plates = work / "plates"
    if not (plates / "truth.csv").exists():
        write_synthetic_plates(plates, n_plates=2, n_wells=16, n_sites=1, size=512, seed=1)
    stores = {}
    for p in precisions:
        path = work / f"store-{p}"
        try:
            stores[p] = ActivationStore.open(path)
            if stores[p].precision != p:
                raise ValueError(f"a store of {stores[p].precision} tokens")
        except Exception:  # noqa: BLE001  (no usable store yet: embed it)
            settings = EmbedSettings(model="default", precision=p, device=device)
            stores[p] = embed_plate(plates, settings, path, overwrite=True)
    return stores


def perturbed_stores(work: Path, stores: dict, seed: int = 0) -> dict:
    """{"mirror": store, "shuffle": store}: copies of the fp32 store whose cell tokens are
    fp32 - (bf16 - fp32) (the bf16 error, each cell's own, reversed) and fp32 + the bf16 errors
    of other cells (shuffled). Trained on like bf16 (arm C), they tell an effect of the
    rounding's direction (mirror moves the other way), of its being tied to each cell (shuffle
    does not move) and of any perturbation of this size (all three move alike) apart."""
    import shutil

    import zarr

    from napari_concept_discovery.embed.store import ActivationStore

    t32, t16 = stores["fp32"].table("cell"), stores["bf16"].table("cell")
    key = ["plate", "well", "site", "label"]
    if not (t32[key].astype(str).to_numpy() == t16[key].astype(str).to_numpy()).all():
        raise SystemExit("the fp32 and bf16 stores list their cells in different orders")
    x32 = np.asarray(stores["fp32"].tokens("cell", "concat"), dtype=np.float32)
    err = np.asarray(stores["bf16"].tokens("cell", "concat"), dtype=np.float32) - x32
    rng = np.random.default_rng(seed)
    out = {}
    for name, tokens in (("mirror", x32 - err), ("shuffle", x32 + err[rng.permutation(len(err))])):
        path = work / f"store-{name}"
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(stores["fp32"].path, path)
        concat = zarr.open_array(str(path / "cell" / "channels"), mode="r+")
        concat[:] = tokens.astype(concat.dtype)
        mean = zarr.open_array(str(path / "cell" / "tokens"), mode="r+")
        mean[:] = tokens.reshape(len(tokens), -1, mean.shape[1]).mean(1).astype(mean.dtype)
        out[name] = ActivationStore.open(path)
    return out


def concepts_of(work: Path, store):
    from napari_concept_discovery.analysis.truth import join_truth, read_truth, truth_concepts

    truth = read_truth(work / "plates" / "truth.csv")
    return truth_concepts(join_truth(store.table("cell"), truth))


def train_settings(setting: Setting, seed: int, n_cells: int):
    from napari_concept_discovery.demo import CONTROL
    from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings

    whiten = WhitenSettings(CONTROL, by="plate", shrinkage=setting.shrinkage)
    return TrainSettings(
        method="icfl",
        unit="cell",
        atoms=setting.atoms,
        sparsity=setting.sparsity,
        steps=setting.steps,
        lr=setting.lr,
        batch_size=min(1024, n_cells),
        seed=seed,
        whiten=whiten if setting.whiten else None,
        views=setting.views if setting.whiten else "whitened",
    )


COLUMNS = ["setting", "seed", "precision", "arm", "concept", "auroc"]


def run_setting(
    setting: Setting, seeds, stores, concepts, others=("bf16",), raw=None, log=print
) -> pd.DataFrame:
    """Rows (setting, seed, precision, arm, concept, auroc): per seed, the fp32 arm A once and
    the B and C arms of every precision in ``others``; appended to the CSV ``raw`` (if given)
    seed by seed, so that a long run stopped early keeps what it measured."""
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.analysis.truth import recovery_table
    from napari_concept_discovery.dictionary.pipeline import train_on_store

    n_cells = int(stores["fp32"].tokens("cell").shape[0])

    def aurocs(store, dictionary):
        codes, _ = encode_store(store, dictionary)
        return recovery_table(codes, concepts).set_index("concept")["auroc"]

    rows = []
    for seed in seeds:
        done = len(rows)
        t = time.perf_counter()
        ts = train_settings(setting, seed, n_cells)
        d32 = train_on_store(stores["fp32"], ts).dictionary
        a = aurocs(stores["fp32"], d32)
        said = []
        for p in others:
            arms = {
                "A": a,
                "B": aurocs(stores[p], d32),
                "C": aurocs(stores[p], train_on_store(stores[p], ts).dictionary),
            }
            for arm, series in arms.items():
                for concept, auc in series.items():
                    rows.append((setting.name, seed, p, arm, concept, float(auc)))
            said.append(
                f"{p}: max |B-A| {(arms['B'] - a).abs().max():.4f}, max |C-A| "
                f"{(arms['C'] - a).abs().max():.4f}"
            )
        log(f"  {setting.name} seed {seed} ({time.perf_counter() - t:.0f} s): " + "; ".join(said))
        if raw is not None:
            new = pd.DataFrame(rows[done:], columns=COLUMNS)
            new.to_csv(raw, mode="a", header=not Path(raw).exists(), index=False)
    return pd.DataFrame(rows, columns=COLUMNS)


def t_quantile(df: int, tests: int = 1) -> float:
    """Two-sided 95% Student t quantile for ``df`` degrees of freedom, Bonferroni-corrected for
    ``tests`` intervals read together (one per concept: otherwise, with 12 concepts, one
    interval in two would miss somewhere by chance)."""
    from scipy.stats import t

    return float(t.ppf(1 - 0.025 / tests, df))


@dataclasses.dataclass
class Summary:
    table: pd.DataFrame  # per concept
    precision_alone: float  # max |B - A|
    mean_paired: float  # max over concepts of |mean_s (C - A)|
    ci_paired: float  # max over concepts of |mean| + half-width of the 95% interval
    resolved: float  # max over concepts of |mean| - half-width: how far it surely is from 0
    resolved_concept: str
    single_paired: float  # max over concepts and seeds of |C - A|
    seed_spread: float  # max over concepts of max_{s,t} |A[s] - A[t]|
    seeds: int

    def verdict(self) -> str:
        a = "PASS" if self.precision_alone <= BAR else "FAIL"
        if self.ci_paired <= BAR:
            b = "PASS"
        elif self.resolved > BAR:
            b = f"FAIL ({self.resolved_concept}: beyond {BAR} with 95% confidence)"
        else:
            b = "unresolved: training chaos (more seeds narrow the interval)"
        return f"(a) {a}, (b) {b}"


def summarise(rows: pd.DataFrame, precision: str = "bf16") -> Summary:
    if "precision" in rows.columns:
        rows = rows[rows["precision"] == precision]
    wide = rows.pivot_table(index=["concept", "seed"], columns="arm", values="auroc")
    seeds = wide.index.get_level_values("seed").unique()
    n = len(seeds)
    b_a = (wide["B"] - wide["A"]).unstack("seed")
    c_a = (wide["C"] - wide["A"]).unstack("seed")
    a = wide["A"].unstack("seed")
    q = t_quantile(n - 1, len(c_a)) if n > 1 else np.inf
    half = q * c_a.std(axis=1, ddof=1) / math.sqrt(n)
    pair_max = a.apply(lambda r: r.max() - r.min(), axis=1)
    table = pd.DataFrame(
        {
            "A mean": a.mean(axis=1),
            "A sd": a.std(axis=1, ddof=1),
            "A max-min": pair_max,
            "|B-A| max": b_a.abs().max(axis=1),
            "C-A mean": c_a.mean(axis=1),
            "C-A sd": c_a.std(axis=1, ddof=1),
            "C-A 95%": half,  # simultaneous over the concepts
        }
    )
    order = list(dict.fromkeys(rows["concept"]))
    table = table.loc[order]
    sure = table["C-A mean"].abs() - table["C-A 95%"]
    return Summary(
        table=table,
        precision_alone=float(b_a.abs().to_numpy().max()),
        mean_paired=float(table["C-A mean"].abs().max()),
        ci_paired=float((table["C-A mean"].abs() + table["C-A 95%"]).max()),
        resolved=float(sure.max()) if sure.notna().any() else math.nan,
        resolved_concept=str(sure.idxmax()) if sure.notna().any() else "-",
        single_paired=float(c_a.abs().to_numpy().max()),
        seed_spread=float(pair_max.max()),
        seeds=n,
    )


def print_summary(setting: Setting, s: Summary, precision: str = "bf16", log=print) -> None:
    log(f"\n[{setting.name}] {precision} vs fp32, ICFL {setting.describe()}, {s.seeds} seeds")
    cols = list(s.table.columns)
    log(f"{'concept':22s} " + " ".join(f"{c:>10s}" for c in cols))
    for concept, r in s.table.iterrows():
        log(f"{concept:22s} " + " ".join(f"{r[c]:10.4f}" for c in cols))
    log(
        f"(a) precision alone, fp32 dictionary on {precision} vs fp32 tokens: max |B-A| "
        f"{s.precision_alone:.4f}"
    )
    log(
        f"(b) trained on {precision} vs on fp32, same seed: max |mean(C-A)| {s.mean_paired:.4f}, "
        f"with its 95% interval {s.ci_paired:.4f}; one run: max |C-A| {s.single_paired:.4f}; "
        f"fp32 seed to seed: max |A[s]-A[t]| {s.seed_spread:.4f}"
    )
    log(f"bar {BAR}: {s.verdict()}")


def whitened_difference(
    stores, concepts=None, shrinkages=("auto", "0.1", "0.01", "0.001"), log=print
):
    """bf16 - fp32 tokens in the whitened space, per principal direction of the controls; with
    ``concepts``, how well the size of that difference alone picks each true concept."""
    from napari_concept_discovery.demo import CONTROL
    from napari_concept_discovery.dictionary import WhitenSettings
    from napari_concept_discovery.dictionary.pipeline import fit_whitener
    from napari_concept_discovery.dictionary.whiten import group_labels

    x32 = np.asarray(stores["fp32"].tokens("cell", "concat"), dtype=np.float64)
    x16 = np.asarray(stores["bf16"].tokens("cell", "concat"), dtype=np.float64)
    table = stores["fp32"].table("cell")
    groups = group_labels(table, "plate")
    raw = np.linalg.norm(x16 - x32, axis=1) / np.linalg.norm(x32 - x32.mean(0), axis=1)
    cos = (x16 * x32).sum(1) / np.linalg.norm(x16, axis=1) / np.linalg.norm(x32, axis=1)
    log(
        f"\ntokens: {x32.shape[0]} cells x {x32.shape[1]} (6 channels x 192, stored float16); "
        f"raw bf16 vs fp32: cosine min {cos.min():.6f}, |diff| / |token - mean| median "
        f"{np.median(raw):.4f}"
    )
    head = (
        f"{'shrinkage':>9s} {'a (plate 1)':>11s} {'l_min/l_max':>11s} {'rel diff':>9s} "
        f"{'cos white':>9s} {'unit-norm':>9s} {'top10%':>7s} {'bottom10%':>9s} {'bot/top':>7s}"
    )
    log("whitened per plate on the fp32 controls, bf16 - fp32 difference:")
    log(head)
    log("-" * len(head))
    error_size = None
    for shrink in shrinkages:
        w = fit_whitener(x32, table, WhitenSettings(CONTROL, by="plate", shrinkage=shrink))
        w.unit_norm = False
        y32 = w.transform(x32, groups).astype(np.float64)
        y16 = w.transform(x16, groups).astype(np.float64)
        diff = y16 - y32
        rel = np.linalg.norm(diff, axis=1) / np.linalg.norm(y32, axis=1)
        cw = (y16 * y32).sum(1) / np.linalg.norm(y16, axis=1) / np.linalg.norm(y32, axis=1)
        u16 = y16 / np.linalg.norm(y16, axis=1, keepdims=True)
        u32 = y32 / np.linalg.norm(y32, axis=1, keepdims=True)
        unit = np.linalg.norm(u16 - u32, axis=1)
        if error_size is None:
            error_size = unit
        # per direction: rms difference; a control token's spread there is 1 (whitened)
        rms = np.sqrt((diff**2).mean(0))
        k = len(rms)
        top, bottom = rms[: k // 10].mean(), rms[-(k // 10) :].mean()
        lam = w.eigenvalues_[0]
        log(
            f"{shrink:>9s} {w.shrinkage_[0]:11.4f} {lam[-1] / lam[0]:11.2e} "
            f"{np.median(rel):9.4f} {cw.min():9.6f} {np.median(unit):9.4f} {top:7.4f} "
            f"{bottom:9.4f} {bottom / top:7.2f}"
        )
    log(
        "rel diff: median |W(x16) - W(x32)| / |W(x32)|; cos white: least cosine after whitening; "
        "unit-norm: median distance of the unit-norm whitened tokens (what the dictionary sees); "
        "top10% / bottom10%: rms difference along the 10% highest / lowest-variance directions, "
        "in units of the controls' spread there (1)"
    )
    if concepts is None:
        return
    from napari_concept_discovery.analysis.concepts import feature_auroc

    sizes = np.stack([error_size, np.linalg.norm(x32, axis=1)], axis=1)
    log(
        "AUROC of one number per cell for each true concept (max of the two directions): the "
        "bf16 error's size as the dictionary sees it (unit-norm whitened, shrinkage auto), and "
        "the raw fp32 token's norm (which unit norm removes)"
    )
    for c in concepts:
        auc = feature_auroc(sizes[c.rows], c.member)
        auc = np.maximum(auc, 1 - auc)
        log(f"  {c.name:22s} error size {auc[0]:.3f}   token norm {auc[1]:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--settings", nargs="*", default=["bench"], choices=list(SETTINGS))
    ap.add_argument("--work", type=Path, default=None, help="where the plates and stores go")
    ap.add_argument("--raw", type=Path, default=None, help="append every AUROC to this CSV")
    ap.add_argument("--tokens", action="store_true", help="the whitened token difference")
    ap.add_argument(
        "--perturbations",
        action="store_true",
        help="also train on fp32 tokens with the bf16 error reversed (mirror) and shuffled "
        "between cells (shuffle)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--from-raw", type=Path, nargs="+", help="only summarise CSVs written by --raw (no runs)"
    )
    args = ap.parse_args(argv)
    if args.from_raw:
        rows = pd.concat([pd.read_csv(p) for p in args.from_raw], ignore_index=True)
        rows["precision"] = rows.get("precision", pd.Series(index=rows.index)).fillna("bf16")
        for (name, p), part in rows.groupby(["setting", "precision"], sort=False):
            print_summary(SETTINGS[name], summarise(part, p), p)
        return 0
    import torch

    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.gettempdir()) / "ncd_bench_precision_concepts"
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {args.threads} threads, load avg {os.getloadavg()[0]:.2f}; "
        f"seeds {args.seeds}"
    )
    stores = embed_stores(work, args.device)
    concepts = concepts_of(work, stores["fp32"])
    if args.tokens:
        whitened_difference(stores, concepts)
    others = ["bf16"]
    if args.perturbations:
        stores.update(perturbed_stores(work, stores))
        others += ["mirror", "shuffle"]
    for name in args.settings:
        setting = SETTINGS[name]
        rows = run_setting(setting, args.seeds, stores, concepts, others, raw=args.raw)
        for p in others:
            print_summary(setting, summarise(rows, p), p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
