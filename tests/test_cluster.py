"""Embedding on a 2-worker local Dask cluster gives the store the single-process run gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from napari_concept_discovery.cluster import connect, embed_plate_on_cluster  # noqa: E402
from napari_concept_discovery.plate_embedding import EmbedSettings, embed_plate  # noqa: E402
from napari_concept_discovery.store import UNITS, ActivationStore  # noqa: E402


@pytest.fixture(scope="module")
def client():
    c = connect(workers=2)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


def _same_store(a: ActivationStore, b: ActivationStore) -> None:
    pd.testing.assert_frame_equal(a.sites(), b.sites())
    for unit in UNITS:
        pd.testing.assert_frame_equal(a.table(unit), b.table(unit))
        x, y = np.asarray(a.tokens(unit)), np.asarray(b.tokens(unit))
        assert x.dtype == y.dtype and x.shape == y.shape
        # the same model on the same tiles; torch's CPU kernels may round differently for
        # other batch compositions, so equal within float16 rounding, not bit for bit
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)
    for key in a.sites()[["plate", "well", "site"]].itertuples(index=False):
        np.testing.assert_array_equal(a.site_labels(tuple(key)), b.site_labels(tuple(key)))


def test_cluster_embedding_equals_single_process(small_plates, tmp_path, client):
    settings = EmbedSettings(model="default")
    single = embed_plate(small_plates, settings, tmp_path / "single")
    stages = []
    on_cluster = embed_plate_on_cluster(
        small_plates,
        settings,
        tmp_path / "cluster",
        client,
        sites_per_task=3,
        progress=lambda p: stages.append((p.done, p.total)),
    )
    n = len(single.sites())
    assert stages[-1] == (n, n)
    _same_store(single, on_cluster)
    # each worker loaded the model once, whatever the number of tasks it ran
    loaded = client.run(lambda: len(__import__("napari_concept_discovery.cluster").cluster._MODELS))
    assert set(loaded.values()) <= {0, 1} and sum(loaded.values()) >= 1
    # a second run finds the store complete and embeds nothing
    again = embed_plate_on_cluster(small_plates, settings, tmp_path / "cluster", client)
    assert again.reused


def test_cluster_resumes_an_interrupted_store(small_plates, tmp_path, client):
    settings = EmbedSettings(model="default", batch_size=2)  # cancel is checked per batch
    reference = embed_plate(small_plates, settings, tmp_path / "reference")
    out = tmp_path / "store"
    done = []
    stopped = embed_plate(
        small_plates,
        settings,
        out,
        progress=lambda p: done.append(p.done),
        cancel=lambda: len(done) > 3,
    )
    assert stopped is None  # interrupted: some parts written, the store not complete
    parts = [d for d in (out / "parts").iterdir() if not d.name.startswith(".")]
    assert 0 < len(parts) < len(reference.sites())
    (out / "parts" / ".killed-mid-write.tmp").mkdir()  # what a killed worker leaves
    seen = []
    store = embed_plate_on_cluster(
        small_plates, settings, out, client, progress=lambda p: seen.append(p.done)
    )
    assert seen[0] == len(parts)  # the finished sites were kept, only the rest ran
    assert not (out / "parts").exists()  # gathered and cleaned up
    _same_store(reference, store)


def test_embed_cli_on_two_workers_with_two_plates(small_plates, tmp_path, capsys):
    # the two synthetic plates as two folders, embedded into one store each
    import shutil

    from napari_concept_discovery.cli import main

    folders = []
    for name in ("a", "b"):
        shutil.copytree(small_plates, tmp_path / name)
        folders.append(str(tmp_path / name))
    out = tmp_path / "stores"
    argv = ["embed", *folders, "--out", str(out), "--model", "default", "--workers", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    stores = [ActivationStore.open(out / f"{n}.zarr") for n in ("a", "b")]
    assert all(str(s.path) in printed for s in stores)
    _same_store(stores[0], stores[1])  # the same plates, the same tokens
