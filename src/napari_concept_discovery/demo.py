"""The whole method on a synthetic plate set, offline: synth → embed → whiten + train → analyze.

It exists so that a new user sees every step run on their machine in a few minutes, with the
bundled default model, and so that the outputs (store, dictionary, tables) can be opened in
napari afterwards. Each step reuses what an earlier run left if it still matches (the plates by
their parameters, the store by its signature), so a second run is fast.

The story it tells: each cell keeps one token per stain, so a feature can be traced to the
stain that drives it; the perturbations, each of which changes one stain, are found as
features carrying that stain; and how the whitening treats the cell types that the controls
mix decides whether cell types survive (docs/architecture.md, "Dictionaries").
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .dictionary.nested import describe_levels
from .dictionary.overfit import OVERFIT_RATIO, overfits
from .dictionary.settings import METHOD_NAMES, AnalyzeSettings, TrainSettings, WhitenSettings
from .dictionary.views import describe_views
from .dictionary.whiten import control_mask
from .progress import ProgressCallback
from .settings import Settings, option

LABEL_COLUMNS = ("cell_type", "perturbation")
TRUTH_COLUMNS = ("cell_type", "perturbation", "responded", "mitotic")
CONTROL = "well_type=negative_control"


@dataclass
class DemoSettings(Settings):
    """The demo's plates and its dictionary: small enough to run every step in minutes."""

    plates: int = option(2, "number of synthetic plates")
    wells: int = option(16, "wells per plate")
    sites: int = option(1, "sites per well")
    size: int = option(512, "site size in pixels")
    method: str = option("icfl", "dictionary method", choices=METHOD_NAMES)
    atoms: int | None = option(
        None, "dictionary size M (default: sized to the cells, as train does)", min=1
    )
    levels: str = option(
        TrainSettings.levels,
        "nested levels of the dictionary (as train --levels: e.g. 16,M; none: plain)",
    )
    views: str = option(
        TrainSettings.views,
        "views of the tokens the dictionary has a part for (as train --views: any of "
        "whitened, within-type and centred, comma-separated)",
    )
    sparsity: int = option(8, "non-zeros per token")
    steps: int = option(1000, "training steps")
    seed: int = option(0, "random seed")
    model: str = option("default", "model source, as `concept-discovery models` lists them")


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
    preparation: str = ""
    store_size: str = ""
    levels: str = "none"  # the analysed dictionary's nested levels
    families: pd.DataFrame | None = None  # analysis/families.parquet


def _plates(
    out: Path,
    n_plates: int,
    n_wells: int,
    n_sites: int,
    size: int,
    seed: int,
    progress: ProgressCallback = None,
) -> Path:
    """Synthetic plates under ``out/plates``, regenerated only when the parameters changed.

    Progress: stage "synth", done/total sites.
    """
    from .progress import report
    from .synth import write_synthetic_plates

    params = dict(n_plates=n_plates, n_wells=n_wells, n_sites=n_sites, size=size, seed=seed)
    target = out / "plates"
    stamp = target / "demo-params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return target
    tmp = out / "plates.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    total, done = n_plates * n_wells * n_sites, 0

    def site_done(n: int) -> None:
        nonlocal done
        done += n
        report(progress, "synth", done, total)

    write_synthetic_plates(tmp, **params, progress=site_done)
    (tmp / "demo-params.json").write_text(json.dumps(params))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def preparations(table: pd.DataFrame) -> dict[str, tuple[WhitenSettings, str]]:
    """The whitenings the demo compares: name -> (settings, what it does, in words).

    The first (the one analysed, and the one ``view`` opens) is what ``train`` does by default:
    PCA whitening on each plate's controls as they are, pooled (typical-variation
    normalisation), in views (where the controls mix cell types, the within-type view keeps
    their difference). Where the controls mix cell types, then whitening each plate and cell
    type on its own controls, so every cell is judged against controls of its kind; then the
    pooled one with the controls' covariance taken within cell types, which is what
    ``within="auto"`` resolves to on these controls. Otherwise only the plain one.
    """
    plain = WhitenSettings(CONTROL, by="plate")
    controls = table[control_mask(table, *plain.control)]
    if controls["cell_type"].nunique() < 2:
        return {"controls": (plain, "each plate's controls")}
    return {
        "controls": (plain, "each plate's controls (cell types mixed)"),
        "per cell type": (
            plain.replace(by="plate,cell_type"),
            "each plate and cell type's own controls",
        ),
        "within cell type": (
            plain.replace(within="auto"),
            "each plate's controls, covariance within cell types (--whiten-within auto)",
        ),
    }


