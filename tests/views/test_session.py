"""The viewer session without Qt: what its setters change, which signals fire, stale tickets."""

from __future__ import annotations

import numpy as np
import pytest

from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import SiteKey, open_plate
from napari_concept_discovery.views.session import Ticket, ViewerSession

SIGNALS = (
    "plate_changed",
    "site_changed",
    "store_changed",
    "dictionary_changed",
    "explorer_changed",
    "feature_changed",
    "cell_changed",
)


@pytest.fixture(scope="module")
def plate(small_plates):
    return open_plate(small_plates)


def record(session: ViewerSession) -> list[tuple[str, object]]:
    """Every signal as (name, payload), plus the session's site at the time, in firing order."""
    events: list[tuple[str, object]] = []
    for name in SIGNALS:
        getattr(session, name).connect(lambda value, name=name: events.append((name, value)))
    return events


def test_opening_a_plate_shows_its_first_site(plate):
    session = ViewerSession()
    events = record(session)
    seen_sites = []
    session.plate_changed.connect(lambda _: seen_sites.append(session.site_key))
    session.set_plate(plate)
    assert session.plate is plate and session.site_key == plate.keys[0]
    assert session.site.key == plate.keys[0]
    assert events == [("plate_changed", plate), ("site_changed", plate.keys[0])]
    # listeners see a consistent session: the new plate with its own site, not the old one
    assert seen_sites == [plate.keys[0]]


def test_set_plate_at_a_given_site_and_normalised_keys(plate):
    session = ViewerSession()
    key = plate.keys[3]
    session.set_plate(plate, site=(key.plate, key.well.replace("0", ""), str(key.site)))
    assert session.site_key == key and isinstance(session.site_key, SiteKey)


def test_site_change_keeps_the_feature_and_forgets_the_cell(plate):
    session = ViewerSession()
    session.set_plate(plate)
    session.select_feature(np.int64(12))
    session.select_cell(5)
    events = record(session)
    session.set_site(plate.keys[1])
    assert session.feature == 12 and isinstance(session.feature, int)
    assert session.cell is None
    assert events == [("cell_changed", None), ("site_changed", plate.keys[1])]
    session.set_site(plate.keys[1])  # the same site again: nothing happens
    assert len(events) == 2


def test_new_plate_forgets_store_and_cell_and_keeps_dictionary(plate, small_plates):
    session = ViewerSession()
    session.set_plate(plate)
    store, dictionary = object(), object()  # the session holds them without looking inside
    session.set_store(store)
    session.set_dictionary(dictionary)
    session.select_feature(3)
    session.select_cell(2)
    events = record(session)
    other = open_plate(small_plates)  # the same folder opened again is another plate object
    session.set_plate(other)
    assert session.store is None and session.cell is None
    assert session.dictionary is dictionary and session.feature == 3
    # the first site has the same key in both, but it is another plate's site: it fires
    assert [name for name, _ in events] == [
        "plate_changed",
        "store_changed",
        "cell_changed",
        "site_changed",
    ]


def test_new_dictionary_forgets_the_feature(plate):
    session = ViewerSession()
    session.set_plate(plate)
    session.set_dictionary("first")
    session.select_feature(4)
    events = record(session)
    session.set_dictionary("second")
    assert session.feature is None
    assert events == [("feature_changed", None), ("dictionary_changed", "second")]


def test_the_explorer_belongs_to_the_store_and_dictionary(plate, tiny_store_path):
    from napari_concept_discovery.analysis.explore import Explorer
    from napari_concept_discovery.dictionary.pipeline import train_on_store
    from napari_concept_discovery.dictionary.settings import TrainSettings
    from napari_concept_discovery.embed.store import ActivationStore

    store = ActivationStore.open(tiny_store_path)
    trained = train_on_store(store, TrainSettings(atoms=8, sparsity=4, steps=3, batch_size=32))
    session = ViewerSession()
    session.set_plate(plate)
    explorer = Explorer(store, trained.dictionary)
    with pytest.raises(ValueError, match="another store"):
        session.set_explorer(explorer)  # made for a store the session does not use
    session.set_store(store)
    session.set_dictionary(trained.dictionary)
    session.select_feature(2)
    ticket = session.ticket()
    events = record(session)
    session.set_explorer(explorer)
    assert session.explorer is explorer and events == [("explorer_changed", explorer)]
    assert not session.is_current(*ticket)  # results of no explorer are stale
    assert session.feature == 2  # the feature stays: same dictionary
    session.set_store(ActivationStore.open(tiny_store_path))  # the store changes: forgotten
    assert session.explorer is None and events[-2:] == [
        ("explorer_changed", None),
        ("store_changed", session.store),
    ]
    other = train_on_store(store, TrainSettings(atoms=8, sparsity=4, steps=3, batch_size=32))
    with pytest.raises(ValueError, match="another store"):
        session.set_explorer(explorer)
    session.set_dictionary(other.dictionary)
    assert session.explorer is None and session.feature is None


def test_tickets_go_stale_when_what_they_were_computed_from_changes(plate):
    session = ViewerSession()
    session.set_plate(plate)
    ticket = session.ticket()
    assert isinstance(ticket, Ticket) and session.is_current(*ticket)
    session.select_feature(1)  # a column of results already computed: still current
    session.select_cell(3)
    assert session.is_current(*ticket)
    session.set_site(plate.keys[1])
    assert not session.is_current(*ticket)
    back = session.ticket()
    session.set_site(plate.keys[0])
    session.set_site(plate.keys[1])  # back at the same site, but a newer visit
    assert not session.is_current(*back)
    now = session.ticket()
    session.set_store("store")
    assert not session.is_current(*now)
    now = session.ticket()
    session.set_dictionary("dictionary")
    assert not session.is_current(*now)
    now = session.ticket()
    assert session.is_current(None, now.generation)  # plate-wide work: only the generation
    assert not session.is_current(plate.keys[0], now.generation)  # another site
    session.close()
    assert session.closed and not session.is_current(*now)


def test_bad_input_is_refused_with_a_message(plate):
    session = ViewerSession()
    with pytest.raises(PlateError, match="no plate is open"):
        session.set_site(("SYNTH_1", "B02", 1))
    with pytest.raises(ValueError, match="no site is in view"):
        session.select_cell(3)
    session.set_plate(plate)
    with pytest.raises(KeyError, match="no site .*Z99"):
        session.set_site(("SYNTH_1", "Z99", 1))
    assert session.site_key == plate.keys[0]  # unchanged
    for bad in (1.5, -1, "3", True):
        with pytest.raises(ValueError, match="feature"):
            session.select_feature(bad)
    session.select_cell(0)  # the background is no cell
    assert session.cell is None
    session.select_cell(7)
    assert session.cell == 7
    session.set_plate(None)
    assert session.plate is None and session.site_key is None and session.site is None


def test_the_viewer_state_modules_import_no_qt_and_no_napari():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import napari_concept_discovery.views.session, napari_concept_discovery.views.platemap\n"
        "import napari_concept_discovery.views.overlay, napari_concept_discovery._reader\n"
        "import napari_concept_discovery.views.forms, napari_concept_discovery.views.feature_views\n"
        "import napari_concept_discovery.views.thumbnails, napari_concept_discovery.views.workspace\n"
        "gui = ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'vispy')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(gui)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
