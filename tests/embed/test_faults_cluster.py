"""Faults on a Dask cluster: a worker killed in
the middle of writing a site's part, once or every time, and refusals made on a worker.

A killed worker's task runs again on another worker and the store equals the single-process
one; a site whose workers keep dying fails with a message naming it, leaving the store
unfinished (never taken for a store) with the finished sites kept, and the next run resumes.
Each cluster call runs under a timeout in the harness, so a hang fails the test instead of the
suite; nothing asserts on times.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402

from fault_helpers import tiny_weights  # noqa: E402
from helpers import poison, same_store  # noqa: E402
from napari_concept_discovery.analysis.cluster import encode_store_on_cluster  # noqa: E402
from napari_concept_discovery.embed.cluster import connect, embed_plate_on_cluster  # noqa: E402
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate  # noqa: E402
from napari_concept_discovery.embed.store import ActivationStore, site_id  # noqa: E402
from napari_concept_discovery.errors import ConceptDiscoveryError, DictionaryError  # noqa: E402

# the plugin below travels to the workers by value: they need not import the tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LIMIT = 240  # seconds a cluster call may take before the harness gives up on it


def within(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a thread, failing the test if it has not returned in LIMIT s."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=LIMIT)
    except FutureTimeout:
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {LIMIT} s (a hang)")
    finally:
        pool.shutdown(wait=False)


class DieWhileWriting(distributed.WorkerPlugin):
    """SIGKILL the worker process in the middle of writing the part of ``site``: its tokens are
    in the part's temporary folder, the part is not yet swapped into place.

    With ``once``, only the first worker to get there dies (it notes its pid in ``marker``
    first); otherwise every worker that tries the site dies (and appends its pid).
    """

    name = "die-while-writing"

    def __init__(self, site: str, marker: str, once: bool):
        self.site, self.marker, self.once = site, marker, once

    def setup(self, worker):
        from napari_concept_discovery.embed import store

        plugin, writing = self, {}
        write_site, write_array = store.StoreWriter.write_site, store._write_array

        def patched_write_site(writer, st):
            writing["key"] = str(st.key)
            try:
                write_site(writer, st)
            finally:
                writing.pop("key", None)

        def patched_write_array(group, name, *args, **kwargs):
            out = write_array(group, name, *args, **kwargs)
            if name == "cell" and writing.get("key") == plugin.site:
                marker = Path(plugin.marker)
                if not (plugin.once and marker.exists()):
                    with marker.open("a") as f:
                        f.write(f"{os.getpid()}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        store.StoreWriter.write_site = patched_write_site
        store._write_array = patched_write_array


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("cluster-weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def reference(small_plates, weights, tmp_path_factory):
    settings = EmbedSettings(model=str(weights))
    return settings, embed_plate(small_plates, settings, tmp_path_factory.mktemp("ref") / "s")


@pytest.fixture
def cluster_with(request):
    """A fresh 2-worker cluster, with a plugin registered when given (closed after the test)."""
    made = []

    def make(plugin=None, allowed_failures: int = 3):
        with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
            client = connect(workers=2)
        made.append(client)
        if plugin is not None:
            client.register_plugin(plugin)
        return client

    yield make
    for client in made:
        cluster = client.cluster
        client.close()
        cluster.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _marked_site(small_plates, settings) -> tuple:
    """The third site of the plate: in the second task at two sites a task, after another."""
    from napari_concept_discovery.plate import open_plate

    keys = list(open_plate(small_plates).sites)
    return keys, keys[2]


def test_a_worker_killed_mid_write_is_replaced_and_the_store_is_whole(
    small_plates, reference, tmp_path, cluster_with
):
    settings, single = reference
    keys, marked = _marked_site(small_plates, settings)
    marker = tmp_path / "died"
    client = cluster_with(DieWhileWriting(str(marked), str(marker), once=True))
    out = tmp_path / "store"
    store = within(embed_plate_on_cluster, small_plates, settings, out, client, sites_per_task=2)
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 1 and not _alive(pids[0])  # a worker did die, mid-write
    client.wait_for_workers(2, timeout=LIMIT)  # and was replaced (the nanny restarts it)
    same_store(single, store)
    assert not (out / "parts").exists()
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_a_site_that_kills_every_worker_fails_clearly_and_resumes(
    small_plates, reference, tmp_path, cluster_with
):
    settings, single = reference
    keys, marked = _marked_site(small_plates, settings)
    marker = tmp_path / "died"
    # one retry after a death: the site is given up after its second dead worker
    client = cluster_with(DieWhileWriting(str(marked), str(marker), once=False), 1)
    out = tmp_path / "store"
    with pytest.raises(ConceptDiscoveryError) as err:
        within(embed_plate_on_cluster, small_plates, settings, out, client, sites_per_task=2)
    # a task still running on the other worker cannot be stopped, only its result dropped:
    # close the cluster so that nothing writes while the folder is looked at
    client.cluster.close()
    msg = str(err.value)
    # the tasks queued on a worker that dies count its death too, so the task named may be the
    # marked site's or one that shared its workers
    assert re.search(r"the workers running sites .+ died \(killed, or out of memory\)", msg)
    assert f"The store at {out} is left unfinished" in msg and "run again to resume" in msg
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) >= 2 and not any(map(_alive, pids))
    # nothing half-written is taken for a store, or for a site
    with pytest.raises(ConceptDiscoveryError, match="unfinished"):
        ActivationStore.open(out)
    marked_part = site_id(keys.index(marked), marked)
    parts = {p.name: p for p in (out / "parts").iterdir()}
    assert marked_part not in parts
    finished = {n: p for n, p in parts.items() if not n.startswith(".")}
    assert all((p / "part.json").is_file() for p in finished.values())
    assert len(finished) < len(keys)
    assert not (out.parent / f".{out.name}.lock").exists()  # the lock was let go
    # the next run (here in one process) keeps the finished sites and completes the store
    seen = []
    store = embed_plate(small_plates, settings, out, progress=lambda p: seen.append(p.done))
    assert seen[0] == len(finished)
    same_store(single, store)


def test_refusals_on_a_worker_come_back_as_they_are(tiny_store_path, tmp_path, cluster_with):
    import zarr

    from napari_concept_discovery.dictionary import TrainSettings, train_on_store

    copy = tmp_path / "store"
    shutil.copytree(tiny_store_path, copy)
    poison(copy, 7, np.nan)
    store = ActivationStore.open(copy)
    d = train_on_store(
        ActivationStore.open(tiny_store_path),
        TrainSettings(atoms=16, sparsity=3, n_pick=1, steps=5, batch_size=32, seed=1),
        out=tmp_path / "d.safetensors",
    ).dictionary
    client = cluster_with()
    with pytest.raises(DictionaryError) as err:
        within(encode_store_on_cluster, store, d, client=client, rows_per_task=16, batch_size=16)
    site = store.table("cell").iloc[7]
    assert str(err.value).startswith(f"1 of {len(store.table('cell'))} cell tokens of the store")
    assert f"{site.plate} {site.well} {site.site}" in str(err.value)
    # a store changed under the run is refused by the worker that reads it
    zarr.open_group(str(copy), mode="a").attrs["signature_hash"] = "another"
    with pytest.raises(ConceptDiscoveryError, match="changed while it was being encoded"):
        within(encode_store_on_cluster, store, d, client=client, rows_per_task=16, batch_size=16)
    assert len(client.scheduler_info()["workers"]) == 2  # refusals cost no worker
