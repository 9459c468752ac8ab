"""The live training plot: loss, FVU and dead fraction against the training step.

Drawn with matplotlib's Qt canvas (``FigureCanvasQTAgg``). matplotlib is already a dependency
for the report figures, so the widget and the figures share one plotting library, its
colormaps and its look; pyqtgraph or napari-matplotlib would add a dependency for three lines
redrawn every ten steps, which matplotlib's ``draw_idle`` does in a few milliseconds.
"""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from ..views.forms import TrainingCurves

#: What the plot says before a training has reported a step.
EMPTY = "Train: the loss, FVU and dead features\nare drawn here, step by step"
CURVES = (
    ("loss", "loss", "#f0a35e"),
    ("fvu", "FVU", "#5ec8f0"),
    ("dead_fraction", "dead", "#c77ddb"),
)


def _theme_colours(viewer) -> tuple[str, str]:
    """(background, text) of the viewer's theme, so the plot sits in the dock like the rest."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        return str(theme.background.as_hex()), str(theme.text.as_hex())
    except Exception:  # an unknown theme: matplotlib's own colours are fine
        return "#23242b", "#f0f1f2"


class TrainingPlot(QWidget):
    """Three small axes sharing the step axis; :meth:`show_curves` redraws them."""

    def __init__(self, viewer=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        background, text = _theme_colours(viewer) if viewer is not None else ("white", "black")
        self.figure = Figure(figsize=(3.2, 2.4), dpi=90, facecolor=background, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.axes = self.figure.subplots(len(CURVES), 1, sharex=True)
        self.lines = {}
        for ax, (name, label, colour) in zip(self.axes, CURVES, strict=True):
            ax.set_facecolor(background)
            ax.tick_params(colors=text, labelsize=7)
            for spine in ax.spines.values():
                spine.set_color(text)
            ax.set_ylabel(label, color=text, fontsize=8)
            (self.lines[name],) = ax.plot([], [], color=colour, lw=1.3)
        self.axes[-1].set_xlabel("step", color=text, fontsize=8)
        self.axes[2].set_ylim(-0.02, 1.02)
        for ax in self.axes[:2]:
            ax.set_ylim(0.0, 1.0)
        self.axes[-1].set_xlim(0, 1)
        # before the first step: words instead of empty axes with ticks around zero
        self.empty = self.figure.text(
            0.55, 0.55, EMPTY, color=text, fontsize=8, ha="center", va="center", alpha=0.8
        )
        self._ticks(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setToolTip(
            "Training: loss, fraction of variance unexplained (FVU; lower is better) and the "
            "fraction of dead features (not firing on the last 100,000 tokens)."
        )

    def _ticks(self, on: bool) -> None:
        for ax in self.axes:
            ax.tick_params(labelbottom=on and ax is self.axes[-1], labelleft=on)

    def show_curves(self, curves: TrainingCurves) -> None:
        drawn = len(curves.steps) > 0
        self.empty.set_visible(not drawn)
        self._ticks(drawn)
        for name, _, _ in CURVES:
            self.lines[name].set_data(curves.steps, getattr(curves, name))
        for ax in self.axes[:2]:
            ax.relim()
            ax.autoscale_view()
        if curves.total:
            self.axes[-1].set_xlim(0, curves.total)
        self.canvas.draw_idle()

    def data(self, name: str) -> tuple[list, list]:
        """The (steps, values) drawn for one curve (``loss``, ``fvu``, ``dead_fraction``)."""
        x, y = self.lines[name].get_data()
        return list(x), list(y)
