"""Neighbouring sites: which ones a user opens next, and preparing them off the GUI thread."""

from __future__ import annotations

import threading

import pytest

from helpers import small_train
from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import SiteKey
from napari_concept_discovery.views.prefetch import neighbour_sites, prefetch_sites

KEYS = [
    SiteKey("P1", "A01", 1),
    SiteKey("P1", "A01", 2),
    SiteKey("P1", "A01", 3),
    SiteKey("P1", "A02", 1),
    SiteKey("P2", "A01", 1),
]


def test_neighbours_are_the_next_site_then_the_next_well_then_the_previous_site():
    assert neighbour_sites(KEYS, ("P1", "A01", 1)) == [KEYS[1], KEYS[3]]
    assert neighbour_sites(KEYS, ("P1", "A1", 2), n=3) == [KEYS[2], KEYS[3], KEYS[0]]
    assert neighbour_sites(KEYS, KEYS[2]) == [KEYS[3], KEYS[1]]  # last of its well
    assert neighbour_sites(KEYS, KEYS[3]) == [KEYS[4]]  # the next well is on the next plate
    assert neighbour_sites(KEYS, KEYS[4]) == []  # the last site of the last plate
    assert neighbour_sites(KEYS, ("P9", "A01", 1)) == []
    assert neighbour_sites(KEYS, KEYS[0], n=0) == []


class _Explorer:
    """Records which sites were encoded; ``fail`` names sites whose encoding is refused."""

    def __init__(self, fail=()):
        self.encoded, self.fail = [], set(fail)

    def cached(self, key):
        return key if key in self.encoded else None

    def site(self, key, cancel=None):
        if key in self.fail:
            raise PlateError(f"cannot encode {key}")
        self.encoded.append(key)


def test_prefetch_reads_and_encodes_skips_failures_and_stops_when_cancelled():
    explorer = _Explorer(fail=[KEYS[1]])
    read = []
    done = prefetch_sites(
        lambda k: read.append(k) or f"pixels {k.site}", KEYS[:3], explorer, KEYS[:3]
    )
    assert [k for k, _ in done] == KEYS[:3] and done[0][1] == "pixels 1"
    assert explorer.encoded == [KEYS[0], KEYS[2]]  # the failing site skipped, the rest done
    # cached codes are not encoded again; the painter's cell labels are decoded with them
    decoded = []
    prefetch_sites(None, [], explorer, KEYS[:1], labels=decoded.append)
    assert explorer.encoded == [KEYS[0], KEYS[2]] and decoded == [KEYS[0]]

    stop = threading.Event()

    def read_then_stop(key):
        stop.set()  # the user moved on while the first site was read
        return key

    explorer = _Explorer()
    done = prefetch_sites(read_then_stop, KEYS[:3], explorer, KEYS[:3], cancel=stop)
    assert [k for k, _ in done] == [KEYS[0]] and explorer.encoded == [KEYS[0]]


@pytest.mark.gui
def test_the_viewer_prepares_the_next_sites_codes_and_pixels(make_napari_viewer, tmp_path, qtbot):
    """After a feature is painted on a site, the next site's codes and pixels are ready, so
    moving there paints at once (no worker); moving elsewhere cancels what is not needed."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from napari_concept_discovery.dictionary.pipeline import train_on_store
    from napari_concept_discovery.dictionary.settings import WhitenSettings
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.models.vit import ChannelAgnosticViT
    from napari_concept_discovery.synth import write_synthetic_plates
    from napari_concept_discovery.widgets import open_viewer
    from napari_concept_discovery.widgets._viewer import get_link, get_painter

    plates = write_synthetic_plates(
        tmp_path / "plates", n_plates=1, n_wells=3, n_sites=2, size=160, seed=3
    )
    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "m.st"))
    store = embed_plate(
        plates, EmbedSettings(model=str(tmp_path / "m.st"), precision="fp32"), tmp_path / "s"
    )
    centred = WhitenSettings(controls="well_type=negative_control", mode="center")
    settings = small_train(atoms=16, n_pick=None, steps=20, seed=0, whiten=centred)
    path = tmp_path / "d.safetensors"
    train_on_store(store, settings, out=path)

    viewer = make_napari_viewer()
    opened = open_viewer(plates, tmp_path / "s", path, viewer=viewer)
    session = opened.embed.session
    link, painter = get_link(viewer), get_painter(viewer)
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=30000)
    explorer = session.explorer
    keys = explorer.keys()
    first = session.site_key
    assert first == keys[0]
    qtbot.waitUntil(lambda: explorer.ready(first) or not painter.busy, timeout=30000)
    session.select_feature(0)
    near = neighbour_sites(keys, first)
    assert near == [keys[1], keys[2]]
    root = str(session.plate.root)

    def prepared():
        return not link.prefetching and all(
            explorer.cached(k) is not None and (root, tuple(k)) in link._read for k in near
        )

    qtbot.waitUntil(prepared, timeout=30000)
    assert all(k in painter.source._labels for k in near)  # their cells decoded too
    assert explorer.cached(keys[5]) is None  # not a neighbour: not encoded
    # the prepared codes are the ones the explorer computes itself
    again = explorer.site(near[0])
    explorer.forget(near[0])
    fresh = explorer.site(near[0])
    assert np.array_equal(again.cell_codes.toarray(), fresh.cell_codes.toarray())

    # moving to the next site paints it at once: pixels and codes were ready
    session.set_site(near[1])
    assert not link.busy and painter.painted.key == tuple(near[1])
    assert viewer.layers["DNA"].metadata["site_key"] == tuple(near[1])
