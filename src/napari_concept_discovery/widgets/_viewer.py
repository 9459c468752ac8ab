"""One session per napari viewer, and the link between the session's site and the layers.

``get_session(viewer)`` gives every widget of a viewer the same
:class:`~napari_concept_discovery.views.session.ViewerSession`. The first call also links it to the
viewer: a plate opened with File > Open Folder (or as sample data) becomes the session's plate,
and a change of the session's site is read off the GUI thread and shown in the same layers.
A read that finishes after the user moved on is dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import partial

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from .._reader import SiteData, opened_plate, read_site
from ..errors import ConceptDiscoveryError
from ..plate import SiteKey
from ..views.prefetch import neighbour_sites, prefetch_sites
from ..views.session import Ticket, ViewerSession
from ._layers import plate_layers, show_site, shown_site
from ._notify import user_message
from ._painter import FeaturePainter

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_session(viewer) -> ViewerSession:
    """The session of ``viewer``, made and linked to its layers on first use."""
    entry = _SESSIONS.get(viewer)
    if entry is None:
        session = ViewerSession()
        link = SiteLink(viewer, session)
        painter = FeaturePainter(viewer, session)
        painter.on_complete = link.prefetch_neighbours  # a painted site: prepare its neighbours
        link.painter = painter
        _SESSIONS[viewer] = (session, link, painter)
        link.adopt_layers()
        qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
        if qt_viewer is not None:  # closing the viewer makes every result in flight stale
            qt_viewer.destroyed.connect(lambda *_: session.close())
        return session
    return entry[0]


def get_link(viewer) -> SiteLink:
    """The object that keeps the viewer's layers on the session's site (for tests and waits)."""
    get_session(viewer)
    return _SESSIONS[viewer][1]


def get_painter(viewer):
    """The viewer's :class:`~._painter.FeaturePainter` (paints the selected feature)."""
    get_session(viewer)
    return _SESSIONS[viewer][2]


def observe(widget, slots) -> None:
    """Connect session signals to a widget's slots until Qt deletes the widget.

    The session outlives a closed dock widget; a slot of a deleted widget must not be called.
    """
    for signal, slot in slots:
        signal.connect(slot)
    widget.destroyed.connect(partial(_disconnect, tuple(slots)))


def _disconnect(slots, *_) -> None:
    for signal, slot in slots:
        try:
            signal.disconnect(slot)
        except (ValueError, RuntimeError):
            pass


#: Sites whose pixels a viewer keeps after reading them (a 1080 x 1080 site of 6 channels is
#: ~14 MB as uint16).
KEEP_SITES = 8


