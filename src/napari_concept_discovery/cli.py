"""Headless command line: the same steps as the widgets, one subcommand per step.

Each ``_add_<step>`` function registers one subcommand and its ``_run_<step>`` handler; the
handler only parses arguments and calls the library, so the CLI and the GUI share one code path.
Imports of heavy modules (torch, napari) happen inside the handlers to keep ``--help`` fast.
Where output goes (``--quiet``, ``--json``, progress bars, exit codes) is decided in
``_cli_output``, once for every subcommand; see docs/architecture.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from ._cli_output import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    Console,
    HelpFormatter,
    examples,
)
from .errors import ConceptDiscoveryError


class UsageError(ConceptDiscoveryError):
    """Command-line options that contradict each other or are out of range."""


def _at_least(value, name: str, low: int = 1) -> None:
    if value is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")


def _check_threads(value: int | None) -> None:
    """--threads at least 1 and at most a few per CPU: each thread takes a stack, and tens of
    thousands of them leave no memory to load anything (it surfaced as unreadable images)."""
    _at_least(value, "--threads")
    most = max(64, 4 * (os.cpu_count() or 1))
    if value is not None and value > most:
        raise UsageError(
            f"--threads must be at most {most} (4 per CPU, this machine has "
            f"{os.cpu_count()}), got {value}"
        )


def _human_bytes(n: float) -> str:
    from ._files import human_bytes

    return human_bytes(n)


def _physical_memory() -> int | None:
    from ._files import physical_memory

    return physical_memory()


def _check_synth_args(args, workers: int = 1) -> None:
    """Plate counts and site size a synthetic plate set can have, and the memory it takes."""
    from .synth.plate import MAX_WELLS, PEAK_BYTES_PER_PIXEL, memory_needed

    for name in ("plates", "wells", "sites"):
        _at_least(getattr(args, name), f"--{name}")
    if args.wells > MAX_WELLS:
        raise UsageError(
            f"--wells must be at most {MAX_WELLS} (rows B..O x 22 columns), got {args.wells}"
        )
    _at_least(args.size, "--size", 64)
    need, have = memory_needed(args.size, workers), _physical_memory()
    if have is not None and need > have:
        most = int((have / PEAK_BYTES_PER_PIXEL / max(1, workers)) ** 0.5)
        raise UsageError(
            f"--size {args.size} would need about {_human_bytes(need)} of memory to draw "
            f"{workers} site(s) at once; this machine has {_human_bytes(have)}. Use --size "
            f"{most} or less"
        )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings about the user's data as one ``warning:`` line; others as Python shows them."""
    from .errors import DataWarning

    out = file if file is not None else sys.stderr
    if issubclass(category, DataWarning):
        out.write(f"warning: {message}\n")
    else:
        out.write(warnings.formatwarning(message, category, filename, lineno, line))


def _global_options(sub: bool) -> argparse.ArgumentParser:
    """--quiet, --json and --debug, accepted before the command and after it.

    The copy on each subcommand defaults to SUPPRESS, so an option given before the command is
    not reset by the subcommand's parser.
    """
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if sub else False
    g = p.add_argument_group("output options (before or after the command)")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars and no result lines; warnings and errors still go to stderr",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print one JSON object on stdout at the end (what was made: paths, counts, "
        "timings, metrics); result lines go to stderr and progress bars are off",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an unexpected error (exit code 1)",
    )
    return p


