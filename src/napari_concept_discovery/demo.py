"""The whole method on a synthetic plate set, offline: synth → embed → whiten + train → analyze.

It exists so that a new user sees every step run on their machine in a few minutes, with the
bundled default model, and so that the outputs (store, dictionary, tables) can be opened in
napari afterwards. Each step reuses what an earlier run left if it still matches (the plates by
their parameters, the store by its signature), so a second run is fast.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .dictionary.settings import AnalyzeSettings, TrainSettings, WhitenSettings
from .dictionary.whiten import control_mask
from .progress import ProgressCallback

LABEL_COLUMNS = ("cell_type", "perturbation")
TRUTH_COLUMNS = ("cell_type", "perturbation", "responded", "mitotic")
CONTROL = "well_type=negative_control"


@dataclass
class DemoResult:
    out: Path
    plates: Path
    store: Path
    dictionary: Path
    analysis: Path
    n_cells: int
    metrics: dict
    selectivity_counts: pd.DataFrame
    concepts: pd.DataFrame
    top_features: pd.DataFrame
    comparison: pd.DataFrame
    timings: dict = field(default_factory=dict)
    report: Path | None = None


def _plates(out: Path, n_plates: int, n_wells: int, n_sites: int, size: int, seed: int) -> Path:
    """Synthetic plates under ``out/plates``, regenerated only when the parameters changed."""
    from .synth import write_synthetic_plates

    params = dict(n_plates=n_plates, n_wells=n_wells, n_sites=n_sites, size=size, seed=seed)
    target = out / "plates"
    stamp = target / "demo-params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return target
    tmp = out / "plates.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_synthetic_plates(tmp, **params)
    (tmp / "demo-params.json").write_text(json.dumps(params))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _whitening_components(store, whiten: WhitenSettings) -> int:
    """Whitening components that the fewest controls of any group can estimate.

    A covariance needs several samples per dimension before its small eigenvalues mean anything;
    whitening noise directions up to unit variance would drown the signal. Keep at most one
    component per four control cells of the smallest group (plate).
    """
    table = store.table("cell")
    controls = table[control_mask(table, *whiten.control)]
    fewest = len(controls) if whiten.by is None else int(controls.groupby(whiten.by).size().min())
    return int(max(4, min(store.embed_dim, fewest // 4)))


def run_demo(
    out: str | Path,
    *,
    n_plates: int = 2,
    n_wells: int = 16,
    n_sites: int = 1,
    size: int = 512,
    method: str = "icfl",
    n_atoms: int = 64,
    sparsity: int = 8,
    steps: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: ProgressCallback = None,
) -> DemoResult:
    """Run every step on synthetic plates with known ground truth and report what was found."""
    import time

    from .concepts import concept_auroc
    from .dictionary.pipeline import analyze_store, encode_for_analysis, train_on_store
    from .plate_embedding import EmbedSettings, embed_plate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    log(f"1/4 synthetic plates: {n_plates} plates x {n_wells} wells x {n_sites} sites, {size} px")
    plates = _plates(out, n_plates, n_wells, n_sites, size, seed)
    timings["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    log("2/4 embedding with the bundled default model (cells from the plate's label images)")
    # The demo owns its folder: a store left by an older model or version is replaced, not
    # refused (the plates above were just written by the demo itself).
    store = embed_plate(
        plates,
        EmbedSettings(model="default"),
        out / "store.zarr",
        progress=progress,
        overwrite=True,
    )
    timings["embed"] = time.perf_counter() - t
    n_cells = int(store.tokens("cell").shape[0])

    t = time.perf_counter()
    center = WhitenSettings(controls=CONTROL, by="plate", mode="center")
    n_components = _whitening_components(store, center)
    preparations = {
        "center": center,
        "pca": center.replace(mode="pca", n_components=n_components),
    }
    analyze = AnalyzeSettings(
        labels=LABEL_COLUMNS, truth=TRUTH_COLUMNS, truth_file=plates / "truth.csv"
    )
    comparison = []
    trained = None
    for name, whiten in preparations.items():
        settings = TrainSettings(
            method=method,
            unit="cell",
            atoms=n_atoms,
            sparsity=sparsity,
            steps=steps,
            batch_size=min(1024, n_cells),
            seed=seed,
            whiten=whiten,
        )
        what = (
            "centred on the negative-control mean"
            if name == "center"
            else f"PCA-whitened on negative controls (top {n_components} components)"
        )
        log(
            f"3/4 {method} dictionary, {n_atoms} atoms, {sparsity} non-zeros, on {n_cells} "
            f"cell tokens {what}, per plate"
        )
        result = train_on_store(
            store, settings, out=out / f"dictionary-{name}.safetensors", progress=progress
        )
        codes, table = encode_for_analysis(store, result.dictionary, analyze)
        aurocs = concept_auroc(codes, table, analyze.truth)
        group = aurocs["concept"].str.split("=").str[0]
        row = {"preparation": name, "fvu": result.metrics["fvu"]}
        row.update({f"auroc {g}": v for g, v in aurocs.groupby(group)["auroc"].mean().items()})
        comparison.append(row)
        if trained is None:  # the first preparation gets the full analysis
            trained = result
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    log("4/4 selectivity for cell type and perturbation; best feature per true concept")
    paths = analyze_store(store, trained.dictionary, analyze, out / "analysis").paths
    timings["analyze"] = time.perf_counter() - t

    features = pd.read_parquet(paths["features"])
    top = (
        features[features["n_active"] > 0]
        .sort_values("selectivity_avg", ascending=False)
        .groupby(["top_column", "top_label"], sort=False)
        .head(1)
        .head(12)
    )
    from .report import ReportSettings, write_report

    t = time.perf_counter()
    log("report: the top features with their cells, plate maps and concept profiles (HTML)")
    dictionaries = [out / f"dictionary-{name}.safetensors" for name in preparations]
    settings = ReportSettings(labels=LABEL_COLUMNS, top=8, cells=8)
    html = write_report(store, dictionaries, out / "report", settings)
    timings["report"] = time.perf_counter() - t
    return DemoResult(
        out=out,
        plates=plates,
        store=out / "store.zarr",
        dictionary=trained.path,
        analysis=out / "analysis",
        n_cells=n_cells,
        metrics=trained.metrics,
        selectivity_counts=pd.read_parquet(paths["selectivity_counts"]),
        concepts=pd.read_parquet(paths["concepts"]),
        top_features=top,
        comparison=pd.DataFrame(comparison),
        timings=timings,
        report=html,
    )


def _better(comparison: pd.DataFrame) -> str:
    """Which preparation gave the higher mean best AUROC, per concept group, in words."""
    cols = [c for c in comparison.columns if c.startswith("auroc ")]
    best = comparison.set_index("preparation")[cols].idxmax()
    return "Higher here: " + ", ".join(f"{c[6:]} {p}" for c, p in best.items()) + "."


def format_report(result: DemoResult) -> str:
    """A plain-text summary a biologist can read: quality, selectivity, what matched the truth."""
    m = result.metrics
    lines = [
        "",
        f"dictionary: {result.dictionary}",
        f"  FVU {m['fvu']:.3f}  mean cosine {m['mean_cosine']:.3f}  L0 {m['l0']:.1f}  "
        f"dead {m['n_dead']}/{m['n_atoms']}  ({result.n_cells} cells)",
        "",
        "features with selectivity above 0.5 / 0.2, per label column:",
        result.selectivity_counts.to_string(index=False),
        "",
        "most selective feature per label (avg = P(active|label) - P(active|other labels)):",
        result.top_features[
            [
                "feature",
                "top_column",
                "top_label",
                "selectivity_avg",
                "selectivity_max",
                "frequency",
            ]
        ].to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        "",
        "ground truth: best single-feature AUROC per true concept (0.5 = chance):",
        result.concepts[["concept", "n_members", "best_feature", "auroc"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        ),
        "",
        "the same dictionary on two input preparations (mean best AUROC per concept group):",
        result.comparison.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        "  The negative controls here mix all cell types, so PCA whitening on them treats the",
        "  cell-type difference as control variation and scales it to unit variance like every",
        "  other direction the controls vary in. " + _better(result.comparison),
        "  The analysis above uses the first row; both dictionaries are in the output folder.",
        "",
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()),
        f"outputs in {result.out}: plates/, store.zarr/, dictionary-*.safetensors, analysis/ "
        "(features.parquet, codes.h5ad, ...)",
        "The bundled model is small and trained on synthetic plates: use OpenPhenom or your own "
        "checkpoint (--model) for real discovery.",
    ]
    if result.report is not None:
        lines.append(f"report: {result.report} (open it in a web browser)")
    return "\n".join(lines)
