"""``report``: the HTML report of one or more dictionaries on a store."""

from __future__ import annotations

from pathlib import Path

from .common import command
from .output import (
    Console,
)


def add_report(sub) -> None:
    from ..report.build import ReportSettings
    from ..settings import add_arguments

    p = command(
        sub,
        "report",
        "write an HTML report of a dictionary on a store: top features, cells, plate maps, "
        "concept profiles",
        [
            "concept-discovery report store.zarr dict.safetensors --out report/",
            "concept-discovery report store.zarr dict.safetensors dict-topk.safetensors "
            "--out report/ --labels cell_type,perturbation",
        ],
        description=(
            "Write DIR/index.html, one self-contained file that opens in a browser from disk: "
            "for the most selective features of the first dictionary their top cells, a site "
            "with the activation overlay, plate maps and selectivity per label; concept "
            "profiles against the control wells; and a table comparing all the dictionaries "
            "given."
        ),
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument(
        "dictionaries",
        nargs="+",
        metavar="DICT",
        help="dictionary files; the first is reported feature by feature, all are compared",
    )
    add_arguments(p, ReportSettings)
    p.add_argument("--out", required=True, help="output folder (index.html, hits.csv)")
    p.set_defaults(func=run_report)


def run_report(args, con: Console) -> int:
    from ..embed.store import ActivationStore
    from ..report.build import ReportSettings, check_report_folder, write_report
    from ..settings import from_args

    settings = from_args(ReportSettings, args)
    check_report_folder(args.out)  # before minutes of figures
    store = ActivationStore.open(args.store)
    with con.bars({"encode": "encode", "report": "report figures"}) as bars:
        path = write_report(store, args.dictionaries, args.out, settings, progress=bars)
    con.say(f"wrote {path}")
    out = Path(args.out).resolve()
    con.result(
        report=Path(path).resolve(),
        out=out,
        hits=out / "hits.csv" if (out / "hits.csv").is_file() else None,
        dictionaries=[Path(d).resolve() for d in args.dictionaries],
        store=Path(args.store).resolve(),
    )
    return 0
