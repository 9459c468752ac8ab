"""``embed``: a plate's sites into an activation store, on this machine or on a Dask cluster."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .common import (
    UsageError,
    add_plate_options,
    at_least,
    check_threads,
    command,
    open_plate_from_args,
)
from .output import (
    Console,
)
from .segment import say_quality


def add_embed(sub) -> None:
    from ..embed.plate import EMBED_SEGMENT_FIELDS, EmbedSettings
    from ..settings import SegmentSettings, add_arguments, describe

    p = command(
        sub,
        "embed",
        "run a foundation model on a plate and keep one block's tokens in an activation store",
        [
            "concept-discovery embed plates/ --out store.zarr",
            "concept-discovery embed plates/ --model openphenom --block 8 --out store.zarr",
            "concept-discovery embed plate1/ plate2/ --workers 4 --out stores/",
        ],
        description=(
            "Tile every site into 256x256 tiles, run the model up to --block, and store patch "
            "grids, crop tokens, per-cell tokens and the cell labels they were pooled over "
            "(zarr). A store whose signature (image and label bytes, model, block, settings, "
            "version) matches is reused; a stale one is rebuilt; an interrupted one resumes. "
            "Sites without label files are segmented with --nuclear, --segmenter and "
            "--cellpose-model; for every other segmentation setting run `concept-discovery "
            "segment` first, and embedding uses its labels."
        ),
    )
    p.add_argument(
        "plate",
        nargs="+",
        help="plate folder; with several, --out is a folder with one store per plate "
        "(<out>/<plate folder name>.zarr)",
    )
    p.add_argument("--out", required=True, help="activation store folder")
    add_arguments(p, EmbedSettings)
    others = [d["name"] for d in describe(SegmentSettings) if d["name"] not in EMBED_SEGMENT_FIELDS]
    add_arguments(p, SegmentSettings, exclude=others)
    add_plate_options(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store of another plate, model, block or settings at --out (the old "
        "one stays whole until the new one is complete)",
    )
    add_cluster_options(p, "embed", "one model load each")
    p.add_argument("--sites-per-task", type=int, default=4, help="sites per Dask task")
    p.set_defaults(func=run_embed)


def embed_settings(args):
    """``EmbedSettings`` from parsed options, the segmentation ones nested in ``segment``."""
    from ..embed.plate import EMBED_SEGMENT_FIELDS, EmbedSettings
    from ..settings import SegmentSettings, from_args

    given = {k: getattr(args, k) for k in EMBED_SEGMENT_FIELDS if hasattr(args, k)}
    return from_args(EmbedSettings, args, segment=SegmentSettings(**given))


def add_cluster_options(p, verb: str, note: str) -> None:
    """--workers and --scheduler, the same for every step that runs on a Dask cluster."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"{verb} on a local Dask cluster of N worker processes, {note} (needs the "
        "[dask] extra)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help=f"{verb} on the Dask cluster at this address (tcp://host:8786); the workers "
        "must see the same files at the same paths",
    )


@contextmanager
def cluster_client(args):
    """A Dask client for --workers/--scheduler (None when neither is given), closed after."""
    if args.workers is not None and args.scheduler is not None:
        raise UsageError(
            "give --workers (a local cluster) or --scheduler (a running one), not both"
        )
    at_least(args.workers, "--workers")
    if not (args.workers or args.scheduler):
        yield None
        return
    from ..embed.cluster import connect

    client = connect(args.workers, args.scheduler)
    try:
        yield client
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and args.scheduler is None:
            cluster.close()


def run_embed_cluster(args, settings, con: Console) -> int:
    from ..embed.cluster import embed_plate_on_cluster

    plates = list(args.plate)
    outs = [Path(args.out)]
    if len(plates) > 1:
        outs = [Path(args.out) / f"{Path(p).resolve().name}.zarr" for p in plates]
        if len({o.name for o in outs}) < len(outs):
            raise UsageError("several plate folders share a name; embed them one by one")
    at_least(args.sites_per_task, "--sites-per-task")
    from ..embed.plate import load_embed_model

    stores = []
    with cluster_client(args) as client:
        backend = load_embed_model(settings)  # once, for every plate
        con.note(
            f"{backend.model_id} on {backend.device} at "
            f"{said_precision(settings.precision, backend.device)}; {len(plates)} plate(s)"
        )
        for folder, out in zip(plates, outs, strict=True):
            args.plate = folder
            plate = open_plate_from_args(args)
            with con.bar(len(plate), f"embed {Path(folder).name}") as step:
                if client is None:
                    from ..embed.plate import embed_plate

                    store = embed_plate(
                        plate,
                        settings,
                        out,
                        backend=backend,
                        progress=step,
                        overwrite=args.overwrite,
                    )
                else:
                    store = embed_plate_on_cluster(
                        plate,
                        settings,
                        out,
                        client,
                        sites_per_task=args.sites_per_task,
                        progress=step,
                        overwrite=args.overwrite,
                        backend=backend,
                    )
            counts = store.attrs.get("counts", {})
            con.say(
                f"{store.path}: {counts.get('cell', 0)} cells, {counts.get('patch', 0)} patches, "
                f"embedded at {store.precision}"
            )
            say_quality(con, store.quality(), len(plate))
            stores.append(store_summary(store, folder, len(plate)))
    con.result(model=backend.model_id, stores=stores)
    return 0


def said_precision(precision: str, device) -> str:
    """The precision a run uses, with why where ``auto`` chose it: "bf16 (auto: this CPU has
    native bf16)"."""
    from ..embed.compute import auto_precision_reason, resolve_precision

    used = resolve_precision(precision, device)
    return used + (f" (auto: {auto_precision_reason(device)})" if precision == "auto" else "")


def run_embed(args, con: Console) -> int:
    import torch

    from .._files import check_output
    from ..embed.plate import embed_plate, load_embed_model
    from ..embed.store import check_store_folder

    check_threads(args.threads)
    if len(args.plate) > 1 or args.workers or args.scheduler:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_embed_cluster(args, embed_settings(args), con)
    args.plate = args.plate[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = embed_settings(args)
    check_store_folder(check_output(args.out, folder=True, what="activation store"))
    plate = open_plate_from_args(args)
    backend = load_embed_model(settings)
    block = backend.resolve_block(settings.block)
    con.note(
        f"{backend.model_id} (D={backend.embed_dim}, {backend.num_blocks} blocks) block {block} "
        f"on {backend.device} at {said_precision(settings.precision, backend.device)}; "
        f"{len(plate)} sites"
    )
    with con.bar(len(plate), "embed sites") as bar:
        store = embed_plate(
            plate, settings, args.out, backend=backend, progress=bar, overwrite=args.overwrite
        )
    counts = store.attrs.get("counts", {})
    con.say(
        f"{store.path}: {counts.get('cell', 0)} cells, {counts.get('patch', 0)} patches, "
        f"{counts.get('crop', 0)} crops, embedded at {store.precision}"
        + (" (reused: signature matches)" if store.reused else "")
    )
    con.say(size_line(store))
    say_quality(con, store.quality(), len(plate))
    con.result(
        model=backend.model_id,
        block=block,
        device=str(backend.device),
        precision=store.precision,
        store=Path(store.path).resolve(),
        stores=[store_summary(store, plate.root, len(plate))],
    )
    return 0


def store_summary(store, plate, sites: int) -> dict:
    """What one store holds, for the JSON summary of embed."""
    counts = store.attrs.get("counts", {})
    return {
        "path": Path(store.path).resolve(),
        "plate": Path(plate).resolve(),
        "sites": sites,
        "cells": counts.get("cell", 0),
        "patches": counts.get("patch", 0),
        "crops": counts.get("crop", 0),
        "reused": bool(getattr(store, "reused", False)),
        "bytes": store.nbytes()["total"],
    }


def size_line(store) -> str:
    """Store size per site, and what the per-channel tokens cost of it."""
    sizes = store.nbytes()
    n = max(1, len(store.sites()))
    forms = (
        f"per-channel tokens kept ({store.token_groups} x {store.embed_dim}, float16)"
        if store.has_channel_tokens
        else "channel mean only"
    )
    mb = 1e6
    return (
        f"store size {sizes['total'] / mb:.1f} MB, {sizes['total'] / n / mb:.2f} MB per site "
        f"(patches {sizes['patch'] / n / mb:.2f}, cells {sizes['cell'] / n / mb:.2f}, crops "
        f"{sizes['crop'] / n / mb:.2f}, labels {sizes['labels'] / n / mb:.2f}); {forms}"
    )
