"""Embedding on a Dask cluster: the sites of a plate as tasks, each written as a store part.

The client opens the store (``StoreWriter.begin``: which sites are still to do) and gathers the
parts at the end (``finish``), exactly as :func:`~.plate_embedding.embed_plate` does; in between,
each task embeds a few sites on a worker and writes each as a part folder swapped into place
whole, so a task that fails or a worker that dies leaves nothing half-written and its sites are
simply run again (``retries``), and a run stopped altogether resumes like any store. Each worker
process loads the model once and keeps it for every task it runs. ``distributed`` is an optional
dependency (``pip install napari-concept-discovery[dask]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .errors import ConceptDiscoveryError, StoreError
from .plate_embedding import (
    EmbedSettings,
    _as_plate,
    load_embed_model,
    model_source,
    read_sites,
    resolve_channel_tokens,
    site_inputs,
)
from .progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report

#: Models loaded in this (worker) process, by the settings that load them.
_MODELS: dict[str, object] = {}


def _worker_backend(settings: EmbedSettings):
    key = json.dumps({"model": settings.model, "device": getattr(settings, "device", None)})
    if key not in _MODELS:
        _MODELS[key] = load_embed_model(settings)
    return _MODELS[key]


def _writer(plate, settings: EmbedSettings, out, backend):
    from .embed import Embedder
    from .store import StoreWriter

    inputs = {k: site_inputs(s, settings.cells, settings.nuclear) for k, s in plate.sites.items()}
    channels = resolve_channel_tokens(settings, backend, len(plate.channel_names))
    embedder = Embedder(backend, settings.block, settings.batch_size, channels)
    record = settings.replace(
        model=model_source(backend), block=embedder.block, channel_tokens=channels
    )
    writer = StoreWriter(out, plate, backend, embedder.block, inputs, settings=record.to_dict())
    return writer, embedder, inputs


def embed_sites_task(plate, settings: dict, out: str, keys: list) -> list:
    """Run on a worker: embed ``keys`` of ``plate`` and write each as a part of the store."""
    settings = EmbedSettings.from_dict(settings)
    writer, embedder, inputs = _writer(plate, settings, out, _worker_backend(settings))
    for st in embedder.iter_sites(read_sites(plate, keys, inputs, prefetch=False)):
        writer.write_site(st)
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
):
    """:func:`~.plate_embedding.embed_plate` with the sites embedded by ``client``'s workers.

    Returns the store (``store.reused`` when its signature matched), or None when cancelled.
    The client loads the model too, once, to sign the store as the workers will.
    """
    from distributed import as_completed

    settings = settings if settings is not None else EmbedSettings()
    if sites_per_task < 1:
        raise ConceptDiscoveryError(f"sites_per_task must be at least 1, got {sites_per_task}")
    plate = _as_plate(plate, settings.labels)
    writer, _, _ = _writer(plate, settings, out, load_embed_model(settings))
    todo = writer.begin()
    total = len(plate)
    done = total - len(todo)
    report(progress, "embed", done, total)
    if todo:
        remote = client.scatter(plate, broadcast=False)
        payload = settings.to_dict()
        chunks = [todo[i : i + sites_per_task] for i in range(0, len(todo), sites_per_task)]
        futures = [
            client.submit(
                embed_sites_task, remote, payload, str(out), chunk, retries=retries, pure=False
            )
            for chunk in chunks
        ]
        try:
            for fut in as_completed(futures):
                if is_cancelled(cancel):
                    raise Cancelled("embedding cancelled")
                try:
                    keys = fut.result()
                except Exception as exc:
                    chunk = chunks[futures.index(fut)]
                    raise StoreError(
                        f"embedding sites {', '.join(map(str, chunk))} failed after {retries} "
                        f"retries: {exc}"
                    ) from exc
                done += len(keys)
                report(progress, "embed", done, total, site=str(keys[-1]))
        except Cancelled:
            client.cancel(futures)
            return None
        except BaseException:
            client.cancel(futures)
            raise
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
    """Several plates, one store each, all on the same cluster (one after the other)."""
    if len(plates) != len(outs):
        raise ConceptDiscoveryError(f"{len(plates)} plates but {len(outs)} output stores")
    return [
        embed_plate_on_cluster(p, settings, o, client, **kw)
        for p, o in zip(plates, outs, strict=True)
    ]


__all__ = ["connect", "embed_plate_on_cluster", "embed_plates_on_cluster", "embed_sites_task"]
