"""What the widget tests share: a tiny model, small training settings, and the user's clicks
(buttons, table rows, the canvas) in a real viewer."""

from __future__ import annotations

import torch

from napari_concept_discovery.dictionary.settings import TrainSettings, WhitenSettings

WAIT = 30000
CONTROL = ("well_type", "negative_control")


def tiny_vit(path, dim: int, seed: int):
    from safetensors.torch import save_file

    from napari_concept_discovery.models.vit import ChannelAgnosticViT

    torch.manual_seed(seed)
    vit = ChannelAgnosticViT(embed_dim=dim, depth=2, num_heads=2, max_channels=6)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return str(path)


def dictionary_settings(steps: int = 30) -> TrainSettings:
    return TrainSettings(
        method="icfl",
        atoms=16,
        sparsity=4,
        steps=steps,
        batch_size=64,
        seed=0,
        whiten=WhitenSettings(controls="=".join(CONTROL), mode="center"),
    )


def fill_dictionary_form(widget, settings: TrainSettings) -> None:
    """Type the settings into the form, as a user would."""
    for name in ("method", "unit", "atoms", "sparsity", "steps", "batch_size", "seed"):
        widget.fields[name].set_value(getattr(settings, name))
    widget.set_control(*settings.whiten.control)
    widget.set_group(settings.whiten.by)
    widget.whiten_fields["mode"].set_value(settings.whiten.mode)
    widget.whiten_fields["within"].set_value(settings.whiten.within)


def click(qtbot, button) -> None:
    from qtpy.QtCore import Qt

    assert button.isEnabled(), f"{button.text()} is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def open_docked(make_napari_viewer, workdir, qtbot, show=False):
    from napari_concept_discovery.widgets import open_viewer

    viewer = make_napari_viewer(show=show)
    opened = open_viewer(workdir / "plates", viewer=viewer)
    return viewer, opened


def wait_painter(qtbot, viewer):
    from napari_concept_discovery.widgets._viewer import get_link, get_painter

    painter, link = get_painter(viewer), get_link(viewer)
    qtbot.waitUntil(lambda: not painter.busy and not link.busy, timeout=WAIT)
    return painter


def click_row(qtbot, widget, feature: int) -> None:
    from qtpy.QtCore import Qt

    row = widget._proxy_row(feature)
    rect = widget.table.visualRect(widget.proxy.index(row, 0))
    widget.table.scrollTo(widget.proxy.index(row, 0))
    rect = widget.table.visualRect(widget.proxy.index(row, 0))
    qtbot.mouseClick(widget.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def click_canvas(qtbot, viewer, world_yx) -> None:
    """A left click on the canvas at a world position: centre the camera there, click the middle."""
    viewer.camera.center = world_yx
    canvas = viewer.window._qt_viewer.canvas
    w, h = canvas._scene_canvas.size
    pos = (w / 2, h / 2)
    canvas._scene_canvas.events.mouse_press(pos=pos, button=1, modifiers=())
    canvas._scene_canvas.events.mouse_release(pos=pos, button=1, modifiers=())
    qtbot.wait(10)
