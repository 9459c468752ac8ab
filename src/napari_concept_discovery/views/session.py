"""The state of one viewer session: plate, site in view, store, dictionary, explorer, feature, cell.

Widgets read this one object and observe its signals instead of talking to each other, so a new
widget only needs the session (see docs/architecture.md, "The viewer"). Qt-free and napari-free:
signals are psygnal's, which napari itself uses, and they fire synchronously in the thread that
calls a setter, so setters belong on the GUI thread.

A result computed off the GUI thread carries a :class:`Ticket` taken when the work started;
``is_current`` tells whether the site and the data it was computed from are still the ones in
view, so a late result is dropped rather than drawn on another site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from psygnal import Signal

from ..errors import PlateError
from ..plate import Plate, SiteKey


class Ticket(NamedTuple):
    """What a worker result was computed for: the site in view and the session's generation."""

    site_key: SiteKey | None
    generation: int


class ViewerSession:
    """One viewer's plate, site, activation store, dictionary and selection.

    ``generation`` counts changes of what results are computed from (plate, site, store,
    dictionary, explorer); selecting a feature or a cell does not change it, since those only pick a
    column or a row of results already computed for the site.

    Changing the plate forgets the store (a store belongs to its plate) and the cell; changing
    the site forgets the cell (labels are per site) but keeps the feature, so the selected
    feature stays painted as the user moves through the plate; changing the dictionary forgets
    the feature (feature numbers mean nothing across dictionaries). The explorer is made from
    the store and the dictionary, so changing either forgets it.
    """

    plate_changed = Signal(object)  # Plate | None
    site_changed = Signal(object)  # SiteKey | None
    store_changed = Signal(object)  # store | None
    dictionary_changed = Signal(object)  # dictionary | None
    explorer_changed = Signal(object)  # explore.Explorer of (store, dictionary) | None
    feature_changed = Signal(object)  # int | None
    cell_changed = Signal(object)  # int (label in the site in view) | None

    def __init__(self) -> None:
        self._plate: Plate | None = None
        self._site_key: SiteKey | None = None
        self._store: Any = None
        self._dictionary: Any = None
        self._explorer: Any = None
        self._feature: int | None = None
        self._cell: int | None = None
        self._generation = 0
        self._closed = False

    def __repr__(self) -> str:
        plate = None if self._plate is None else str(self._plate.root)
        return (
            f"ViewerSession(plate={plate!r}, site={self._site_key}, "
            f"store={self._store is not None}, dictionary={self._dictionary is not None}, "
            f"feature={self._feature}, cell={self._cell}, generation={self._generation})"
        )

    # --- state, read-only from outside: change it through the setters so signals fire ---------

    @property
    def plate(self) -> Plate | None:
        return self._plate

    @property
    def site_key(self) -> SiteKey | None:
        return self._site_key

    @property
    def site(self):
        """The :class:`~napari_concept_discovery.plate.Site` in view, or None."""
        return (
            None if self._plate is None or self._site_key is None else self._plate[self._site_key]
        )

    @property
    def store(self) -> Any:
        return self._store

    @property
    def dictionary(self) -> Any:
        return self._dictionary

    @property
    def explorer(self) -> Any:
        """What the viewer asks of the store and dictionary (``explore.Explorer``), or None."""
        return self._explorer

    @property
    def feature(self) -> int | None:
        return self._feature

    @property
    def cell(self) -> int | None:
        return self._cell

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    # --- setters -------------------------------------------------------------------------------

    def set_plate(self, plate: Plate | None, site: SiteKey | Sequence | None = None) -> None:
        """Show ``plate``, at ``site`` or else its first site; forgets the store and the cell.

        All state changes first and the signals fire after, so a listener of any of them sees
        a consistent session (never the new plate with the old plate's site).
        """
        if plate is not None and len(plate) == 0:
            raise PlateError(f"plate folder {plate.root} has no sites to show")
        key = None
        if plate is not None:
            key = plate[site].key if site is not None else plate.keys[0]
        if plate is self._plate:
            self._set_site_key(key)
            return
        old_store, old_cell, old_explorer = self._store, self._cell, self._explorer
        self._plate, self._store, self._cell, self._site_key = plate, None, None, key
        self._explorer = None
        self._bump()
        self.plate_changed.emit(plate)
        if old_store is not None:
            self.store_changed.emit(None)
        if old_explorer is not None:
            self.explorer_changed.emit(None)
        if old_cell is not None:
            self.cell_changed.emit(None)
        # even with an equal key: it names a site of another plate (synthetic plates share keys)
        self.site_changed.emit(key)

    def set_site(self, key: SiteKey | Sequence | None) -> None:
        """Show another site of the plate; KeyError names a site the plate does not have."""
        if key is not None:
            if self._plate is None:
                raise PlateError(f"no plate is open, so site {tuple(key)} cannot be shown")
            key = self._plate[key].key
        self._set_site_key(key)

    def _set_site_key(self, key: SiteKey | None) -> None:
        if key == self._site_key:
            return
        self._site_key = key
        self._bump()
        self._set_cell(None)
        self.site_changed.emit(key)

    def set_store(self, store: Any) -> None:
        """Use another activation store (None: none); results from the old one are stale.

        The explorer, made from the old store, is forgotten.
        """
        if store is self._store:
            return
        self._store = store
        self._bump()
        self._forget_explorer()
        self.store_changed.emit(store)

    def set_dictionary(self, dictionary: Any) -> None:
        """Apply another dictionary (None: none); forgets the feature, whose number it changes."""
        if dictionary is self._dictionary:
            return
        self._dictionary = dictionary
        self._bump()
        self._forget_explorer()
        self.select_feature(None)
        self.dictionary_changed.emit(dictionary)

    def set_explorer(self, explorer: Any) -> None:
        """Use an explorer of the session's store and dictionary (made off the GUI thread).

        An explorer made for a store or dictionary that is no longer the session's is refused
        (ValueError): check the ticket it was made under before setting it.
        """
        if explorer is self._explorer:
            return
        if explorer is not None:
            for name in ("store", "dictionary"):
                mine, its = getattr(self, f"_{name}"), getattr(explorer, name, None)
                if its is not None and its is not mine:
                    raise ValueError(f"this explorer was made for another {name}")
        self._explorer = explorer
        self._bump()
        self.explorer_changed.emit(explorer)

    def _forget_explorer(self) -> None:
        if self._explorer is not None:
            self._explorer = None
            self.explorer_changed.emit(None)

    def select_feature(self, feature: int | None) -> None:
        """Select a dictionary feature by number (None: none)."""
        if feature is not None:
            feature = _index(feature, "feature")
        if feature == self._feature:
            return
        self._feature = feature
        self.feature_changed.emit(feature)

    def select_cell(self, label: int | None) -> None:
        """Select a cell of the site in view by its label (None or 0: none)."""
        if label is not None:
            label = _index(label, "cell label")
            if label == 0:
                label = None  # background is not a cell
            elif self._site_key is None:
                raise ValueError(f"no site is in view, so cell {label} cannot be selected")
        self._set_cell(label)

    def _set_cell(self, label: int | None) -> None:
        if label == self._cell:
            return
        self._cell = label
        self.cell_changed.emit(label)

    # --- stale results ---------------------------------------------------------------------------

    def ticket(self) -> Ticket:
        """Take before starting work for the site in view; check with :meth:`is_current`."""
        return Ticket(self._site_key, self._generation)

    def is_current(self, site_key: SiteKey | Sequence | None, generation: int) -> bool:
        """Whether a result computed for ``site_key`` at ``generation`` may still be shown."""
        if self._closed or generation != self._generation:
            return False
        if site_key is None:
            return True
        return self._site_key is not None and SiteKey.of(site_key) == self._site_key

    def close(self) -> None:
        """The viewer is going away: every result still in flight is stale from now on."""
        self._closed = True
        self._bump()

    def _bump(self) -> None:
        self._generation += 1


def _index(value: object, what: str) -> int:
    """An int from an int-like value (numpy ints included), refusing floats such as 1.5."""
    try:
        as_int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if as_int != value or isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if as_int < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    return as_int