def _views_words(settings: TrainSettings, table) -> str:
    """``; views whitened + centred, a part each`` for a dictionary in views, else '': the
    views training keeps on ``table`` (within-type only where it differs from the whitening)."""
    from .dictionary.pipeline import distinct_views

    views = [v for v, _ in distinct_views(settings.view_settings(), table)]
    return f"; views {' + '.join(views)}, a part each" if len(views) > 1 else ""


def _summary(name: str, recovered: pd.DataFrame, fvu: float, unit: str = "cell") -> dict:
    """One comparison row: mean best AUROC per kind of concept."""
    row = {"unit": unit, "whitening": name, "fvu": fvu}
    for kind, label in (
        ("cell type", "cell types"),
        ("subpopulation", "mitotic"),
        ("perturbation", "perturbations"),
    ):
        part = recovered[recovered["kind"] == kind]
        row[label] = float(part["auroc"].mean()) if len(part) else float("nan")
    nulls = recovered[recovered["kind"] == "null perturbation"]
    row["null (max)"] = float(nulls["auroc"].max()) if len(nulls) else float("nan")
    return row


@contextmanager
def _one_torch_thread():
    """Train with one torch thread, restoring the setting after.

    Measured on a 2-core machine with other work running: ICFL steps of this size took 7 times
    longer with two threads than with one (each step is many small operations, and a thread
    that waits for a busy core stalls the other); the embedding keeps the default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    out: str | Path,
    settings: DemoSettings | None = None,
    *,
    log: Callable[[str], None] = print,
    progress: ProgressCallback = None,
) -> DemoResult:
    """Run every step on synthetic plates with known ground truth and report what was found.

    ``settings.model`` is any source ``load_model`` takes (the bundled default unless given).
    """
    import time

    from .analysis.analyze import analyze_store, dictionary_families
    from .analysis.encode import encode_store
    from .analysis.truth import join_truth, read_truth, recovery_table, truth_concepts
    from .dictionary.pipeline import train_on_store
    from .embed.plate import EmbedSettings, embed_plate

    s = settings if settings is not None else DemoSettings()
    n_plates, n_wells, n_sites, size, seed = s.plates, s.wells, s.sites, s.size, s.seed
    method, n_atoms, levels, sparsity = s.method, s.atoms, s.levels, s.sparsity
    steps, model = s.steps, s.model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    log(f"1/4 synthetic plates: {n_plates} plates x {n_wells} wells x {n_sites} sites, {size} px")
    plates = _plates(out, n_plates, n_wells, n_sites, size, seed, progress)
    timings["synth"] = time.perf_counter() - t

    t = time.perf_counter()
    which = "the bundled default model" if model == "default" else f"model {model}"
    log(
        f"2/4 embedding with {which} (cells from the plate's label images; each cell keeps one "
        "token per stain)"
    )
    # The demo owns its folder: a store left by an older model or version is replaced, not
    # refused (the plates above were just written by the demo itself).
    store = embed_plate(
        plates, EmbedSettings(model=model), out / "store.zarr", progress=progress, overwrite=True
    )
    timings["embed"] = time.perf_counter() - t
    n_cells = int(store.tokens("cell").shape[0])
    sizes = store.nbytes()
    store_size = (
        f"{sizes['total'] / 1e6:.0f} MB, {sizes['total'] / 1e6 / max(1, len(store.sites())):.1f} "
        f"MB per site; cell tokens {store.token_groups} stains x {store.embed_dim} side by side"
    )
    log(f"    store: {store_size}")

    t = time.perf_counter()
    analyze = AnalyzeSettings(
        labels=LABEL_COLUMNS, truth=TRUTH_COLUMNS, truth_file=plates / "truth.csv"
    )
    truth = read_truth(analyze.truth_file)
    table = join_truth(store.table("cell"), truth)
    concepts = truth_concepts(table)
    comparison, recovered, trained = [], {}, {}
    for name, (whiten, what) in preparations(table).items():
        settings = TrainSettings(
            method=method,
            unit="cell",
            atoms=n_atoms,
            levels=levels,
            views=s.views,
            sparsity=sparsity,
            steps=steps,
            batch_size=min(1024, n_cells),
            seed=seed,
            whiten=whiten,
        )
        atoms, why = settings.atoms_for(n_cells)
        nested = describe_levels(settings.replace(atoms=atoms).method_config().get("levels"))
        log(
            f"3/4 {method} dictionary, {atoms} atoms ({why}), nested levels {nested}, "
            f"{sparsity} non-zeros, on {n_cells} cell tokens PCA-whitened on {what}"
            + _views_words(settings, table)
        )
        slug = name.replace(" ", "-")
        with _one_torch_thread():
            result = train_on_store(
                store, settings, out=out / f"dictionary-{slug}.safetensors", progress=progress
            )
        log(f"    whitening: {result.dictionary.meta.within_chosen}")
        codes, _ = encode_store(store, result.dictionary)
        stains = result.dictionary.stain_table()
        families = dictionary_families(result.dictionary, codes)
        recovered[name] = recovery_table(
            codes, concepts, stains, families, result.dictionary.feature_views()
        )
        comparison.append(_summary(name, recovered[name], result.metrics["fvu"]))
        comparison[-1]["covariance within"] = result.dictionary.meta.whitening.within or "-"
        comparison[-1]["whitening check"] = _overfit_words(result.metrics)
        trained[name] = result
    crop = _crop_dictionary(
        store, out, method, n_atoms, sparsity, seed, recovered, comparison, log, progress, s.views
    )
    timings["train"] = time.perf_counter() - t

    chosen = next(iter(trained))
    t = time.perf_counter()
    log(
        f"4/4 analysis of the dictionary whitened on {preparations(table)[chosen][1]}: "
        "selectivity, best feature per true concept, stains"
    )
    dictionary = trained[chosen].dictionary
    paths = analyze_store(store, dictionary, analyze, out / "analysis", progress=progress).paths
    timings["analyze"] = time.perf_counter() - t

    features = pd.read_parquet(paths["features"])
    top = (
        features[features["n_active"] > 0]
        .sort_values("selectivity_avg", ascending=False)
        .groupby(["top_column", "top_label"], sort=False)
        .head(1)
        .head(12)
    )
    found = recovered[chosen].copy()
    found["stains touched"] = [_touched(c) for c in found["concept"]]

    from .report.build import ReportSettings, write_report

    t = time.perf_counter()
    log("report: the top features with their cells, plate maps and concept profiles (HTML)")
    settings = ReportSettings(labels=LABEL_COLUMNS, top=8, cells=8)
    compared = [r.path for r in trained.values()] + ([crop.path] if crop else [])
    html = write_report(store, compared, out / "report", settings, progress=progress)
    timings["report"] = time.perf_counter() - t
    return DemoResult(
        out=out,
        plates=plates,
        store=out / "store.zarr",
        dictionary=trained[chosen].path,
        analysis=out / "analysis",
        n_cells=n_cells,
        metrics=trained[chosen].metrics,
        selectivity_counts=pd.read_parquet(paths["selectivity_counts"]),
        concepts=found,
        top_features=top,
        comparison=pd.DataFrame(comparison),
        timings=timings,
        report=html,
        preparation=chosen,
        store_size=store_size,
        levels=describe_levels(dictionary.levels),
        families=pd.read_parquet(paths["families"]) if "families" in paths else None,
    )


def _crop_dictionary(
    store,
    out: Path,
    method,
    n_atoms,
    sparsity,
    seed,
    recovered,
    comparison,
    log,
    progress,
    views: str = TrainSettings.views,
):
    """One dictionary on the crop tokens (one token per tile, no cells needed), whitened on each
    plate's controls, judged at the well level beside the cell dictionaries.

    It is the route for a plate whose cells cannot be found. Crops are few (a 512 px site gives
    four), so the dictionary has at most half as many atoms as there are crops, trains for the
    steps sized to them, and is whitened per plate: per plate and cell type leaves too few
    control crops to estimate a covariance. Returns the training result, or None (and says why)
    when the store has too few crops.
    """
    from .analysis.encode import encode_store
    from .analysis.truth import recovery_table, well_concepts
    from .dictionary.pipeline import train_on_store
    from .dictionary.settings import first_atoms

    table = store.table("crop")
    n_crops = len(table)
    whiten = WhitenSettings(CONTROL, by="plate")
    n_controls = int(control_mask(table, *whiten.control).sum())
    if n_crops < 16 or n_controls < 4:
        log(f"    no crop dictionary: {n_crops} crops, {n_controls} of them in control wells")
        return None
    atoms = max(4, min(n_atoms or first_atoms(n_crops), n_crops // 2))
    log(
        f"3/4 {method} dictionary on {n_crops} crop tokens (one per tile, no segmentation), "
        f"{atoms} atoms, PCA-whitened on each plate's controls"
    )
    settings = TrainSettings(
        method=method,
        unit="crop",
        atoms=atoms,
        sparsity=min(sparsity, atoms),
        batch_size=min(1024, n_crops),
        seed=seed,
        whiten=whiten,
        views=views,
    )
    with _one_torch_thread():
        result = train_on_store(
            store, settings, out=out / "dictionary-crops.safetensors", progress=progress
        )
    log(f"    whitening: {result.dictionary.meta.within_chosen}")
    codes, _ = encode_store(store, result.dictionary)
    nulls = {
        name
        for found in recovered.values()
        for name in found.loc[found["kind"] == "null perturbation", "concept"]
    }
    found = recovery_table(codes, well_concepts(table, sorted(nulls)))
    comparison.append(_summary("controls", found, result.metrics["fvu"], unit="crop"))
    comparison[-1]["covariance within"] = result.dictionary.meta.whitening.within or "-"
    comparison[-1]["whitening check"] = _overfit_words(result.metrics)
    return result


def _overfit_words(metrics: dict) -> str:
    """The whitening check of a dictionary's metrics (:mod:`.dictionary.overfit`) as the demo's
    comparison shows it: "7.2x overfits", "1.1x", or "-" where it was not measured."""
    ratio = metrics.get("whitened_norm_ratio")
    if ratio is None:
        return "-"
    return f"{ratio:.1f}x" + (" overfits" if overfits(ratio) else "")


def _touched(concept: str) -> str:
    """The stains a synthetic perturbation changes, from its declaration ("" for others)."""
    from .synth.concepts import PERTURBATION_BY_NAME

    p = PERTURBATION_BY_NAME.get(concept)
    return ", ".join(p.channels) if p is not None and p.channels else ""


def _fmt(v) -> str:
    return f"{v:.3f}"


def families_lines(families: pd.DataFrame | None, n: int = 6) -> list[str]:
    """The demo's lines on feature families: how many, and the largest with their members,
    the label their summed code is most selective for and their best member's selectivity."""
    if families is None:
        return []
    head = (
        f"feature families (features whose atoms point the same way or fire on the same cells): "
        f"{len(families)} of 2+ features"
    )
    if families.empty:
        return [head, ""]
    cols = [
        c
        for c in (
            "family",
            "n_members",
            "members",
            "top_column",
            "top_label",
            "selectivity_family",
            "best_member",
            "selectivity_best_member",
        )
        if c in families.columns
    ]
    shown = families[cols].head(n).copy()
    shown["members"] = [m if len(m) <= 30 else m[:27] + "..." for m in shown["members"]]
    return [
        head + "; the largest (selectivity of the summed code, and of its best member):",
        shown.to_string(index=False, float_format=_fmt),
        "",
    ]


