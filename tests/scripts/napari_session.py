"""``napari PLATE`` as a user runs it, with the plugin's widgets docked from the Plugins menu and
a scripted user (napari_concept_discovery.widgets._drive) acting in the viewer.

    python napari_session.py PLATE STORE DICTIONARY   (with CONCEPT_DISCOVERY_VIEW_SCRIPT set)

napari's own command line starts the viewer on PLATE; napari asks which reader opens the folder
(its own reader also accepts folders) and the plugin's is chosen, as a user does; once the
reader has made the layers, the four widgets are docked through their Plugins menu entries, the
store is opened in the Embed widget and the dictionary loaded in the Dictionary widget, as their
buttons do. Started by tests/widgets/test_view_command.py.
"""

import sys

import napari
import torch  # noqa: F401  (before Qt makes its application, as the plugin's widgets need)
from napari._qt.qt_event_loop import get_qapp
from qtpy.QtCore import QTimer

from napari_concept_discovery.widgets._drive import ScriptedUser, script_from_env

PLATE, STORE, DICTIONARY = sys.argv[1:4]
WIDGETS = ("Plate navigator", "Concept explorer", "Embed", "Dictionary")
docked = {}


def fail(code: int, message: str) -> None:
    print(message, file=sys.stderr)
    get_qapp().exit(code)


def plugin_actions(menu):
    for action in menu.actions():
        if action.menu() is not None:
            yield from plugin_actions(action.menu())
        else:
            yield action


def choose_reader() -> None:
    """Choose the plugin in napari's reader dialog, without remembering the choice."""
    from napari._qt.dialogs.qt_reader_dialog import QtReaderDialog

    for widget in get_qapp().topLevelWidgets():
        if isinstance(widget, QtReaderDialog) and widget.isVisible():
            buttons = widget.reader_btn_group.buttons()
            ours = [b for b in buttons if b.text() == "Concept Discovery"]
            if not ours:
                fail(
                    6,
                    f"napari's reader dialog does not offer the plugin: {[b.text() for b in buttons]}",
                )
                return
            ours[0].setChecked(True)
            widget.persist_checkbox.setChecked(False)
            widget.accept()
            print("chose the plugin's reader in napari's dialog", file=sys.stderr)


def dock_from_menu() -> None:
    viewer = napari.current_viewer()
    if viewer is None or not any(la.metadata.get("role") == "cells" for la in viewer.layers):
        choose_reader()
        QTimer.singleShot(200, dock_from_menu)
        return
    actions = {a.text().replace("&", ""): a for a in plugin_actions(viewer.window.plugins_menu)}
    for name in WIDGETS:
        matches = [a for text, a in actions.items() if text.startswith(name)]
        if not matches:
            fail(4, f"no Plugins menu entry for {name!r}: {sorted(actions)}")
            return
        matches[0].trigger()
    for name in WIDGETS:
        dock = next(w for k, w in viewer.window._wrapped_dock_widgets.items() if k.startswith(name))
        docked[name] = dock.widget()
    if docked["Embed"].open_store(STORE) is None:
        fail(5, f"the Embed widget did not open the store {STORE}")
        return
    docked["Dictionary"].load(DICTIONARY)
    widgets = lambda: (docked["Plate navigator"], docked["Concept explorer"])  # noqa: E731
    docked["user"] = ScriptedUser(viewer, widgets, script_from_env())  # kept: its timer lives
    docked["user"].start()


get_qapp()
QTimer.singleShot(0, dock_from_menu)
sys.argv = ["napari", PLATE]
from napari.__main__ import main  # noqa: E402

main()
