"""Closing a widget while its job is still in a unit of work: the close waits for the cancelled
call to return, so napari quitting right after does not abort the process (a worker reporting to
Qt objects the interpreter has torn down makes Qt abort; exit status 134 before this wait)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import time

    from qtpy import sip
    from qtpy.QtWidgets import QApplication, QWidget

    from napari_concept_discovery.widgets import _jobs

    app = QApplication([])
    widget = QWidget()
    panel = _jobs.JobPanel(widget, cancel_tip="", cancelling="", on_running=lambda running: None)

    def work(progress, cancel):
        while not cancel.is_set():
            time.sleep(0.01)
        time.sleep(1.0)  # the unit of work in hand when the cancel came
        raise RuntimeError("cancelled after its unit of work")

    job = panel.start(_jobs.Job(work), "working", failed="x", progressed=print, returned=print)
    time.sleep(0.2)
    sip.delete(widget)  # the dock widget goes away, as when napari closes
    print("ended" if job.ended.is_set() else "still running")
    """
)


def test_closing_a_widget_mid_job_then_quitting_exits_cleanly():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ended"
