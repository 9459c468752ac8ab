"""A scripted user for a real viewer process: what the tests of ``concept-discovery view`` (and of
``napari PLATE``) use to act as a person would, inside the command they start.

In-process widget tests never run napari's own event loop to its end, never tear a viewer's
threads down, and never see a crash that kills the process; a subprocess running the real
command does. The steps go through the same methods a click calls (a feature's row, a well of
the plate map, a cell under the pointer), one at a time on Qt timers, so the event loop runs as
in a user's session. Nothing here runs unless the variable :data:`SCRIPT_ENV` names a JSON
file such as::

    {"steps": ["feature", "site", "cell"], "stay": 30, "report": "/tmp/drive.json",
     "screenshot": "/tmp/viewer.png"}

After the steps, the viewer stays up until ``stay`` seconds after it opened, optionally takes a
screenshot, writes the report (each step, what it did, when) and closes itself. A step that does
not complete within ``timeout`` seconds ends the process with exit code 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

#: The environment variable naming the script file; unset in every normal session.
SCRIPT_ENV = "CONCEPT_DISCOVERY_VIEW_SCRIPT"

#: Exit code of a view whose scripted steps failed.
FAILED = 3


def script_from_env() -> dict | None:
    """The scripted steps named by :data:`SCRIPT_ENV`, or None in a normal session."""
    path = os.environ.get(SCRIPT_ENV)
    if not path:
        return None
    return json.loads(Path(path).read_text())


def scripted_user(opened) -> ScriptedUser | None:
    """Start the scripted user on an :class:`~._open.OpenedViewer` when :data:`SCRIPT_ENV` asks
    for one; None (and nothing started) otherwise."""
    script = script_from_env()
    if script is None:
        return None
    user = ScriptedUser(opened.viewer, lambda: (opened.navigator, opened.explorer), script)
    user.start()
    return user


class ScriptedUser:
    """Runs the steps of ``script`` on ``viewer`` (its widgets found through ``widgets``, a
    callable returning the navigator and explorer once they are docked)."""

    def __init__(self, viewer, widgets: Callable[[], tuple | None], script: dict) -> None:
        self.viewer = viewer
        self.widgets = widgets
        self.steps = list(script.get("steps", ["feature", "site", "cell"]))
        self.stay = float(script.get("stay", 30))
        self.timeout = float(script.get("timeout", 180))
        self.report_path = script.get("report")
        self.screenshot_path = script.get("screenshot")
        self.started = time.monotonic()
        self.done: list[dict] = []
        self.exit_code: int | None = None
        self._timer = QTimer()
        self._timer.setInterval(50)
        self._timer.timeout.connect(self._tick)
        self._wait: tuple[str, Callable[[], bool], float, Callable[[], dict]] | None = None

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self._timer.start()

    def _tick(self) -> None:
        try:
            self._advance()
        except Exception as exc:  # a failed step ends the session with its reason
            self._finish(FAILED, f"{type(exc).__name__}: {exc}")

    def _advance(self) -> None:
        if self._wait is not None:
            name, ready, since, result = self._wait
            if not ready():
                if time.monotonic() - since > self.timeout:
                    raise TimeoutError(f"step {name!r} did not complete in {self.timeout:.0f} s")
                return
            self._wait = None
            self.done.append({"step": name, "at_s": self.elapsed(), **result()})
            print(f"scripted user: {name} done at {self.elapsed():.1f} s", file=sys.stderr)
            return
        if self.steps:
            name = self.steps.pop(0)
            ready, result = getattr(self, f"_step_{name}")()
            self._wait = (name, ready, time.monotonic(), result)
            return
        if self.elapsed() >= self.stay:
            self._finish(0, None)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _finish(self, code: int, error: str | None) -> None:
        self._timer.stop()
        self.exit_code = code
        if code == 0 and self.screenshot_path:
            shot = self.viewer.screenshot(canvas_only=False, flash=False)
            import imageio.v3 as iio

            iio.imwrite(self.screenshot_path, shot)
        if self.report_path:
            report = {
                "exit_code": code,
                "error": error,
                "steps": self.done,
                "closed_at_s": self.elapsed(),
            }
            Path(self.report_path).write_text(json.dumps(report, indent=1))
        if error:
            print(f"scripted user: {error}", file=sys.stderr)
        self.viewer.close()
        app = QApplication.instance()
        if app is not None:
            app.exit(code)

    # --- the steps: each returns (ready, result) ------------------------------------------------

    def _parts(self):
        from ._viewer import get_link, get_painter, get_session

        found = self.widgets()
        if found is None:
            raise RuntimeError("the plugin's widgets are not docked")
        navigator, explorer = found
        v = self.viewer
        return get_session(v), navigator, explorer, get_painter(v), get_link(v)

    def _step_feature(self):
        """Wait for the feature table, then click the row of a feature active on this site."""
        state: dict = {}

        def ready() -> bool:
            session, _, explorer, painter, link = self._parts()
            if "feature" not in state:
                if explorer.features is None or session.explorer is None or link.busy:
                    return False
                state["feature"] = _active_feature(session, explorer.features)
                state["site"] = tuple(session.site_key)
                if not explorer.select_row(state["feature"]):
                    raise RuntimeError(f"feature {state['feature']} has no row in the table")
                return False
            painted = painter.painted
            return (
                painted is not None
                and painted.feature == state["feature"]
                and tuple(painted.key) == state["site"]
                and not painter.busy
            )

        return ready, lambda: state

    def _step_site(self):
        """Click another well on the plate map and wait for its site to be shown and painted."""
        state: dict = {}

        def ready() -> bool:
            session, navigator, _, painter, link = self._parts()
            if "from" not in state:
                here = session.site_key
                wells = [w for w in navigator.map_view.wells if w != here.well]
                if not wells:
                    raise RuntimeError(f"plate {here.plate} has one well: no other site to open")
                state["from"] = tuple(here)
                navigator.select_well(wells[len(wells) // 2])
                return False
            key = session.site_key
            if key is None or tuple(key) == state["from"] or link.busy or painter.busy:
                return False
            if painter.painted is None or tuple(painter.painted.key) != tuple(key):
                return False
            state["to"] = tuple(key)
            return True

        return ready, lambda: state

    def _step_cell(self):
        """Click the middle of the largest cell of the site in view; wait for its panel."""
        state: dict = {}

        def ready() -> bool:
            session, _, explorer, painter, link = self._parts()
            if "label" not in state:
                cells = next(
                    (la for la in self.viewer.layers if la.metadata.get("role") == "cells"), None
                )
                if cells is None or link.busy or painter.busy:
                    return False
                y, x = _inside_largest_cell(np.asarray(cells.data))
                world = np.asarray(cells.data_to_world((y, x)))
                state["label"] = painter.select_cell_at(world)
                state["site"] = tuple(session.site_key)
                if state["label"] is None:
                    raise RuntimeError(f"no cell under ({y}, {x}) of {session.site_key}")
                return False
            return len(explorer.cell_table) > 0 and not painter.busy

        return ready, lambda: state


def _active_feature(session, table) -> int:
    """A feature active on several cells of the site in view (the most frequent one else)."""
    ranked = table.sort_values("frequency", ascending=False)["feature"]
    for f in ranked:
        values = session.explorer.cell_values(session.site_key, int(f))
        if int(values["active"].sum()) >= 3:
            return int(f)
    return int(ranked.iloc[0])


def _inside_largest_cell(labels: np.ndarray) -> tuple[int, int]:
    """A pixel inside the largest labelled cell (its point farthest from the background)."""
    from scipy import ndimage

    counts = np.bincount(labels.ravel())
    counts[0] = 0
    label = int(counts.argmax())
    if counts[label] == 0:
        raise RuntimeError("the site has no cells")
    inside = ndimage.distance_transform_edt(labels == label)
    y, x = np.unravel_index(int(inside.argmax()), inside.shape)
    return int(y), int(x)
