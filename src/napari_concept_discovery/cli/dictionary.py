"""``train``: a sparse dictionary (ICFL or TopK) on a store, resumable from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..dictionary.overfit import check_words
from .common import UsageError, check_threads, command
from .output import (
    Console,
)


def add_train(sub) -> None:
    from ..dictionary.settings import TrainSettings, WhitenSettings
    from ..settings import add_arguments

    p = command(
        sub,
        "train",
        "learn a sparse dictionary (ICFL or TopK SAE) on the tokens of an activation store",
        [
            "concept-discovery train store.zarr --atoms 256 --out dict.safetensors",
            "concept-discovery train store.zarr --method topk --atoms 256 --sparsity 16 "
            "--no-whiten --out dict-topk.safetensors",
        ],
        note="Tokens are PCA-whitened on the control wells unless --no-whiten; an interrupted "
        "training goes on with --resume.",
    )
    p.add_argument("store", help="activation store folder (written by `concept-discovery embed`)")
    add_arguments(p, TrainSettings)
    add_arguments(p, WhitenSettings)
    p.add_argument("--no-whiten", action="store_true", help="train on the tokens as stored")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="dictionary file to write (.safetensors)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a file at --out that is not a dictionary (a dictionary is replaced anyway)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint beside --out (<name>.ckpt.safetensors) of an "
        "interrupted training with the same settings",
    )
    p.set_defaults(func=run_train)


def run_train(args, con: Console) -> int:
    import torch

    from ..dictionary.nested import describe_levels
    from ..dictionary.pipeline import check_dictionary_out, train_on_store
    from ..dictionary.settings import TrainSettings, WhitenSettings
    from ..embed.store import ActivationStore
    from ..settings import describe, from_args

    check_threads(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    whiten = None
    if args.no_whiten:
        given = [d["flag"] for d in describe(WhitenSettings) if d["name"] in vars(args)]
        if given:
            raise UsageError(f"--no-whiten cannot be combined with {', '.join(given)}")
    store = ActivationStore.open(args.store)  # first: a missing store is the first thing to fix
    if not args.no_whiten:
        whiten = from_args(WhitenSettings, args)
    settings = from_args(TrainSettings, args, whiten=whiten)
    check_dictionary_out(args.out, args.overwrite)
    with con.bars({"train": f"train {settings.method}", "evaluate": "evaluate"}) as bars:
        trained = train_on_store(
            store,
            settings,
            out=args.out,
            progress=bars,
            overwrite=args.overwrite,
            resume=args.resume,
        )
    m = trained.metrics
    dropped = trained.dictionary.meta.nonfinite_dropped
    levels = trained.dictionary.levels
    views = trained.dictionary.view_names
    con.say(
        f"wrote {trained.path}: {settings.method}, M={trained.dictionary.n_atoms}"
        + (f" in views {' + '.join(views)}" if views else "")
        + (f" nested {describe_levels(levels)}" if levels else "")
        + ", "
        f"{trained.result.steps_done} steps{' per view' if views else ''}, FVU {m['fvu']:.4f}"
        f"{' (mean of the views)' if views else ''}, cosine {m['mean_cosine']:.4f}, "
        f"L0 {m['l0']:.1f}, dead {m['n_dead']}/{m['n_atoms']}"
        + (f"; left out {dropped} non-finite tokens" if dropped else "")
    )
    for view, vm in (m.get("views") or {}).items():  # a dictionary in views: each part's
        con.say(
            f"  view {view}: FVU {vm['fvu']:.4f}, cosine {vm['mean_cosine']:.4f}, "
            f"L0 {vm['l0']:.1f}, dead {vm['n_dead']}/{vm['n_atoms']}"
        )
    if settings.atoms is None:  # sized to the tokens
        n_tokens = trained.dictionary.meta.n_tokens or 0
        per = " per view" if views else ""
        atoms = trained.dictionary.meta.train.atoms
        con.say(f"{atoms} atoms{per}: {settings.atoms_for(n_tokens)[1]}")
    chosen = trained.dictionary.meta.steps_chosen
    if chosen:  # "196 steps: 50 passes over 4000 tokens ..." (or that --steps chose)
        con.say(chosen)
    within = trained.dictionary.meta.within_chosen
    if within:  # "whitening: covariance within cell_type: the controls hold 3 values ..."
        con.say(f"whitening: {within}")
    check = check_words(m)
    if check:  # how far the whitening overfits its controls
        con.say(check[0])
        if check[1]:
            con.warn(check[1])
    con.result(
        dictionary=Path(trained.path).resolve(),
        method=settings.method,
        unit=settings.unit,
        atoms=trained.dictionary.n_atoms,
        levels=levels,
        views=list(views) or None,
        steps=trained.result.steps_done,
        train_seconds=round(trained.result.seconds, 3),
        whitened=whiten is not None,
        nonfinite_dropped=dropped or 0,
        steps_chosen=chosen,
        whiten_within=None if whiten is None else trained.dictionary.meta.whitening.within,
        within_chosen=within,
        metrics=m,
    )
    return 0
