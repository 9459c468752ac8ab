"""The store encoder's Dask executor: the token rows of a store cut into blocks of whole
encode batches, so every batch a worker encodes is a batch of the single-process loop
(:func:`~.encode.encode_store`) and the codes are equal bit for bit. Workers read the store
from its path and refuse one whose signature changed; the dictionary reaches them as the result
of a task. The client side (``connect``, gathering results) is shared with the embedding
executor in :mod:`..embed.cluster`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..embed.cluster import _gather, _hold
from ..errors import ConceptDiscoveryError, StoreError
from ..progress import Cancel, ProgressCallback, report


def _worker_store(path: str, signature: str):
    """The store at ``path``, refused when it is not the store the client signed (embedded
    again under the run). Opened for every task: reading its attributes is cheap, and a store
    kept open would not see the change."""
    from ..embed.store import ActivationStore

    store = ActivationStore.open(path)
    if store.signature_hash != signature:
        raise StoreError(
            f"the activation store at {path} changed while it was being encoded (its "
            "signature differs from the one the run started with); run the analysis again"
        )
    return store


def encode_rows_task(
    path: str, signature: str, dictionary, unit: str, lo: int, hi: int, groups, batch_size: int
):
    """Run on a worker: codes of rows ``lo:hi`` of the store's ``unit`` tokens, with the rows
    whose tokens are not finite; or the library's refusal (returned, not raised)."""
    from .encode import WatchedRows, dictionary_tokens

    try:
        store = _worker_store(path, signature)
        block = np.asarray(dictionary_tokens(store, dictionary, unit)[lo:hi])
        tokens = WatchedRows(block, offset=lo)
        codes = dictionary.encode(tokens, groups, batch_size=batch_size)
    except ConceptDiscoveryError as exc:
        return exc
    return codes, tokens.bad_rows()


def encode_store_on_cluster(
    store,
    dictionary,
    unit: str | None = None,
    *,
    client,
    rows_per_task: int | None = None,
    batch_size: int = 4096,
    retries: int = 2,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
):
    """:func:`~.dictionary.pipeline.encode_store` with blocks of rows encoded by ``client``'s
    workers: the same checks, the same codes (bit for bit) and the same token table.

    ``rows_per_task`` is rounded up to a whole number of ``batch_size`` batches (default: about
    four tasks per worker). Raises ``Cancelled`` once ``cancel`` is set, as encode_store does.
    """
    import scipy.sparse as sp

    from .encode import check_finite_codes, encode_store

    unit = unit or dictionary.unit
    if batch_size < 1:
        raise ConceptDiscoveryError(f"batch size must be at least 1, got {batch_size}")
    dictionary.check_compatible_store(store)
    table = store.table(unit)
    n = len(table)
    if n == 0:
        return encode_store(store, dictionary, unit, batch_size=batch_size, progress=progress)
    if rows_per_task is None:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        rows_per_task = -(-n // (4 * workers))
    if rows_per_task < 1:
        raise ConceptDiscoveryError(f"rows_per_task must be at least 1, got {rows_per_task}")
    per_task = -(-int(rows_per_task) // batch_size) * batch_size  # whole batches
    groups = dictionary.groups_of(table)
    model = dictionary.model
    was_training = model.training
    model.eval()  # sent in eval mode: the workers' encode loops then never switch it
    try:
        remote = client.submit(_hold, dictionary, pure=False)
    finally:
        model.train(was_training)
    bounds = [(lo, min(lo + per_task, n)) for lo in range(0, n, per_task)]
    path, signature = str(Path(store.path).resolve()), store.signature_hash
    futures = [
        client.submit(
            encode_rows_task,
            path,
            signature,
            remote,
            unit,
            lo,
            hi,
            None if groups is None else groups[lo:hi],
            batch_size,
            retries=retries,
            pure=False,
        )
        for lo, hi in bounds
    ]
    labels = [f"{unit} token rows {lo}-{hi - 1}" for lo, hi in bounds]
    parts: list = [None] * len(bounds)
    bad: list = []
    done = 0
    report(progress, "encode", 0, n)

    def finished(i: int, result) -> None:
        nonlocal done
        parts[i], rows = result
        bad.append(rows)
        done += bounds[i][1] - bounds[i][0]
        report(progress, "encode", done, n)

    _gather(client, futures, labels, finished, cancel, f"encoding the store at {store.path}")
    codes = sp.vstack(parts, format="csr")
    check_finite_codes(codes, table, np.concatenate(bad), dictionary, store, unit)
    return codes, table


def analyze_store_on_cluster(
    store,
    dictionary,
    settings,
    out,
    *,
    client,
    rows_per_task=None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
):
    """:func:`~.dictionary.pipeline.analyze_store` with the encoding on ``client``'s workers."""
    from .analyze import analyze_store

    def encode(store, dictionary, unit, *, progress=None, cancel=None):
        return encode_store_on_cluster(
            store,
            dictionary,
            unit,
            client=client,
            rows_per_task=rows_per_task,
            progress=progress,
            cancel=cancel,
        )

    return analyze_store(
        store, dictionary, settings, out, progress=progress, cancel=cancel, encode=encode
    )
