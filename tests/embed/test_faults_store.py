"""Faults around the activation store.

Every bad input gets a clear error and leaves every existing file byte-identical; a run killed
at any point leaves the old store or a resumable one, never a half-written final store.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from fault_helpers import run_and_kill, snapshot, tiny_weights
from helpers import TileCounter
from napari_concept_discovery._lock import lock_path, read_lock
from napari_concept_discovery.cli import main
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import StoreError
from napari_concept_discovery.models import ChannelAgnosticBackend, ChannelAgnosticViT
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.plate.layouts import walk_files

torch.set_num_threads(2)


def _backend(seed=0, model_id="tiny"):
    torch.manual_seed(seed)
    m = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    return ChannelAgnosticBackend(m, model_id=model_id, weights_hash=f"seed{seed}")


@pytest.fixture()
def plates(small_plates, tmp_path):
    """Two copies of the small plates: P (the store's) and Q, another plate folder whose first
    image differs (an identical copy is the same data moved, and its store is reused)."""
    import imageio.v3 as iio

    p, q = tmp_path / "P", tmp_path / "Q"
    shutil.copytree(small_plates, p)
    shutil.copytree(small_plates, q)
    first = next(iter(open_plate(q))).paths[0]
    iio.imwrite(first, 255 - iio.imread(first))
    return p, q


# fp32: the tile counter hooks this module; bf16 runs a converted copy of it
SETTINGS = EmbedSettings(batch_size=4, precision="fp32")


# --- 1. data loss: a store of another plate or block -----------------------------------------


def test_a_store_of_another_plate_or_block_is_refused_and_stays_whole(plates, tmp_path):
    p, q = plates
    out = tmp_path / "store"
    backend = _backend()
    tiles = TileCounter(backend)
    embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    n = tiles.tiles
    before = snapshot(out)
    with pytest.raises(
        StoreError, match=r"holds the activation store of plate .*/P .*plate folder"
    ):
        embed_plate(open_plate(q), SETTINGS, out, backend=backend)
    with pytest.raises(StoreError, match=r"\(model tiny, block 1\).*block 0\): block differ"):
        embed_plate(open_plate(p), SETTINGS.replace(block=0), out, backend=backend)
    with pytest.raises(StoreError, match="model weights differ"):
        embed_plate(open_plate(p), SETTINGS, out, backend=_backend(seed=1))
    assert snapshot(out) == before and tiles.tiles == n  # refused before any tile was embedded
    assert not lock_path(out).exists()

    # --overwrite: the new store is built beside; a run that stops half way leaves the old one
    stop = threading.Event()

    def progress(pr):
        if pr.done >= 3:
            stop.set()

    stopped = embed_plate(
        open_plate(q),
        SETTINGS,
        out,
        backend=backend,
        overwrite=True,
        progress=progress,
        cancel=stop,
    )
    assert stopped is None and snapshot(out) == before
    assert ActivationStore.open(out).plate_source["path"] == str(p.resolve())
    # the next run goes on from the sites it finished, then replaces the old store whole
    assert n < tiles.tiles < 2 * n
    new = embed_plate(open_plate(q), SETTINGS, out, backend=backend, overwrite=True)
    assert tiles.tiles == 2 * n  # each site of Q embedded once over the two runs
    assert new.plate_source["path"] == str(q.resolve()) and not new.reused
    assert sorted(x.name for x in tmp_path.iterdir()) == ["P", "Q", "store"]


def test_the_same_plate_with_changed_data_is_rebuilt_in_place(plates, tmp_path):
    p, _ = plates
    out = tmp_path / "store"
    backend = _backend()
    first = embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    site = next(iter(open_plate(p)))
    site.paths[0].write_bytes(site.paths[0].read_bytes())  # same bytes: still reused
    assert embed_plate(open_plate(p), SETTINGS, out, backend=backend).reused
    import imageio.v3 as iio

    img = iio.imread(site.paths[0])
    iio.imwrite(site.paths[0], 255 - img)
    again = embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    assert not again.reused and again.signature["data"] != first.signature["data"]


# --- 2. non-finite tokens from damaged weights -----------------------------------------------


def test_damaged_weights_are_refused_at_embed_naming_the_file_and_site(plates, tmp_path, capsys):
    p, _ = plates
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = b"\xff" * 4096  # NaN bytes over the middle of the tensors
    weights.write_bytes(bytes(data))
    out = tmp_path / "store"
    rc = main(["embed", str(p), "--out", str(out), "--model", str(weights), "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: model ") and f"({weights})" in line
    assert "gave non-finite tokens (NaN or Inf) at site SYNTH_1 B02 site 1" in line
    # refused at its first site: nothing is left at --out, no skeleton to resume
    assert not out.exists()


# --- 3. symbolic-link loops ------------------------------------------------------------------


def _tree_with_loops(root, depth=12, files=20_000):
    """A deep chain of folders, each with links back to the top and to its parent, and files
    spread over the chain; returns the real folders in order."""
    folders = [root]
    for i in range(depth):
        folders.append(folders[-1] / f"d{i:02d}")
    folders[-1].mkdir(parents=True)
    for d in folders[1:]:
        os.symlink(root, d / "to_top")
        os.symlink(d.parent, d / "to_parent")
    for i in range(files):
        (folders[i % len(folders)] / f"f{i:05d}.txt").touch()
    return folders


def test_folder_walk_follows_each_real_folder_once(tmp_path):
    root = tmp_path / "tree"
    folders = _tree_with_loops(root)
    walk = walk_files(root)
    assert walk.complete and len(walk.files) == 20_000 == len(set(walk.files))
    # each real folder is listed once: its files, one entry per subfolder, two links
    assert walk.entries == 20_000 + 3 * (len(folders) - 1)
    limited = walk_files(root, limit=500)
    assert not limited.complete and limited.entries < 500 + 20_000 // len(folders) + 3


def test_reader_answers_on_a_tree_with_loops_with_bounded_work(tmp_path, monkeypatch):
    from napari_concept_discovery import _reader

    root = tmp_path / "tree"
    _tree_with_loops(root)
    listed = []
    real = os.scandir

    def counting(path):
        listed.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    assert _reader.napari_get_reader(str(root)) is None
    assert len(listed) <= 13  # stopped within the probe's entry budget: no folder twice
    assert len({os.path.realpath(p) for p in listed}) == len(listed)


def test_reader_offers_a_big_plate_by_its_names_and_opens_it_when_used(
    small_plates, tmp_path, monkeypatch
):
    from napari_concept_discovery import _reader

    monkeypatch.setattr(_reader, "PROBE_ENTRIES", 20)  # the small plate passes for a big one
    reader = _reader.napari_get_reader(str(small_plates))
    assert reader is not None
    layers = reader(str(small_plates))
    assert layers[0][1]["metadata"][0]["site_key"] == ("SYNTH_1", "B02", 1)
    # a plate deep inside a big folder does not make the folder a plate
    deep = tmp_path / "a" / "b" / "c"
    shutil.copytree(small_plates, deep)
    assert _reader.napari_get_reader(str(tmp_path)) is None


def test_a_plate_with_a_link_loop_opens_with_its_sites(small_plates, tmp_path):
    p = tmp_path / "plate"
    shutil.copytree(small_plates, p)
    os.symlink(p, p / "images" / "loop")
    os.symlink(p / "images", p / "images" / "SYNTH" / "again")
    assert list(open_plate(p).sites) == list(open_plate(small_plates).sites)


# --- 4. two writers: the lock ----------------------------------------------------------------


def test_a_store_being_written_is_refused_and_a_stale_lock_is_taken_over(plates, tmp_path):
    p, _ = plates
    out = tmp_path / "store"
    backend = _backend()
    embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    before = snapshot(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        since = time.time() - 5
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "since": since}
        lock_path(out).write_text(json.dumps(lock))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        with pytest.raises(
            StoreError, match=f"store {out} is being written by process {sleeper.pid} since {when}"
        ):
            embed_plate(open_plate(p), SETTINGS, out, backend=backend)
        assert snapshot(out) == before and read_lock(out) == lock
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is gone: the lock is stale, taken over, and released at the end
    again = embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    assert again.reused and not lock_path(out).exists()
    # a lock of another host cannot be checked: refused, with how to clear it
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": since}))
    with pytest.raises(StoreError, match=r"on host elsewhere; .*delete .*\.store\.lock"):
        embed_plate(open_plate(p), SETTINGS, out, backend=backend)


def test_two_embeddings_into_one_store_never_interleave(plates, tmp_path):
    """The second writer is refused with the first one named while the first one runs."""
    p, _ = plates
    out = tmp_path / "store"
    inside = threading.Event()
    release = threading.Event()
    errors = []

    def progress(pr):
        if pr.done == 2:
            inside.set()
            release.wait(120)

    def first():
        try:
            embed_plate(open_plate(p), SETTINGS, out, backend=_backend(), progress=progress)
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert inside.wait(120)
        with pytest.raises(StoreError, match=f"being written by process {os.getpid()} since"):
            embed_plate(open_plate(p), SETTINGS, out, backend=_backend())
    finally:
        release.set()
        t.join()
    assert not errors and ActivationStore.open(out).attrs["complete"]


# --- 6. metadata is part of the signature ----------------------------------------------------


def test_changed_metadata_is_joined_again_without_embedding(plates, tmp_path):
    p, _ = plates
    out = tmp_path / "store"
    backend = _backend()
    tiles = TileCounter(backend)
    first = embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    n = tiles.tiles
    tokens, old = np.asarray(first.tokens("cell")), first.table("cell")
    meta = pd.read_csv(p / "metadata.csv")
    flipped = {"negative_control": "treatment", "treatment": "negative_control"}
    meta["well_type"] = meta["well_type"].map(flipped)
    meta.to_csv(p / "metadata.csv", index=False)
    again = embed_plate(open_plate(p), SETTINGS, out, backend=backend)
    assert tiles.tiles == n and again.reused  # no site embedded again
    assert again.signature["metadata"] != first.signature["metadata"]
    new = ActivationStore.open(out).table("cell")
    assert list(new.columns) == list(old.columns)
    assert (new["well_type"] == old["well_type"].map(flipped)).all()
    assert np.array_equal(np.asarray(again.tokens("cell")), tokens)


# --- 7. killed embeddings --------------------------------------------------------------------

EMBED_CHILD = """
import sys, time
import torch
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
plate, out, weights, marker, after, overwrite = sys.argv[1:]
torch.set_num_threads(2)

def progress(p):
    if p.done >= int(after):
        open(marker, "w").write(str(p.done))
        time.sleep(600)

embed_plate(plate, EmbedSettings(model=weights, batch_size=4), out, progress=progress,
            overwrite=overwrite == "1")
"""


def test_a_killed_first_embedding_resumes_to_the_same_store(plates, tmp_path):
    p, _ = plates
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    out = tmp_path / "store"
    marker = tmp_path / "marker"
    pid = run_and_kill(EMBED_CHILD, marker, str(p), str(out), str(weights), str(marker), "4", "0")
    assert read_lock(out)["pid"] == pid  # the dead writer's lock is left behind
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(out)
    settings = EmbedSettings(model=str(weights), batch_size=4)
    resumed = embed_plate(open_plate(p), settings, out)
    ref = embed_plate(open_plate(p), settings, tmp_path / "ref")
    np.testing.assert_allclose(
        np.asarray(resumed.tokens("cell")), np.asarray(ref.tokens("cell")), rtol=0, atol=1e-6
    )
    pd.testing.assert_frame_equal(resumed.table("cell"), ref.table("cell"))
    assert not lock_path(out).exists()


def test_a_killed_overwrite_leaves_the_old_store_whole(plates, tmp_path):
    p, q = plates
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    out = tmp_path / "store"
    settings = EmbedSettings(model=str(weights), batch_size=4)
    embed_plate(open_plate(p), settings, out)
    before = snapshot(out)
    marker = tmp_path / "marker"
    run_and_kill(EMBED_CHILD, marker, str(q), str(out), str(weights), str(marker), "3", "1")
    assert snapshot(out) == before
    old = ActivationStore.open(out)
    assert old.attrs["complete"] and old.plate_source["path"] == str(p.resolve())
    new = embed_plate(open_plate(q), settings, out, overwrite=True)
    assert new.plate_source["path"] == str(q.resolve())


def test_labels_gone_stale_are_said_and_embed_takes_the_new_ones(small_plates, tmp_path, capsys):
    """After metadata.csv changes, analyze and report say that the store's labels are
    those of embedding time; embedding again takes the new ones without running the model."""
    import warnings

    from napari_concept_discovery.dictionary import TrainSettings, train_on_store
    from napari_concept_discovery.errors import DataWarning

    plate = tmp_path / "P"
    shutil.copytree(small_plates, plate)
    out = tmp_path / "store"
    backend = _backend()
    store = embed_plate(open_plate(plate), SETTINGS, out, backend=backend)
    assert store.stale_labels() is None
    d = tmp_path / "d.safetensors"
    train_on_store(store, TrainSettings(atoms=8, sparsity=2, n_pick=1, steps=3), out=d)
    meta = pd.read_csv(plate / "metadata.csv")
    meta.loc[meta["well_type"] == "treatment", "perturbation"] = "renamed"
    meta.to_csv(plate / "metadata.csv", index=False)
    note = ActivationStore.open(out).stale_labels()
    assert note.startswith(f"the metadata table of {plate.resolve()} has changed since the ")
    for args in (
        ["analyze", str(out), str(d), "--out", str(tmp_path / "a")],
        ["report", str(out), str(d), "--out", str(tmp_path / "r"), "--top", "1", "--cells", "1"],
    ):
        assert main(args) == 0
        assert f"warning: {note}\n" in capsys.readouterr().err
    tiles = TileCounter(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        again = embed_plate(open_plate(plate), SETTINGS, out, backend=backend)
    assert tiles.tiles == 0  # the labels are joined again; no site goes through the model
    assert again.stale_labels() is None
    assert "renamed" in set(again.table("cell")["perturbation"])
