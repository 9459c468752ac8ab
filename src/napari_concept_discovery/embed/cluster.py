"""Embedding on a Dask cluster: sites as tasks, and the client side every cluster step shares.

The client opens the store (``StoreWriter.begin``: which sites are still to do) and gathers the
parts at the end (``finish``), exactly as :func:`~.plate.embed_plate` does, holding the store's
lock throughout; in between, each task embeds a few sites on a worker and writes each as a part
folder swapped into place whole, so a task that fails or a worker that dies leaves nothing
half-written and its sites are simply run again (``retries`` for errors, the scheduler's
``allowed-failures`` for dead workers), and a run stopped altogether resumes like any store.
Each worker process loads the model once and keeps it for every task it runs.

The store encoder's executor (``analysis.cluster``) uses :func:`connect` and the gathering here.
Anything the library refuses on a worker comes back as that refusal, without retries.
``distributed`` is an optional dependency (``pip install napari-concept-discovery[dask]``); see
docs/architecture.md, "Beyond one machine".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConceptDiscoveryError, StoreError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report
from .plate import (
    EmbedSettings,
    _as_plate,
    check_finite,
    load_embed_model,
    plate_inputs,
    read_sites,
    store_writer,
)

#: Models loaded in this (worker) process, by the settings that load them.
_MODELS: dict[str, object] = {}


def _worker_backend(settings: EmbedSettings):
    key = json.dumps({"model": settings.model, "device": getattr(settings, "device", None)})
    if key not in _MODELS:
        _MODELS[key] = load_embed_model(settings)
    return _MODELS[key]


def _writer(plate, settings: EmbedSettings, out, backend, overwrite: bool = False):
    inputs = plate_inputs(plate, settings)
    writer, embedder = store_writer(plate, settings, out, backend, inputs, overwrite)
    return writer, embedder, inputs


def _hold(obj):
    """A task whose result is ``obj``: what the other tasks take it from. Unlike scattered
    data, a task's result that is lost with a dead worker is computed again elsewhere."""
    return obj


def embed_sites_task(plate, settings: dict, out: str, keys: list, root: str | None = None):
    """Run on a worker: embed ``keys`` of ``plate`` and write each as a part of the store.

    ``root`` is where the client's writer builds the store (``out``, or the folder beside it
    that replaces it). Returns the keys, or the library's refusal (not raised: retrying a
    refusal gives the same refusal).
    """
    settings = EmbedSettings.from_dict(settings)
    backend = _worker_backend(settings)
    writer, embedder, inputs = _writer(plate, settings, out, backend)
    writer.root = Path(root or out)
    try:
        for st in embedder.iter_sites(read_sites(plate, keys, inputs, prefetch=False)):
            check_finite(st, backend)
            writer.write_site(st)
    except ConceptDiscoveryError as exc:
        return exc
    return keys


