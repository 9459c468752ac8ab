"""A viewer with a plate, its store and dictionary loaded and every widget docked.

``concept-discovery view`` calls :func:`open_viewer` and then starts napari's event loop; tests
call it on a viewer of their own. Loading goes through the widgets' own methods (the ones their
buttons call), so a problem is reported exactly as it would be to a user clicking.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from qtpy.QtCore import Qt, QTimer

PLUGIN = "napari-concept-discovery"
# Dock widget display names in napari.yaml, in docking order.
WIDGETS = ("Plate navigator", "Concept explorer", "Embed", "Dictionary")


@dataclass
class OpenedViewer:
    """The viewer and its docked widgets."""

    viewer: object
    navigator: object
    explorer: object
    embed: object
    dictionary: object


def dock_widgets(viewer) -> dict[str, object]:
    """Dock the plugin's four widgets on the right as tabs of one dock area, each with the
    window's full height: the plate navigator (raised first), the concept explorer (raised
    when its feature table is ready), Embed and Dictionary. Stacked one above the other they
    left the explorer's table three rows at 1500 x 950; as tabs it shows a dozen, and the
    feature card repeats the plate map the navigator would show."""
    widgets, docks = {}, {}
    for name in WIDGETS:
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    qt_window = viewer.window._qt_window  # noqa: SLF001
    for name in WIDGETS[1:]:
        qt_window.tabifyDockWidget(docks["Plate navigator"], docks[name])
    docks["Plate navigator"].raise_()
    # the explorer's table and card want the width; given once the window is laid out
    QTimer.singleShot(0, partial(_share_width, qt_window, docks))
    return widgets


def _share_width(qt_window, docks) -> None:
    try:
        width = max(420, min(520, int(qt_window.width() * 0.34)))
        qt_window.resizeDocks([docks["Concept explorer"]], [width], Qt.Orientation.Horizontal)
    except RuntimeError:  # the window was closed before it was laid out
        pass


def fit_screen(qt_window, share: float = 0.9) -> None:
    """Grow a new window to ``share`` of its screen's free area (never shrink it). napari
    opens at about 1,090 x 630, where the layer controls and the docked explorer leave the
    canvas a quarter of the width; a viewer made for looking at cells starts large."""
    screen = qt_window.screen()
    if screen is None:
        return
    free = screen.availableGeometry()
    width = max(qt_window.width(), int(free.width() * share))
    height = max(qt_window.height(), int(free.height() * share))
    qt_window.resize(min(width, free.width()), min(height, free.height()))
    frame = qt_window.frameGeometry()
    frame.moveCenter(free.center())
    qt_window.move(frame.topLeft())


def open_viewer(
    plate: str | Path,
    store: str | Path | None = None,
    dictionary: str | Path | None = None,
    viewer=None,
) -> OpenedViewer:
    """Open ``plate`` (its first site) in ``viewer`` (a new one by default), dock the widgets,
    use ``store`` and apply ``dictionary``; the feature table fills in once the dictionary's
    explorer is ready (in a worker)."""
    import napari

    if viewer is None:
        viewer = napari.Viewer(title="Concept discovery")
        fit_screen(viewer.window._qt_window)  # noqa: SLF001
    viewer.open(str(plate), plugin=PLUGIN)
    widgets = dock_widgets(viewer)
    embed, dict_widget = widgets["Embed"], widgets["Dictionary"]
    if store is not None and embed.open_store(store) is not None and dictionary is not None:
        dict_widget.load(dictionary)
    return OpenedViewer(
        viewer, widgets["Plate navigator"], widgets["Concept explorer"], embed, dict_widget
    )