class SiteLink:
    """Keeps one viewer's plate layers on the session's site.

    Holds the viewer weakly (the session registry is keyed by it), reads sites in napari thread
    workers and shows a result only while :meth:`ViewerSession.is_current` says its ticket is.
    """

    def __init__(self, viewer, session: ViewerSession) -> None:
        self._viewer = weakref.ref(viewer)
        self.session = session
        self._workers: set = set()
        self.dropped = 0  # results that arrived for a site no longer in view
        # sites read lately, by (plate folder, key): going back to one shows it at once
        self._read: OrderedDict[tuple, SiteData] = OrderedDict()
        #: Prepare the neighbours of the site in view (pixels and codes) in the background.
        self.prefetch = True
        self._prefetch: tuple[threading.Event, tuple] | None = None  # (cancel, its sites)
        self._prefetch_workers: set = set()  # kept alive until they finish; not ``busy``
        self.painter: FeaturePainter | None = None  # set by get_session
        #: (plate folder, site key) of sites shown by the user's own layers (embedded from
        #: layers in the viewer): those layers are the site, nothing is read or added for it.
        self.user_sites: set[tuple] = set()
        viewer.layers.events.inserted.connect(self._on_inserted)
        session.site_changed.connect(self._on_site_changed)

    @property
    def busy(self) -> bool:
        """Whether a site is still being read."""
        return bool(self._workers)

    @property
    def prefetching(self) -> bool:
        """Whether neighbouring sites are being prepared in the background."""
        return bool(self._prefetch_workers)

    def adopt_layers(self) -> None:
        """Take the plate of layers already in the viewer (opened before any widget was)."""
        viewer = self._viewer()
        if viewer is not None:
            for layer in list(viewer.layers):
                self._adopt(layer)

    def _on_inserted(self, event) -> None:
        self._adopt(event.value)

    def _adopt(self, layer) -> None:
        meta = layer.metadata
        path, key = meta.get("plate_path"), meta.get("site_key")
        if meta.get("role") not in ("channel", "cells") or path is None or key is None:
            return
        plate = self.session.plate
        if plate is not None and str(plate.root) == path:
            return
        try:
            plate = opened_plate(path)
            self.session.set_plate(plate, site=key)
        except (ConceptDiscoveryError, KeyError, OSError) as exc:
            show_error(user_message(exc, f"Could not open plate {path}"))

    def _on_site_changed(self, key: SiteKey | None) -> None:
        viewer, plate = self._viewer(), self.session.plate
        if key is None or viewer is None or plate is None:
            return
        if self._prefetch is not None and SiteKey.of(key) not in self._prefetch[1]:
            self._prefetch[0].set()  # the user went elsewhere: free the CPU for this site
        if (str(plate.root), tuple(key)) in self.user_sites:
            return  # the user's layers show it
        if shown_site(viewer, str(plate.root)) == tuple(key):
            return  # the reader just made these layers for this site
        ticket = self.session.ticket()
        cache_key = (str(plate.root), tuple(key))
        data = self._read.get(cache_key)
        if data is not None:  # read before: no worker, no decoding
            self._read.move_to_end(cache_key)
            self.show(ticket, data)
            return
        worker = create_worker(read_site, plate, key, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(partial(self._returned, ticket, cache_key))
        worker.errored.connect(partial(self._failed, ticket))
        worker.finished.connect(partial(self._workers.discard, worker))
        self._workers.add(worker)
        worker.start()

    def _returned(self, ticket: Ticket, cache_key: tuple, data: SiteData) -> bool:
        self._keep(cache_key, data)
        return self.show(ticket, data)

    def _keep(self, cache_key: tuple, data: SiteData) -> None:
        self._read[cache_key] = data
        self._read.move_to_end(cache_key)
        while len(self._read) > KEEP_SITES:
            self._read.popitem(last=False)

    def prefetch_neighbours(self) -> None:
        """Read the sites a user most likely opens next, and encode their codes when a
        dictionary is explored, in one background worker (see :mod:`..prefetch`).

        Called once the site in view is drawn, so it never competes with it; a prefetch still
        running for another site is cancelled. Pixels land in the bounded read cache on the
        GUI thread; codes in the explorer's own bounded cache.
        """
        viewer, plate, key = self._viewer(), self.session.plate, self.session.site_key
        if not self.prefetch or viewer is None or plate is None or key is None:
            return
        if self.session.closed:
            return
        if self._prefetch is not None:
            self._prefetch[0].set()
        root = str(plate.root)
        near = neighbour_sites(list(plate.sites), key)
        reads = [k for k in near if (root, tuple(k)) not in self._read]
        explorer = self.session.explorer
        codes = []
        labels = None
        if explorer is not None and self.session.feature is not None:
            codes = [k for k in near if k in explorer and explorer.cached(k) is None]
            source = getattr(self.painter, "source", None)
            if source is not None and source.explorer is explorer:
                labels = source.labels  # the painter decodes a site's cells once, then keeps them
        if not reads and not codes:
            self._prefetch = None
            return
        cancel = threading.Event()
        self._prefetch = (cancel, tuple(near))
        worker = create_worker(
            prefetch_sites,
            partial(read_site, plate),
            reads,
            explorer,
            codes,
            cancel,
            labels,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(partial(self._prefetched, root))
        worker.finished.connect(partial(self._prefetch_workers.discard, worker))
        self._prefetch_workers.add(worker)
        worker.start()

    def _prefetched(self, root: str, done: list) -> None:
        plate = self.session.plate
        if plate is None or str(plate.root) != root:
            return  # another plate opened meanwhile
        for key, data in done:
            if (root, tuple(key)) not in self._read:
                self._keep((root, tuple(key)), data)

    def show(self, ticket: Ticket, data: SiteData) -> bool:
        """Show a site that was read for ``ticket``; False (and nothing drawn) when stale."""
        viewer = self._viewer()
        if viewer is None or not self.session.is_current(*ticket):
            self.dropped += 1
            return False
        try:
            show_site(viewer, data)
        except Exception as exc:  # a Qt slot: say it in the viewer, not as a console traceback
            show_error(user_message(exc, f"Could not show {data.key}"))
            return False
        if self.painter is not None:
            self.painter.write_codes()  # the cells layer shows this site's cells now
        if self.session.feature is None or self.session.explorer is None:
            self.prefetch_neighbours()  # no feature to paint: the site is complete now
        return True

    def _failed(self, ticket: Ticket, exc: BaseException) -> None:
        if self.session.is_current(*ticket):
            show_error(user_message(exc, f"Could not show {ticket.site_key}"))

    def layers(self):
        """The channel layers (by channel) and cells layer of the session's plate."""
        viewer, plate = self._viewer(), self.session.plate
        if viewer is None or plate is None:
            return {}, None
        return plate_layers(viewer, str(plate.root))
