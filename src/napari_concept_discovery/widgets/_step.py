"""The base of the dock widgets that run one step of the flow (embed, train)."""

from __future__ import annotations

from qtpy.QtWidgets import QWidget

from ._jobs import JobPanel, WithJobPanel
from ._viewer import get_session


class StepWidget(QWidget, WithJobPanel):
    """A dock widget that runs one step of the flow: the viewer, its session state and one
    :class:`JobPanel`; a subclass enables its own buttons in ``_enable(running)``."""

    def __init__(
        self, napari_viewer, parent: QWidget | None = None, *, cancel_tip: str, cancelling: str
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.panel = JobPanel(
            self, cancel_tip=cancel_tip, cancelling=cancelling, on_running=self._enable
        )

    def _enable(self, running: bool) -> None:
        raise NotImplementedError
