"""``analyze``: encode a store with a dictionary and write the analysis tables, on this machine
or on a Dask cluster; ``similar`` and ``cells``: cell selections to take further.
"""

from __future__ import annotations

from pathlib import Path

from .common import at_least, command
from .embed import add_cluster_options, cluster_client
from .output import (
    Console,
)


def add_analyze(sub) -> None:
    from ..dictionary.settings import AnalyzeSettings
    from ..settings import add_arguments

    p = command(
        sub,
        "analyze",
        "encode a store with a dictionary; write feature table, selectivity and codes",
        [
            "concept-discovery analyze store.zarr dict.safetensors --out analysis/",
            "concept-discovery analyze store.zarr dict.safetensors --labels "
            "cell_type,perturbation --truth-file plates/truth.csv --truth mitotic --out analysis/",
        ],
        note="Writes features.parquet, selectivity, concept profiles, phenotypic activity "
        "(activity.parquet: copairs mAP of replicate wells against the controls for the codes, "
        "the raw tokens and cached CellProfiler measurements) and codes.h5ad (AnnData) into "
        "--out; `concept-discovery report` draws them.",
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument(
        "dictionary", help="dictionary file (.safetensors) from `concept-discovery train`"
    )
    add_arguments(p, AnalyzeSettings)
    p.add_argument("--out", required=True, help="output folder")
    add_cluster_options(p, "encode", "each encoding blocks of token rows")
    p.add_argument(
        "--rows-per-task",
        type=int,
        default=None,
        help="token rows per Dask task, rounded up to whole encode batches (default: about "
        "four tasks per worker)",
    )
    p.set_defaults(func=run_analyze)


def run_analyze(args, con: Console) -> int:
    from ..analysis.analyze import analyze_store
    from ..analysis.write import check_analysis_folder
    from ..dictionary.io import load_dictionary
    from ..dictionary.settings import AnalyzeSettings
    from ..embed.store import ActivationStore
    from ..settings import from_args

    settings = from_args(AnalyzeSettings, args)
    check_analysis_folder(args.out)
    store = ActivationStore.open(args.store)
    dictionary = load_dictionary(args.dictionary)
    trained_on = dictionary.meta.unit
    if settings.unit and trained_on and settings.unit != trained_on:
        # Accepted on purpose (same model, block and width; the viewer's maps do it), but said.
        con.note(
            f"note: {args.dictionary} was trained on {trained_on} tokens; encoding the store's "
            f"{settings.unit} tokens with it (--unit {settings.unit})"
        )
    at_least(args.rows_per_task, "--rows-per-task")
    with (
        cluster_client(args) as client,
        con.bars({"encode": "encode", "measure": "measure cells"}) as bars,
    ):
        if client is None:
            analysis = analyze_store(store, dictionary, settings, args.out, progress=bars)
        else:
            from ..analysis.cluster import analyze_store_on_cluster

            analysis = analyze_store_on_cluster(
                store,
                dictionary,
                settings,
                args.out,
                client=client,
                rows_per_task=args.rows_per_task,
                progress=bars,
            )
    codes = analysis.codes
    l0 = codes.nnz / max(codes.shape[0], 1)
    con.say(
        f"encoded {codes.shape[0]} tokens with {codes.shape[1]} features (L0 {l0:.1f}); wrote "
        f"{', '.join(p.name for p in analysis.paths.values())} to {args.out}"
    )
    if "activity" in analysis.paths:
        import pandas as pd

        from ..analysis.activity import EXPLANATION, FDR_ALPHA, format_activity

        con.say(f"phenotypic activity per label value. {EXPLANATION}; * marks q <= {FDR_ALPHA}:")
        con.say(format_activity(pd.read_parquet(analysis.paths["activity"])))
    con.result(
        out=Path(args.out).resolve(),
        files={k: Path(v).resolve() for k, v in analysis.paths.items()},
        tokens=codes.shape[0],
        features=codes.shape[1],
        l0=round(l0, 4),
        unit=settings.unit or trained_on,
    )
    return 0


def add_similar(sub) -> None:
    p = command(
        sub,
        "similar",
        "list the cells of a store most like one cell in a dictionary's code space",
        [
            "concept-discovery similar store.zarr dict.safetensors --plate Plate1 --well B02 "
            "--site 1 --label 7 --top 10",
            "concept-discovery similar store.zarr dict.safetensors --plate Plate1 --well B02 "
            "--site 1 --label 7 --csv similar.csv --json",
        ],
        note="Cosine similarity of the cells' codes, every cell scored (exact); the cell itself "
        "is left out. The table goes to stdout; --csv writes it (with centroids) for the next "
        "step.",
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("--plate", required=True, help="the cell's plate")
    p.add_argument("--well", required=True, help="the cell's well, e.g. B02")
    p.add_argument("--site", required=True, type=int, help="the cell's site (field) number")
    p.add_argument("--label", required=True, type=int, help="the cell's label on that site")
    p.add_argument("--top", type=int, default=10, help="how many cells to list (default 10)")
    p.add_argument("--csv", default=None, help="also write the cells to this CSV file")
    p.set_defaults(func=run_similar)


def run_similar(args, con: Console) -> int:
    from ..analysis.cell_selection import similar_cells, write_cells_csv
    from ..analysis.explore import Explorer
    from ..dictionary.io import load_dictionary
    from ..embed.store import ActivationStore
    from ..plate.model import SiteKey

    at_least(args.top, "--top")
    store = ActivationStore.open(args.store)
    dictionary = load_dictionary(args.dictionary)
    explorer = Explorer(store, dictionary)
    key = SiteKey(str(args.plate), str(args.well), int(args.site))
    with con.bars({"encode": "encode"}) as bars:
        explorer.cell_codes(progress=bars)
    cells = similar_cells(explorer, key, args.label, n=args.top)
    if args.csv:
        write_cells_csv(cells, args.csv)
    shown = cells.copy()
    shown["similarity"] = shown["similarity"].map(lambda v: f"{v:.3f}")
    for c in ("centroid_y", "centroid_x"):
        if c in shown.columns:
            shown[c] = shown[c].map(lambda v: f"{v:.1f}")
    con.say(f"the {len(cells)} cells most like cell {args.label} of {key}:")
    con.say(shown.to_string(index=False))
    con.result(
        query={"plate": key.plate, "well": key.well, "site": key.site, "label": args.label},
        cells=cells.to_dict(orient="records"),
        csv=None if not args.csv else Path(args.csv).resolve(),
    )
    return 0


def add_cells(sub) -> None:
    p = command(
        sub,
        "cells",
        "export the cells where a feature is at least a threshold (CSV, label images)",
        [
            "concept-discovery cells store.zarr dict.safetensors --feature 12 --threshold 0.5 "
            "--csv cells.csv",
            "concept-discovery cells store.zarr dict.safetensors --feature 12 --threshold 0.5 "
            "--plate Plate1 --well B02 --csv cells.csv --labels selected/",
        ],
        note="The CSV has plate, well, site, label, centroid_y, centroid_x and the feature's "
        "value (feature_F), strongest first. --labels writes one label image per site holding "
        "selected cells, only those cells kept (<plate>/<well>_s<site>_cells.tif, the layout of "
        "`segment`'s label folders), for napari or the next pipeline. Both are written "
        "atomically; without either, the table goes to stdout.",
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("--feature", required=True, type=int, help="the feature (its number)")
    p.add_argument(
        "--threshold",
        required=True,
        type=float,
        help="keep cells where the feature's code is at least this (and not zero)",
    )
    p.add_argument("--plate", default=None, help="only cells of this plate")
    p.add_argument("--well", default=None, help="only cells of this well, e.g. B02")
    p.add_argument("--site", default=None, type=int, help="only cells of this site number")
    p.add_argument("--csv", default=None, help="write the cells to this CSV file")
    p.add_argument("--labels", default=None, help="write one label image per site into this folder")
    p.set_defaults(func=run_cells)


def run_cells(args, con: Console) -> int:
    from .._files import check_not_foreign, check_output
    from ..analysis.cell_selection import (
        SELECTION_MARKER,
        cells_above,
        in_sites,
        write_cells_csv,
        write_selection_labels,
    )
    from ..analysis.explore import Explorer
    from ..dictionary.io import load_dictionary
    from ..embed.store import ActivationStore
    from ..settings import SettingsError

    if args.csv:
        check_output(args.csv, folder=False, what="--csv file")
    if args.labels:
        check_not_foreign(
            args.labels,
            marker=SELECTION_MARKER,
            what="--labels folder",
            kind="a cell selection's label images",
        )
    store = ActivationStore.open(args.store)
    dictionary = load_dictionary(args.dictionary)
    explorer = Explorer(store, dictionary)
    try:
        f = explorer._feature(args.feature)
    except IndexError as exc:
        raise SettingsError(f"--feature: {exc}") from None
    with con.bars({"encode": "encode"}) as bars:
        explorer.cell_codes(progress=bars)
    cells = cells_above(explorer, f, args.threshold)
    cells = in_sites(cells, args.plate, args.well, args.site)
    cells = cells.rename(columns={"value": f"feature_{f}"})
    where = ", ".join(
        f"{k} {v}"
        for k, v in (("plate", args.plate), ("well", args.well), ("site", args.site))
        if v is not None
    )
    what = f"cells with feature {f} >= {args.threshold:g}" + (f" ({where})" if where else "")
    n_sites = len(cells[["plate", "well", "site"]].drop_duplicates())
    if args.csv:
        write_cells_csv(cells, args.csv)
    if args.labels:
        write_selection_labels(explorer, cells, args.labels, what=what)
    con.say(f"{len(cells)} {what}, on {n_sites} sites")
    if not args.csv and not args.labels:
        shown = cells.copy()
        for c in ("centroid_y", "centroid_x"):
            if c in shown.columns:
                shown[c] = shown[c].map(lambda v: f"{v:.1f}")
        shown[f"feature_{f}"] = shown[f"feature_{f}"].map(lambda v: f"{v:.4g}")
        con.say(shown.to_string(index=False))
    for path, kind in ((args.csv, "CSV"), (args.labels, "label images")):
        if path:
            con.say(f"wrote {kind} to {path}")
    con.result(
        feature=f,
        threshold=args.threshold,
        cells=len(cells),
        sites=n_sites,
        csv=None if not args.csv else Path(args.csv).resolve(),
        labels=None if not args.labels else Path(args.labels).resolve(),
    )
    return 0