def connect(workers: int | None = None, scheduler: str | None = None, threads: int = 1):
    """A ``distributed.Client``: to ``scheduler`` (an address), else a local cluster of
    ``workers`` processes with ``threads`` threads each."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConceptDiscoveryError(
            "running on a Dask cluster needs the 'distributed' package: "
            "pip install 'napari-concept-discovery[dask]'"
        ) from None
    if scheduler:
        return Client(scheduler)
    if not workers or workers < 1:
        raise ConceptDiscoveryError(f"workers must be at least 1, got {workers}")
    cluster = LocalCluster(
        n_workers=int(workers),
        threads_per_worker=int(threads),
        processes=True,
        dashboard_address=None,
    )
    return Client(cluster)


def _gather(client, futures, labels, on_result, cancel: Cancel, what: str) -> None:
    """Wait for ``futures`` as they complete, handing each result (in completion order, with
    its index) to ``on_result``; a refusal returned by a task is raised, a task that failed
    or whose workers died is named. Everything still running is cancelled on the way out."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for fut in as_completed(futures):
            if is_cancelled(cancel):
                raise Cancelled(f"{what} cancelled")
            i = index[fut.key]
            try:
                result = fut.result()
            except KilledWorker as exc:
                raise ConceptDiscoveryError(
                    f"{what}: the workers running {labels[i]} died (killed, or out of memory) "
                    f"every time it was tried: {exc}"
                ) from exc
            except ConceptDiscoveryError:
                raise
            except Exception as exc:
                raise ConceptDiscoveryError(
                    f"{what}: {labels[i]} failed on the cluster: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(result, ConceptDiscoveryError):
                raise result
            on_result(i, result)
    finally:
        client.cancel([f for f in futures if not f.done()])


def embed_plate_on_cluster(
    plate,
    settings: EmbedSettings | None,
    out: str | os.PathLike,
    client,
    *,
    sites_per_task: int = 4,
    retries: int = 2,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    overwrite: bool = False,
    backend=None,
):
    """:func:`~.plate_embedding.embed_plate` with the sites embedded by ``client``'s workers.

    Returns the store (``store.reused`` when its signature matched), or None when cancelled.
    The client loads the model too (or takes ``backend``, loaded already from
    ``settings.model``), to sign the store as the workers will, and holds the store's lock. A run that fails (a refusal, a site whose workers keep dying) leaves the
    store unfinished, with the sites finished so far kept as parts: nothing half-written, and
    the next run resumes from them.
    """
    from .._files import check_output
    from .._lock import write_lock
    from .store import check_store_folder

    settings = settings if settings is not None else EmbedSettings()
    if sites_per_task < 1:
        raise ConceptDiscoveryError(f"sites_per_task must be at least 1, got {sites_per_task}")
    out = check_output(out, folder=True, what="activation store")
    check_store_folder(out)
    plate = _as_plate(plate, settings.labels)
    backend = backend if backend is not None else load_embed_model(settings)
    from .compute import resolve_precision

    # "auto" resolved once, here: every worker embeds at the precision the store is signed with
    # (a worker without native bf16 refuses it by name rather than mixing precisions)
    settings = settings.replace(precision=resolve_precision(settings.precision, backend.device))
    with write_lock(out, what="store", error=StoreError):
        writer, _, _ = _writer(plate, settings, out, backend, overwrite)
        todo = writer.begin()
        total = len(plate)
        done = total - len(todo)
        report(progress, "embed", done, total)
        if todo:
            remote = client.submit(_hold, plate, pure=False)
            payload = settings.to_dict()
            chunks = [todo[i : i + sites_per_task] for i in range(0, len(todo), sites_per_task)]
            futures = [
                client.submit(
                    embed_sites_task,
                    remote,
                    payload,
                    str(out),
                    chunk,
                    str(writer.root),
                    retries=retries,
                    pure=False,
                )
                for chunk in chunks
            ]
            labels = [f"sites {', '.join(map(str, c))}" for c in chunks]

            def finished(i: int, keys: list) -> None:
                nonlocal done
                done += len(keys)
                report(progress, "embed", done, total, site=str(keys[-1]))

            try:
                _gather(client, futures, labels, finished, cancel, f"embedding {out}")
            except Cancelled:
                return None
            except ConceptDiscoveryError as exc:
                raise type(exc)(
                    f"{exc}. The store at {out} is left unfinished, with the sites done so far "
                    "kept; run again to resume"
                ) from exc
        store = writer.finish()
        store.reused = writer.reused
        return store


def embed_plates_on_cluster(
    plates: Sequence,
    settings: EmbedSettings | None,
    outs: Sequence,
    client,
    **kw,
) -> list:
    """Several plates, one store each, all on the same cluster (one after the other); the
    client loads the model once for all of them."""
    if len(plates) != len(outs):
        raise ConceptDiscoveryError(f"{len(plates)} plates but {len(outs)} output stores")
    settings = settings if settings is not None else EmbedSettings()
    if kw.get("backend") is None:
        kw["backend"] = load_embed_model(settings)
    return [
        embed_plate_on_cluster(p, settings, o, client, **kw)
        for p, o in zip(plates, outs, strict=True)
    ]


__all__ = [
    "connect",
    "embed_plate_on_cluster",
    "embed_plates_on_cluster",
    "embed_sites_task",
]
