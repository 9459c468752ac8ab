"""Library calls off the GUI thread, with their progress reports and cancel, for the widgets.

A :class:`Job` runs one call that takes the library's ``progress=`` and ``cancel=`` keywords
(docs/architecture.md, "Conventions every step shares") in a napari thread worker. Progress
reports arrive on the GUI thread through a Qt signal (a signal emitted on the worker thread is
queued to the receiver's thread), so slots may touch widgets; cancel is a ``threading.Event``
the call checks between units of work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QWidget

from ._notify import user_message


class Job(QObject):
    """One library call in a worker: ``progressed(Progress)``, ``returned``, ``errored``, ``done``.

    ``done`` fires last, after ``returned`` or ``errored``, on the GUI thread. ``keywords``
    names the keywords the call takes (``progress``, ``cancel``); leave one out for calls that
    do not take it.
    """

    progressed = Signal(object)
    returned = Signal(object)
    errored = Signal(object)
    done = Signal()

    def __init__(
        self,
        fn: Callable[..., Any],
        *args,
        keywords: tuple[str, ...] = ("progress", "cancel"),
        parent: QObject | None = None,
        **kwargs,
    ) -> None:
        super().__init__(parent)
        self.cancel_event = threading.Event()
        if "progress" in keywords:
            kwargs["progress"] = self.progressed.emit
        if "cancel" in keywords:
            kwargs["cancel"] = self.cancel_event
        self.running = False
        self.result: Any = None
        self.error: BaseException | None = None
        # errors go to ``errored`` (and from there to a notification), not re-raised by napari
        self._worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        self._worker.returned.connect(self._on_returned)
        self._worker.errored.connect(self._on_errored)
        self._worker.finished.connect(self._on_finished)

    def start(self) -> Job:
        self.running = True
        self._worker.start()
        return self

    def cancel(self) -> None:
        """Ask the call to stop at its next check; it returns what it finished, or raises."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _on_returned(self, value) -> None:
        self.result = value
        self.returned.emit(value)

    def _on_errored(self, exc) -> None:
        self.error = exc
        self.errored.emit(exc)

    def _on_finished(self) -> None:
        self.running = False
        self.done.emit()


class JobOwner:
    """Keeps a widget's jobs alive while they run and cancels them when the widget goes away.

    Closing a dock widget (or the viewer) deletes the widget; its jobs are asked to stop, and
    their late results find no widget to draw on because every slot checks ``alive``.
    """

    def __init__(self, widget: QWidget) -> None:
        self.jobs: set[Job] = set()
        self.alive = True
        widget.destroyed.connect(self._on_destroyed)

    def run(self, job: Job) -> Job:
        self.jobs.add(job)
        job.done.connect(lambda: self.jobs.discard(job))
        return job.start()

    @property
    def busy(self) -> bool:
        return any(job.running for job in self.jobs)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel()

    def _on_destroyed(self, *_) -> None:
        self.alive = False
        self.cancel_all()


class JobPanel:
    """What a widget shows of its one long job: a Cancel button, a progress bar and a status
    line, with the run / cancel / fail / done rules every such widget follows.

    ``on_running(running)`` enables the widget's own buttons (its Run, Open, ...) as a job
    starts and ends; ``cancelling`` is the status shown while a cancelled job finishes its unit
    of work. The widget lays out ``cancel_button``, ``progress`` and ``status`` where it likes.
    The running job is also a bar in napari's activity dock (``activity``), where a user sees
    every plugin's long work in one place.
    """

    def __init__(
        self,
        owner: QWidget,
        *,
        cancel_tip: str,
        cancelling: str,
        on_running: Callable[[bool], None],
    ) -> None:
        self.jobs = JobOwner(owner)
        self.job: Job | None = None
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(cancel_tip)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._cancelling = cancelling
        self._on_running = on_running
        self.activity: napari_progress | None = None  # the job's bar in napari's activity dock
        self.cancel_button.clicked.connect(self.cancel)

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def start(self, job: Job, text: str, *, failed: str, progressed, returned) -> Job:
        """Run ``job`` as the panel's job: ``progressed`` and ``returned`` are the widget's
        slots; an error is shown as ``failed: <reason>``."""
        job.progressed.connect(progressed)
        job.returned.connect(returned)
        job.errored.connect(lambda exc: self.fail(user_message(exc, failed)))
        job.done.connect(self._on_done)
        self.job = job
        self._close_activity()
        self.activity = napari_progress(total=0, desc=text)
        self.set_running(True, text)
        return self.jobs.run(job)

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.status.setText(self._cancelling)

    def set_running(self, running: bool, text: str | None = None) -> None:
        self._on_running(running)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        if running:
            self.progress.setRange(0, 0)
        if text is not None:
            self.status.setText(text)

    def show_progress(self, done: int, total: int, text: str) -> None:
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)
        self.status.setText(text)
        bar = self.activity  # held: drawing the bar may let the job's end close it meanwhile
        if bar is not None:
            if bar.total != max(1, total):
                bar.total = max(1, total)
            bar.update(done - bar.n)
            bar.set_description(text)

    def fail(self, message: str) -> None:
        """A refusal or an error: on the status line and as a notification."""
        if not self.jobs.alive:
            return
        self.status.setText(message)
        show_error(message)

    def _close_activity(self) -> None:
        if self.activity is not None:
            self.activity.close()
            self.activity = None

    def _on_done(self) -> None:
        self._close_activity()
        if self.jobs.alive:
            self.set_running(False)


class WithJobPanel:
    """Mixin for a dock widget whose ``panel`` is a :class:`JobPanel`: the panel's jobs, job,
    Cancel button, progress bar and status line read as the widget's own."""

    panel: JobPanel

    @property
    def jobs(self) -> JobOwner:
        return self.panel.jobs

    @property
    def job(self) -> Job | None:
        return self.panel.job

    @property
    def cancel_button(self) -> QPushButton:
        return self.panel.cancel_button

    @property
    def progress(self) -> QProgressBar:
        return self.panel.progress

    @property
    def status(self) -> QLabel:
        return self.panel.status

    def cancel(self) -> None:
        self.panel.cancel()