def format_report(result: DemoResult) -> str:
    """A plain-text summary a biologist can read: quality, what matched the truth, the stains."""
    m = result.metrics
    c = result.concepts
    perts = c[c["kind"].isin(["perturbation", "null perturbation"])].copy()
    others = c[~c["kind"].isin(["perturbation", "null perturbation"])]
    stain_cols = [col for col in ("top_stain", "stain_share") if col in c.columns]
    cols = ["concept", "kind", "stains touched", "n_members", "best_feature", "auroc"]
    cols += ["view"] if "view" in perts.columns else []
    cols += [col for col in ("best_family", "family_auroc") if col in perts.columns]
    found = perts[cols]
    found = found.join(perts[stain_cols]) if stain_cols else found
    lines = [
        "",
        f"store: {result.store_size}",
        f"dictionary: {result.dictionary}",
        f"  FVU {m['fvu']:.3f}  mean cosine {m['mean_cosine']:.3f}  L0 {m['l0']:.1f}  "
        f"dead {m['n_dead']}/{m['n_atoms']}  ({result.n_cells} cells)",
        f"  nested levels: {result.levels} (each level: the first atoms that were trained to "
        "reconstruct the cells alone)",
        "",
        "perturbations: the best single feature for each (its responding cells against its",
        "other cells and control cells of the same plates and cell types; AUROC 0.5 = chance),",
        "the stains the perturbation really changes, and the stain that carries most of that",
        "feature (its share of the feature's norm; 1/6 would be no preference); family_auroc:",
        "the best feature family's summed code (a concept split over several features):",
        found.to_string(index=False, float_format=_fmt),
        "",
        *(
            textwrap.wrap(
                "view: the part of the dictionary that found the feature: "
                + describe_views(list(dict.fromkeys(c["view"].astype(str))))
                + ":",
                100,
            )
            if "view" in c.columns
            else []
        ),
        "cell types and mitotic cells (against all other cells):",
        others.drop(columns=["stains touched"], errors="ignore").to_string(
            index=False, float_format=_fmt
        ),
        "",
        "features with selectivity above 0.5 / 0.2, per label column:",
        result.selectivity_counts.to_string(index=False),
        "",
        "most selective feature per label (avg = P(active|label) - P(active|other labels)):",
        result.top_features[
            [
                col
                for col in (
                    "feature",
                    "top_column",
                    "top_label",
                    "selectivity_avg",
                    "frequency",
                    "top_stain",
                )
                if col in result.top_features.columns
            ]
        ].to_string(index=False, float_format=_fmt),
        "",
        *families_lines(result.families),
        "the same dictionary on each whitening, and one on crop tokens (mean best AUROC per",
        "kind of concept; null: the highest for a perturbation that changes nothing, where",
        "anything above ~0.6 is a difference between wells, not biology):",
        result.comparison.to_string(index=False, float_format=_fmt, na_rep="-"),
        "  The negative controls mix the three cell types. Whitening each cell type on its own",
        "  controls judges every cell against cells of its kind: perturbations stand out, and",
        "  the cell types, centred away, are no longer concepts. Whitening on the mixed controls",
        "  treats the cell-type difference as control variation and scales it to unit variance",
        "  like every other direction they vary in. Taking their covariance within cell types",
        "  (--whiten-within auto; 'covariance within' above) keeps the cell types, at some",
        "  cost to the perturbations; with one control well per cell type and plate",
        "  it has not seen how wells differ, and can amplify that (watch the null column).",
        "  The default ('controls', as train does it) keeps both: its whitened part finds the",
        "  perturbations, a within-type part (covariance within cell types) the cell types, and",
        "  a centred part mitosis; each feature says which part found it (its view).",
        "  'whitening check': how far out the other cells' whitened tokens lie against the",
        "  control cells' own (near 1 where the controls are a fair sample). With fewer control",
        "  cells than token dimensions the whitening overfits them ('overfits': above "
        f"{OVERFIT_RATIO:g}),",
        "  and features tell any well from the controls: read the null column and the report's",
        "  well-level test beside it, not the hits alone.",
        f"  The analysis above uses '{result.preparation}'; every dictionary is in the output "
        "folder.",
        "  The crop row learns on crop tokens (one per tile: no segmentation needed, the route",
        "  for a plate whose cells cannot be found), judged at the well level: every crop of a",
        "  perturbed well against control crops, so it cannot see mitosis and its AUROCs mix",
        "  responding and unaffected cells. A 512 px site gives four crops, so each crop AUROC",
        "  rests on a handful of tokens: read it beside its own null column.",
        "",
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()),
        f"outputs in {result.out}: plates/, store.zarr/, dictionary-*.safetensors, analysis/ "
        "(features.parquet with stain_* columns, codes.h5ad, ...)",
        "The bundled model is small and trained on synthetic plates: use OpenPhenom or your own "
        "checkpoint (--model) for real discovery.",
    ]
    if result.report is not None:
        lines.append(f"report: {result.report} (open it in a web browser)")
    return "\n".join(lines)
