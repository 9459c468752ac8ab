"""Embedding on a 2-worker local Dask cluster gives the store the single-process run gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from helpers import same_store
from napari_concept_discovery.embed.cluster import connect, embed_plate_on_cluster
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
from napari_concept_discovery.embed.store import ActivationStore


@pytest.fixture(scope="module")
def client():
    c = connect(workers=2)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


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
    same_store(single, on_cluster)
    # each worker loaded the model once, whatever the number of tasks it ran
    loaded = client.run(
        lambda: len(__import__("napari_concept_discovery.embed.cluster").embed.cluster._MODELS)
    )
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
    same_store(reference, store)


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
    same_store(stores[0], stores[1])  # the same plates, the same tokens


# --- encoding and analysis on the cluster ------------------------------------------------------

TRAIN = dict(atoms=24, sparsity=4, steps=10, batch_size=64, seed=3)


@pytest.fixture(scope="module")
def dictionaries(tiny_store_path, tmp_path_factory):
    """An ICFL dictionary whitened per plate (groups travel with the rows) and a TopK one."""
    from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings, train_on_store

    store = ActivationStore.open(tiny_store_path)
    folder = tmp_path_factory.mktemp("cluster-dicts")
    whiten = WhitenSettings("well_type=negative_control", by="plate", n_components=8)
    icfl = train_on_store(
        store, TrainSettings(**TRAIN, n_pick=2, whiten=whiten), out=folder / "icfl.safetensors"
    )
    topk = train_on_store(
        store, TrainSettings(**TRAIN, method="topk"), out=folder / "topk.safetensors"
    )
    return {"icfl": icfl.path, "topk": topk.path}


def _same_codes(a, b) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)  # bit for bit


@pytest.mark.parametrize("method", ["icfl", "topk"])
@pytest.mark.parametrize("unit", ["cell", "patch"])
def test_cluster_encoding_equals_encode_store_bit_for_bit(
    tiny_store_path, dictionaries, client, method, unit
):
    from napari_concept_discovery.analysis.cluster import encode_store_on_cluster
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.dictionary import load_dictionary

    store = ActivationStore.open(tiny_store_path)
    d = load_dictionary(dictionaries[method])
    single, table = encode_store(store, d, unit, batch_size=32)
    seen = []
    # 40 rows a task round up to 64 (two whole batches of 32): several tasks, every batch the
    # single-process loop's batch
    codes, on_cluster = encode_store_on_cluster(
        store,
        d,
        unit,
        client=client,
        rows_per_task=40,
        batch_size=32,
        progress=lambda p: seen.append((p.stage, p.done, p.total)),
    )
    n = len(table)
    assert n > 3 * 64  # more than three tasks
    assert seen[0] == ("encode", 0, n) and seen[-1] == ("encode", n, n)
    assert len(seen) == 1 + -(-n // 64)
    pd.testing.assert_frame_equal(table, on_cluster)
    _same_codes(single, codes)
    assert codes.nnz > 0


def test_analyze_cli_on_two_workers_writes_what_one_process_writes(
    tiny_store_path, dictionaries, small_plates, tmp_path, capsys
):
    from napari_concept_discovery.cli import main

    common = [str(tiny_store_path), str(dictionaries["icfl"])]
    common += ["--labels", "well_type,perturbation", "--truth", "mitotic,cell_type"]
    common += ["--truth-file", str(small_plates / "truth.csv"), "--top", "4"]
    assert main(["analyze", *common, "--out", str(tmp_path / "one")]) == 0
    argv = ["analyze", *common, "--out", str(tmp_path / "two"), "--workers", "2"]
    assert main([*argv, "--rows-per-task", "100"]) == 0
    printed = capsys.readouterr().out
    assert "encoded" in printed and str(tmp_path / "two") in printed
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    parquets = [n for n in one if n.endswith(".parquet")]
    assert "codes.parquet" in parquets and "profiles.parquet" in parquets
    for name in parquets:
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "one" / name),
            pd.read_parquet(tmp_path / "two" / name),
            obj=name,
            check_exact=True,
        )


def test_cluster_options_are_checked(tiny_store_path, dictionaries, tmp_path, capsys):
    from napari_concept_discovery.cli import main

    base = ["analyze", str(tiny_store_path), str(dictionaries["icfl"]), "--out", str(tmp_path)]
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert main([*base, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--workers", "1", "--rows-per-task", "0"]) == 2
    assert "--rows-per-task must be at least 1, got 0" in capsys.readouterr().err


def test_cluster_embedding_refuses_another_store_and_replaces_it_with_overwrite(
    small_plates, tmp_path, client
):
    from fault_helpers import tiny_weights
    from napari_concept_discovery.errors import StoreError
    from napari_concept_discovery.synth import write_synthetic_plates

    other = write_synthetic_plates(tmp_path / "other", 1, 2, 1, 256, seed=5)
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    settings = EmbedSettings(model=str(weights))
    out = tmp_path / "store"
    first = embed_plate(small_plates, settings, out)
    n_first = len(first.sites())
    with pytest.raises(StoreError, match="--overwrite"):
        embed_plate_on_cluster(other, settings, out, client)
    assert len(ActivationStore.open(out).sites()) == n_first  # the old store is whole
    # with overwrite the workers build the new store beside the old one, swapped in at the end
    replaced = embed_plate_on_cluster(other, settings, out, client, overwrite=True)
    same_store(embed_plate(other, settings, tmp_path / "single"), replaced)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other",
        "single",
        "store",
        "tiny.safetensors",
    ]


def test_cluster_encoding_is_cancelled_between_tasks(tiny_store_path, dictionaries, client):
    from napari_concept_discovery.analysis.cluster import encode_store_on_cluster
    from napari_concept_discovery.dictionary import load_dictionary
    from napari_concept_discovery.progress import Cancelled

    store = ActivationStore.open(tiny_store_path)
    d = load_dictionary(dictionaries["icfl"])
    with pytest.raises(Cancelled):
        encode_store_on_cluster(store, d, client=client, rows_per_task=32, cancel=lambda: True)
