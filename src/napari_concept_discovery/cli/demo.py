"""``demo``: every step offline on synthetic plates with ground truth (the library's
``demo.run_demo``), and what was found printed as tables.
"""

from __future__ import annotations

from pathlib import Path

from .common import at_least, check_synth_args, command
from .output import (
    Console,
)


def add_demo(sub) -> None:
    from ..demo import DemoSettings
    from ..settings import add_arguments

    p = command(
        sub,
        "demo",
        "run every step offline on synthetic plates with ground truth and print what was found",
        [
            "concept-discovery demo demo-out/",
            "concept-discovery demo demo-out/ --wells 6 --size 256 --steps 100 --json",
            "concept-discovery view demo-out/",
        ],
        note="The steps are the ones synth, embed, train, analyze and report run; the output "
        "folder holds plates/, store.zarr, the dictionaries, analysis/ and report/index.html.",
    )
    p.add_argument("out", nargs="?", default="demo-out", help="output folder (default: demo-out)")
    add_arguments(p, DemoSettings, with_defaults=True)
    p.set_defaults(func=run_demo)


def run_demo(args, con: Console) -> int:
    from .._files import check_output
    from ..demo import DemoSettings, format_report, run_demo
    from ..dictionary.settings import TrainSettings
    from ..settings import from_args

    check_synth_args(args)
    for name in ("atoms", "sparsity", "steps"):
        at_least(getattr(args, name), f"--{name}")
    # Refused now, not after the plates are drawn and embedded (the demo trains these).
    TrainSettings(
        method=args.method,
        atoms=args.atoms,
        levels=args.levels,
        views=args.views,
        sparsity=args.sparsity,
        steps=args.steps,
    )
    check_output(args.out, folder=True, what="demo output folder")
    bars = con.bars(
        {
            "synth": "synth sites",
            "embed": "embed sites",
            "train": f"train {args.method}",
            "encode": "encode",
            "report": "report figures",
        }
    )

    def log(msg: str) -> None:
        bars.close()
        con.say(msg)

    result = run_demo(args.out, from_args(DemoSettings, args), log=log, progress=bars)
    log(format_report(result))
    con.result(
        out=Path(result.out).resolve(),
        plates=Path(result.plates).resolve(),
        store=Path(result.store).resolve(),
        dictionary=Path(result.dictionary).resolve(),
        analysis=Path(result.analysis).resolve(),
        report=Path(result.report).resolve() if result.report else None,
        cells=result.n_cells,
        metrics=result.metrics,
        timings_s={k: round(v, 3) for k, v in result.timings.items()},
        concepts=result.concepts[["concept", "kind", "best_feature", "auroc"]].to_dict("records"),
    )
    return 0