def _command(sub, name: str, help: str, example_lines, *, description=None, note: str = ""):
    """A subcommand's parser: the global options and runnable examples under its --help."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=examples(*example_lines, note=note),
        formatter_class=HelpFormatter,
        parents=[_global_options(sub=True)],
    )


def _add_plate_options(p) -> None:
    """How to read the plate folder: the same options for every subcommand that opens one."""
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "rxrx", "phenix", "jump", "tiff-csv", "pattern", "ome-zarr"],
        help="folder layout (default: detect it)",
    )
    p.add_argument(
        "--pattern",
        help="filename pattern with named fields, e.g. '{well}_01_{channel_index}_{site}_{channel}_001.tif'",
    )
    p.add_argument("--metadata", help="metadata table (csv/tsv/parquet) joined by plate/well/site")
    p.add_argument("--channel-names", help="comma-separated channel names in channel order")


def _open_plate(args, **kwargs):
    from .plate import open_plate

    names = args.channel_names.split(",") if args.channel_names else None
    return open_plate(
        args.plate,
        layout=args.layout,
        pattern=args.pattern,
        metadata=args.metadata,
        channel_names=names,
        labels=getattr(args, "labels", None),
        **kwargs,
    )


def _labels_help() -> str:
    """The --labels help of EmbedSettings, so info and embed describe the option alike."""
    from .plate_embedding import EmbedSettings
    from .settings import describe

    return next(d["help"] for d in describe(EmbedSettings) if d["name"] == "labels")


# --- synth (issue: package, plates, synthetic data) ----------------------------------------


def _add_synth(sub) -> None:
    p = _command(
        sub,
        "synth",
        "write synthetic Cell Painting plates (RxRx layout) with labels and per-cell truth",
        [
            "concept-discovery synth plates/ --plates 2 --wells 24 --sites 2",
            "concept-discovery synth small/ --plates 1 --wells 6 --size 256 --json",
        ],
        note="The plates carry cell and nucleus label images, metadata.csv and truth.csv (one "
        "row per cell); `concept-discovery embed plates/ --out store.zarr` comes next.",
    )
    p.add_argument("out", help="output folder (created; the plates' files in it are overwritten)")
    p.add_argument("--plates", type=int, default=2, help="number of plates (default 2)")
    p.add_argument("--wells", type=int, default=24, help="wells per plate (default 24)")
    p.add_argument("--sites", type=int, default=2, help="sites per well (default 2)")
    p.add_argument("--size", type=int, default=512, help="site width and height in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same plates)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: up to 4 CPUs)"
    )
    p.set_defaults(func=_run_synth)


def _run_synth(args, con: Console) -> int:
    from ._files import check_output
    from .synth import write_synthetic_plates
    from .synth.plate import EXPERIMENT

    _at_least(args.workers, "--workers")
    total = args.plates * args.wells * args.sites
    workers = args.workers or min(max(total, 1), os.cpu_count() or 1, 4)
    _check_synth_args(args, workers)
    check_output(args.out, folder=True, what="output folder")
    with con.bar(total, "synth sites") as bar:
        out = write_synthetic_plates(
            args.out,
            n_plates=args.plates,
            n_wells=args.wells,
            n_sites=args.sites,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            progress=bar.update,
        )
    out = Path(out).resolve()
    con.say(f"wrote {total} sites to {out}")
    con.result(
        out=out,
        plates=[out / "images" / EXPERIMENT / f"Plate{i}" for i in range(1, args.plates + 1)],
        n_plates=args.plates,
        wells_per_plate=args.wells,
        sites_per_well=args.sites,
        sites=total,
        size=args.size,
        seed=args.seed,
        metadata=out / "metadata.csv",
        truth=out / "truth.csv",
    )
    return 0


# --- segment -------------------------------------------------------------------------------


def _add_segment(sub) -> None:
    from .settings import SegmentSettings, add_arguments

    p = _command(
        sub,
        "segment",
        "segment nuclei and cells of every site of a plate into a label folder",
        [
            "concept-discovery segment plates/ --out labels/",
            "concept-discovery embed plates/ --labels labels/ --out store.zarr",
        ],
        description=(
            "Write <plate>/<well>_s<site>_cells.tif and _nuclei.tif per site. The default "
            "folder, <plate folder>/segmentation, is found by info and embed by themselves; "
            "give any other folder to them with --labels. The classical segmenter is "
            "CellProfiler's: nuclei from a per-image threshold, cells grown from them by "
            "Propagation through a per-image foreground; to reproduce a CellProfiler pipeline, "
            "give the same channel (--cell), threshold (--cell-threshold, --cell-log) and "
            "correction factor."
        ),
    )
    p.add_argument("plate", help="plate folder (any layout that 'info' understands)")
    p.add_argument(
        "--out", default=None, help="label folder (default: <plate folder>/segmentation)"
    )
    _add_plate_options(p)
    add_arguments(p, SegmentSettings)
    p.set_defaults(func=_run_segment)


def _say_quality(con: Console, qc, sites: int, where: str = "the store's quality table") -> int:
    """Print a segmentation quality table's summary and flagged sites; warn (even under
    --quiet) when sites are flagged. Returns the number flagged."""
    from .segment_qc import summary

    for line in summary(qc):
        con.say(line)
    flagged = int(qc["flag"].sum()) if qc is not None and len(qc) else 0
    if flagged:  # said even under --quiet: the cells of these sites are likely wrong
        con.warn(
            f"{flagged} of {sites} site(s) flagged by segmentation quality control; see {where}"
        )
    return flagged


def _run_segment(args, con: Console) -> int:
    from .segment import segment_plate
    from .settings import SegmentSettings, from_args

    settings = from_args(SegmentSettings, args)
    plate = _open_plate(args)
    from .segment_qc import QC_FILE, read_qc

    with con.bar(len(plate), "segment sites") as bar:
        out = segment_plate(plate, args.out, settings=settings, progress=bar)
    con.say(f"wrote labels of {len(plate)} sites to {out}")
    flagged = _say_quality(con, read_qc(out), len(plate), str(Path(out) / QC_FILE))
    con.result(
        out=Path(out).resolve(),
        plate=plate.root,
        sites=len(plate),
        settings=settings.to_dict(),
        qc=str(Path(out) / QC_FILE),
        flagged=flagged,
    )
    return 0


# --- info: describe a plate folder ---------------------------------------------------------


def _add_info(sub) -> None:
    p = _command(
        sub,
        "info",
        "describe a plate folder (layout, plates, wells, sites, channels, metadata, problems) "
        "or an activation store (its plate, model, tokens and segmentation quality)",
        [
            "concept-discovery info plates/",
            "concept-discovery info plates/ --check --json",
            "concept-discovery info screen/ --pattern '{well}_{site}_{channel}.tif' "
            "--metadata platemap.csv",
        ],
    )
    p.add_argument(
        "plate",
        help="plate folder (RxRx, Phenix/JUMP, per-site TIFF, or --pattern), or a store (.zarr)",
    )
    _add_plate_options(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="read every file header and decode every site's pixels, even on a big plate "
        "(without it: headers up to a few thousand files, pixels of the first site)",
    )
    p.add_argument("--labels", default=None, metavar="DIR", help=_labels_help())
    p.set_defaults(func=_run_info)


def _is_store(path) -> bool:
    """Whether ``path`` is an activation store (a plate folder, or anything else, is not)."""
    from .errors import StoreError
    from .store import check_store_folder

    if not Path(path).is_dir():
        return False
    try:
        return check_store_folder(path) is not None
    except StoreError:  # a folder that holds something else: a plate, for info
        return False


def _run_info(args, con: Console) -> int:
    from .errors import PlateError
    from .plate import PlateWarning
    from .plate.layouts import CHECK_LIMIT
    from .store import ActivationStore

    if _is_store(args.plate):
        store = ActivationStore.open(args.plate)  # a store, not a plate: describe it
        for line in store.describe():
            con.say(line)
        con.result(store=Path(args.plate).resolve(), sites=len(store.sites()))
        return 0

    with warnings.catch_warnings():
        # Printed below from plate.warnings, once and in order.
        warnings.simplefilter("ignore", PlateWarning)
        plate = _open_plate(args, check=True if args.check else None)
    # Headers can be whole while the pixels are not (a truncated PNG): decode to be sure.
    sites = list(plate) if args.check else list(plate)[:1]
    undecodable = []
    with con.bar(len(sites), "decode sites") as bar:
        for site in sites:
            try:
                site.check()
            except PlateError as exc:
                undecodable.append(str(exc))
            bar.update()
    problems = list(plate.warnings)
    if undecodable:
        problems.append(
            f"{len(undecodable)} of {len(sites)} decoded site(s) cannot be read: "
            + "; ".join(undecodable[:5])
            + (" ..." if len(undecodable) > 5 else "")
        )
    wells = plate.wells
    distinct = sorted({w for _, w in wells})
    shown = ", ".join(distinct[:12]) + (" ..." if len(distinct) > 12 else "")
    say = con.say
    say(f"folder:   {plate.root}")
    say(f"layout:   {plate.layout}")
    more = " ..." if len(plate.plates) > 6 else ""
    say(f"plates:   {len(plate.plates)} ({', '.join(plate.plates[:6])}{more})")
    say(f"wells:    {len(wells)} on all plates ({shown})")
    say(f"sites:    {len(plate)}")
    say(f"channels: {len(plate.channel_names)} ({', '.join(plate.channel_names)})")
    say(f"shape:    {plate.image_shape} (C, H, W)")
    say(f"dtype:    {plate.dtype}")
    if plate.metadata is None:
        say("metadata: none")
    else:
        cols = [str(c) for c in plate.metadata.columns]
        say(f"metadata: {len(plate.metadata)} rows; columns: {', '.join(cols)}")
    labelled = sum(site.labels_path is not None for site in plate)
    qc_lines: list[str] = []
    if labelled:
        from .segment_qc import read_qc, summary

        where = f" (label folder {plate.label_folder})" if plate.label_folder else ""
        say(f"labels:   {labelled} of {len(plate)} sites carry cell labels{where}")
        qc_lines = summary(read_qc(plate.label_folder))
        for line in qc_lines:
            say(line)
    if args.check:
        say(f"checked:  file headers, pixels and label files of all {len(plate)} sites")
    else:
        say(
            f"checked:  file headers (of every site when the folder holds up to {CHECK_LIMIT} "
            "files), pixels of the first site only (--check decodes every site)"
        )
    say(f"warnings: {len(problems)}")
    for message in problems:
        if con.quiet:
            con.warn(message)  # the problems are what info is for: said even under --quiet
        say(f"  - {message}")
    con.result(
        folder=Path(plate.root).resolve(),
        layout=plate.layout,
        plates=list(plate.plates),
        wells=len(wells),
        sites=len(plate),
        channels=list(plate.channel_names),
        shape=list(plate.image_shape),
        dtype=str(plate.dtype),
        metadata=None
        if plate.metadata is None
        else {"rows": len(plate.metadata), "columns": [str(c) for c in plate.metadata.columns]},
        labelled_sites=labelled,
        label_folder=plate.label_folder,
        quality=qc_lines,
        checked="all sites" if args.check else "first site",
        warnings=problems,
    )
    return 0


# --- embed (issue: foundation models and embedding) ----------------------------------------


def _add_embed(sub) -> None:
    from .plate_embedding import EmbedSettings
    from .settings import add_arguments

    p = _command(
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
            "version) matches is reused; a stale one is rebuilt; an interrupted one resumes."
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
    _add_plate_options(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store of another plate, model, block or settings at --out (the old "
        "one stays whole until the new one is complete)",
    )
    _add_cluster_options(p, "embed", "one model load each")
    p.add_argument("--sites-per-task", type=int, default=4, help="sites per Dask task")
    p.set_defaults(func=_run_embed)


def _add_cluster_options(p, verb: str, note: str) -> None:
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
def _cluster_client(args):
    """A Dask client for --workers/--scheduler (None when neither is given), closed after."""
    if args.workers is not None and args.scheduler is not None:
        raise UsageError(
            "give --workers (a local cluster) or --scheduler (a running one), not both"
        )
    _at_least(args.workers, "--workers")
    if not (args.workers or args.scheduler):
        yield None
        return
    from .cluster import connect

    client = connect(args.workers, args.scheduler)
    try:
        yield client
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and args.scheduler is None:
            cluster.close()


def _run_embed_cluster(args, settings, con: Console) -> int:
    from .cluster import embed_plate_on_cluster

    plates = list(args.plate)
    outs = [Path(args.out)]
    if len(plates) > 1:
        outs = [Path(args.out) / f"{Path(p).resolve().name}.zarr" for p in plates]
        if len({o.name for o in outs}) < len(outs):
            raise UsageError("several plate folders share a name; embed them one by one")
    _at_least(args.sites_per_task, "--sites-per-task")
    from .plate_embedding import load_embed_model

    stores = []
    with _cluster_client(args) as client:
        backend = load_embed_model(settings)  # once, for every plate
        for folder, out in zip(plates, outs, strict=True):
            args.plate = folder
            plate = _open_plate(args)
            with con.bar(len(plate), f"embed {Path(folder).name}") as step:
                if client is None:
                    from .plate_embedding import embed_plate

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
                f"{store.path}: {counts.get('cell', 0)} cells, {counts.get('patch', 0)} patches"
            )
            _say_quality(con, store.quality(), len(plate))
            stores.append(_store_summary(store, folder, len(plate)))
    con.result(model=backend.model_id, stores=stores)
    return 0


def _run_embed(args, con: Console) -> int:
    import torch

    from ._files import check_output
    from .embed import resolve_precision
    from .plate_embedding import EmbedSettings, embed_plate, load_embed_model
    from .settings import from_args
    from .store import check_store_folder

    _check_threads(args.threads)
    if len(args.plate) > 1 or args.workers or args.scheduler:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run_embed_cluster(args, from_args(EmbedSettings, args), con)
    args.plate = args.plate[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = from_args(EmbedSettings, args)
    check_store_folder(check_output(args.out, folder=True, what="activation store"))
    plate = _open_plate(args)
    backend = load_embed_model(settings)
    block = backend.resolve_block(settings.block)
    precision = resolve_precision(settings.precision, backend.device)
    con.note(
        f"{backend.model_id} (D={backend.embed_dim}, {backend.num_blocks} blocks) block {block} "
        f"on {backend.device} at {precision}"
        + (
            " (auto: native bf16 here)"
            if settings.precision == "auto" and precision == "bf16"
            else ""
        )
        + f"; {len(plate)} sites"
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
    con.say(_size_line(store))
    _say_quality(con, store.quality(), len(plate))
    con.result(
        model=backend.model_id,
        block=block,
        device=str(backend.device),
        precision=store.precision,
        store=Path(store.path).resolve(),
        stores=[_store_summary(store, plate.root, len(plate))],
    )
    return 0


def _store_summary(store, plate, sites: int) -> dict:
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


def _size_line(store) -> str:
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


# --- train / analyze (issue: dictionary learning core) -------------------------------------


def _add_train(sub) -> None:
    from .dictionary.settings import TrainSettings, WhitenSettings
    from .settings import add_arguments

    p = _command(
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
    p.set_defaults(func=_run_train)


def _run_train(args, con: Console) -> int:
    import torch

    from .dictionary.pipeline import check_dictionary_out, train_on_store
    from .dictionary.settings import TrainSettings, WhitenSettings
    from .settings import describe, from_args
    from .store import ActivationStore

    _check_threads(args.threads)
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
    dropped = trained.dictionary.meta.get("nonfinite_dropped")
    con.say(
        f"wrote {trained.path}: {settings.method}, M={settings.atoms}, "
        f"{trained.result.steps_done} steps, FVU {m['fvu']:.4f}, cosine {m['mean_cosine']:.4f}, "
        f"L0 {m['l0']:.1f}, dead {m['n_dead']}/{m['n_atoms']}"
        + (f"; left out {dropped} non-finite tokens" if dropped else "")
    )
    chosen = trained.dictionary.meta.get("steps_chosen")
    if chosen:  # "196 steps: 50 passes over 4000 tokens ..." (or that --steps chose)
        con.say(chosen)
    con.result(
        dictionary=Path(trained.path).resolve(),
        method=settings.method,
        unit=settings.unit,
        atoms=trained.dictionary.model.n_atoms,
        steps=trained.result.steps_done,
        train_seconds=round(trained.result.seconds, 3),
        whitened=whiten is not None,
        nonfinite_dropped=dropped or 0,
        steps_chosen=chosen,
        metrics=m,
    )
    return 0


def _add_analyze(sub) -> None:
    from .dictionary.settings import AnalyzeSettings
    from .settings import add_arguments

    p = _command(
        sub,
        "analyze",
        "encode a store with a dictionary; write feature table, selectivity and codes",
        [
            "concept-discovery analyze store.zarr dict.safetensors --out analysis/",
            "concept-discovery analyze store.zarr dict.safetensors --labels "
            "cell_type,perturbation --truth-file plates/truth.csv --truth mitotic --out analysis/",
        ],
        note="Writes features.parquet, selectivity, concept profiles and codes.h5ad (AnnData) "
        "into --out; `concept-discovery report` draws them.",
    )
    p.add_argument("store", help="activation store folder")
    p.add_argument(
        "dictionary", help="dictionary file (.safetensors) from `concept-discovery train`"
    )
    add_arguments(p, AnalyzeSettings)
    p.add_argument("--out", required=True, help="output folder")
    _add_cluster_options(p, "encode", "each encoding blocks of token rows")
    p.add_argument(
        "--rows-per-task",
        type=int,
        default=None,
        help="token rows per Dask task, rounded up to whole encode batches (default: about "
        "four tasks per worker)",
    )
    p.set_defaults(func=_run_analyze)


def _run_analyze(args, con: Console) -> int:
    from .concepts import check_analysis_folder
    from .dictionary.io import load_dictionary
    from .dictionary.pipeline import analyze_store
    from .dictionary.settings import AnalyzeSettings
    from .settings import from_args
    from .store import ActivationStore

    settings = from_args(AnalyzeSettings, args)
    check_analysis_folder(args.out)
    store = ActivationStore.open(args.store)
    dictionary = load_dictionary(args.dictionary)
    trained_on = dictionary.meta.get("unit")
    if settings.unit and trained_on and settings.unit != trained_on:
        # Accepted on purpose (same model, block and width; the viewer's maps do it), but said.
        con.note(
            f"note: {args.dictionary} was trained on {trained_on} tokens; encoding the store's "
            f"{settings.unit} tokens with it (--unit {settings.unit})"
        )
    _at_least(args.rows_per_task, "--rows-per-task")
    with (
        _cluster_client(args) as client,
        con.bars({"encode": "encode", "measure": "measure cells"}) as bars,
    ):
        if client is None:
            analysis = analyze_store(store, dictionary, settings, args.out, progress=bars)
        else:
            from .cluster import analyze_store_on_cluster

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
    con.result(
        out=Path(args.out).resolve(),
        files={k: Path(v).resolve() for k, v in analysis.paths.items()},
        tokens=codes.shape[0],
        features=codes.shape[1],
        l0=round(l0, 4),
        unit=settings.unit or trained_on,
    )
    return 0


# --- similar cells ----------------------------------------------------------------------------


def _add_similar(sub) -> None:
    p = _command(
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
    p.set_defaults(func=_run_similar)


def _run_similar(args, con: Console) -> int:
    from .cell_selection import similar_cells, write_cells_csv
    from .dictionary.io import load_dictionary
    from .explore import Explorer
    from .plate.model import SiteKey
    from .store import ActivationStore

    _at_least(args.top, "--top")
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


# --- convert (issue 10: OME-Zarr plates) ----------------------------------------------------


def _add_convert(sub) -> None:
    from .convert import NGFF_VERSIONS

    p = _command(
        sub,
        "convert",
        "write a plate folder of any layout as OME-Zarr HCS plates",
        [
            "concept-discovery convert plates/ --out plates-zarr/",
            "concept-discovery convert plates/ --out plates-zarr-v04/ --ngff 0.4",
            "concept-discovery info plates-zarr/",
        ],
        description=(
            "Write one OME-Zarr (NGFF) plate per plate of PLATE into --out: wells with their "
            "sites as fields, channel names, the cell and nucleus labels the plate carries as "
            "label images, and the metadata as --out/metadata.csv, which every command reads "
            "with the plates (concept-discovery info OUT). The folder appears "
            "only when complete."
        ),
    )
    p.add_argument("plate", help="plate folder (any layout `info` reads)")
    p.add_argument("--out", required=True, help="folder for the OME-Zarr plates")
    p.add_argument(
        "--ngff",
        default="0.5",
        choices=NGFF_VERSIONS,
        help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2, for older tools) (default: 0.5)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_plate_options(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args, con: Console) -> int:
    from ._files import check_output
    from .convert import check_convert_out, convert_plate

    check_output(args.out, folder=True, what="OME-Zarr output folder")
    plate = _open_plate(args)
    check_convert_out(plate, args.out)
    with con.bar(len(plate), "convert sites") as bar:
        written = convert_plate(
            plate, args.out, ngff=args.ngff, overwrite=args.overwrite, progress=bar
        )
    con.say(
        f"wrote {len(plate)} sites as {len(written)} OME-Zarr plate(s) in {args.out}: "
        + ", ".join(w.name for w in written)
    )
    con.result(
        out=Path(args.out).resolve(),
        plates=[Path(w).resolve() for w in written],
        sites=len(plate),
        ngff=args.ngff,
    )
    return 0


# --- report (issue 10: headless discovery for a whole screen) ------------------------------


def _add_report(sub) -> None:
    from .report import ReportSettings
    from .settings import add_arguments

    p = _command(
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
    p.set_defaults(func=_run_report)


def _run_report(args, con: Console) -> int:
    from .report import ReportSettings, check_report_folder, write_report
    from .settings import from_args
    from .store import ActivationStore

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


# --- demo: every step on synthetic plates, offline ------------------------------------------


def _add_demo(sub) -> None:
    from .dictionary.settings import METHOD_NAMES

    p = _command(
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
    p.add_argument("--plates", type=int, default=2, help="number of synthetic plates")
    p.add_argument("--wells", type=int, default=16, help="wells per plate")
    p.add_argument("--sites", type=int, default=1, help="sites per well")
    p.add_argument("--size", type=int, default=512, help="site size in pixels")
    p.add_argument("--method", choices=METHOD_NAMES, default="icfl")
    p.add_argument("--atoms", type=int, default=64, help="dictionary size M")
    p.add_argument("--sparsity", type=int, default=8, help="non-zeros per token")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="model source (default: the bundled model)")
    p.set_defaults(func=_run_demo)


def _run_demo(args, con: Console) -> int:
    from ._files import check_output
    from .demo import format_report, run_demo
    from .dictionary.settings import TrainSettings

    _check_synth_args(args)
    for name in ("atoms", "sparsity", "steps"):
        _at_least(getattr(args, name), f"--{name}")
    # Refused now, not after the plates are drawn and embedded (the demo trains these).
    TrainSettings(method=args.method, atoms=args.atoms, sparsity=args.sparsity, steps=args.steps)
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

    result = run_demo(
        args.out,
        n_plates=args.plates,
        n_wells=args.wells,
        n_sites=args.sites,
        size=args.size,
        method=args.method,
        n_atoms=args.atoms,
        sparsity=args.sparsity,
        steps=args.steps,
        seed=args.seed,
        model=args.model,
        log=log,
        progress=bars,
    )
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


# --- models (issue 7: one model registry) -------------------------------------------------


def _add_models(sub) -> None:
    p = _command(
        sub,
        "models",
        "list the models embed --model can use and whether each loads offline",
        ["concept-discovery models", "concept-discovery models --json"],
        description=(
            "List the bundled model, OpenPhenom and the ViTs in the local Hugging Face cache, "
            "with the source string to pass as --model, then every accepted source form. "
            "Never uses the network."
        ),
    )
    p.set_defaults(func=_run_models)


def _run_models(args, con: Console) -> int:
    from .models import list_models, source_forms_text

    infos = list_models()
    width = max(len(i.source) for i in infos)
    con.say(f"{'SOURCE':<{width}}  OFFLINE  DESCRIPTION")
    for i in infos:
        con.say(
            f"{i.source:<{width}}  {'yes' if i.available else 'no':<7}  {i.name}: {i.description}"
        )
    con.say("\nAccepted --model forms:\n" + source_forms_text())
    con.result(
        models=[
            {
                "source": i.source,
                "name": i.name,
                "offline": bool(i.available),
                "description": i.description,
            }
            for i in infos
        ]
    )
    return 0


# --- view: in-viewer concept discovery -----------------------------------------------------


def _add_view(sub) -> None:
    p = _command(
        sub,
        "view",
        "open napari with a plate, its activation store and dictionary, and the widgets",
        [
            "concept-discovery view demo-out/",
            "concept-discovery view plates/ --store store.zarr --dictionary dict.safetensors",
        ],
        description=(
            "Open the plate's first site in napari with the plate navigator, concept explorer, "
            "embed and dictionary widgets docked. On the output folder of `concept-discovery "
            "demo` the plates, store and dictionary are found by themselves; for a plate folder, "
            "a single store beside it (as the Embed widget names them) is used."
        ),
    )
    p.add_argument(
        "plate", nargs="?", default=".", help="plate folder or demo output folder (default: .)"
    )
    p.add_argument("--store", help="activation store folder (.zarr)")
    p.add_argument("--dictionary", help="dictionary file (.safetensors), applied to the store")
    p.set_defaults(func=_run_view)


def _run_view(args, con: Console) -> int:
    from .workspace import find_view_inputs

    inputs = find_view_inputs(args.plate, args.store, args.dictionary)
    if inputs.dictionary is not None and inputs.store is None:
        raise UsageError("--dictionary needs an activation store (--store) to apply it to")
    import napari

    from .widgets import open_viewer
    from .widgets._drive import scripted_user

    opened = open_viewer(inputs.plate, inputs.store, inputs.dictionary)
    user = scripted_user(opened)  # tests only: a scripted user acting in the real process
    con.note(
        f"plate {inputs.plate}"
        + (f", store {inputs.store}" if inputs.store else ", no store yet (Embed widget)")
        + (f", dictionary {inputs.dictionary}" if inputs.dictionary else "")
    )
    con.result(plate=inputs.plate, store=inputs.store, dictionary=inputs.dictionary)
    napari.run()
    return 0 if user is None else user.exit_code or 0


# --- entry point ---------------------------------------------------------------------------


STORY = (
    "concept-discovery synth plates/ --plates 2 --wells 24",
    "concept-discovery embed plates/ --out store.zarr",
    "concept-discovery train store.zarr --atoms 256 --out dict.safetensors",
    "concept-discovery analyze store.zarr dict.safetensors --out analysis/",
    "concept-discovery report store.zarr dict.safetensors --out report/",
)


def _top_epilog() -> str:
    codes = "\n".join(
        textwrap.fill(text, 78, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
        for code, text in EXIT_CODES.items()
    )
    return (
        examples(*STORY, "concept-discovery demo demo-out/ --json")
        + "\n\nEvery command takes -q/--quiet, --json and --debug, before or after its name; "
        "`concept-discovery COMMAND --help` shows its options and examples. With --json, "
        "stdout holds one JSON object (command, ok, exit_code, elapsed_s, error on failure, "
        "and what the command made) and everything else goes to stderr."
        + "\n\nexit codes:\n"
        + codes
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-discovery",
        description="Discover biological concepts in microscopy foundation models.",
        epilog=_top_epilog(),
        formatter_class=HelpFormatter,
        parents=[_global_options(sub=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_demo,
        _add_synth,
        _add_info,
        _add_segment,
        _add_embed,
        _add_train,
        _add_analyze,
        _add_similar,
        _add_convert,
        _add_report,
        _add_models,
        _add_view,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see EXIT_CODES and the README)."""
    args = build_parser().parse_args(argv)
    con = Console(args.command, quiet=args.quiet, json=args.json)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = int(args.func(args, con) or 0)
        except ConceptDiscoveryError as exc:
            con.error(str(exc))
            return con.finish(EXIT_REFUSED, str(exc))
        except KeyboardInterrupt as exc:
            said = f"interrupted: {exc}" if str(exc) else "interrupted"
            print(said, file=sys.stderr, flush=True)
            return con.finish(EXIT_INTERRUPTED, said)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return _failed(args, con, exc)
            where = f" ({exc.filename})" if exc.filename else ""
            out = f" writing {args.out}" if getattr(args, "out", None) else ""
            message = f"the disk is full{out}: {exc.strerror or exc}{where}"
            if args.debug:
                traceback.print_exc()
            con.error(message)
            return con.finish(EXIT_FAILED, message)
        except Exception as exc:
            return _failed(args, con, exc)
    return con.finish(code)


def _failed(args, con: Console, exc: Exception) -> int:
    """An unexpected error: one line (the traceback with --debug), exit 1."""
    message = f"{type(exc).__name__}: {exc}"
    if args.debug:
        traceback.print_exc()
        con.error(message)
    else:
        con.error(f"{message} (rerun with --debug to see the traceback)")
    return con.finish(EXIT_FAILED, message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
