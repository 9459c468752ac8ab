"""The Embed widget says what its "auto" precision is on this machine, and embeds at it.

Needs a display: ``xvfb-run -a python -m pytest tests/widgets/test_widgets_precision.py``.
"""

from __future__ import annotations

import pytest
import torch

from napari_concept_discovery.embed.compute import cpu_has_bf16
from widget_helpers import WAIT, click, open_docked

pytestmark = pytest.mark.gui


def test_auto_precision_says_what_it_resolves_to_and_the_store_signs_it(
    make_napari_viewer, workdir, qtbot, tmp_path
):
    viewer, opened = open_docked(make_napari_viewer, workdir, qtbot)
    embed = opened.embed
    precision = embed.fields["precision"].widget
    used, why = (
        ("bf16", "this CPU has native bf16")
        if cpu_has_bf16()
        else ("fp32", "this CPU has no native bf16")
    )

    embed.device_combo.setCurrentText("cpu")
    assert precision.currentText() == f"auto ({used}: {why})"
    assert embed.settings().precision == "auto"  # the choice's value stays auto
    embed.device_combo.setCurrentText("cuda")
    if torch.cuda.is_available():
        assert precision.currentText() == "auto (bf16: a GPU)"
    else:
        assert precision.currentText() == "auto (cuda is not available here)"
    # the other choices keep their names
    assert [precision.itemText(i) for i in range(1, precision.count())] == ["fp32", "bf16", "int8"]

    # embed the site in view at auto on the CPU: the store and the status say the precision
    embed.device_combo.setCurrentText("cpu")
    session = embed.session
    opened.navigator.select_well("B03")
    qtbot.waitUntil(lambda: session.site_key == ("SYNTH_1", "B03", 1), timeout=WAIT)
    embed.set_model(str(workdir / "tiny.safetensors"))
    embed.site_in_view.setChecked(True)
    embed.out_edit.setText(str(tmp_path / "store.zarr"))
    click(qtbot, embed.run_button)
    qtbot.waitUntil(lambda: session.store is not None and not embed.jobs.busy, timeout=WAIT)
    store = session.store
    assert store.precision == used and store.embed_settings["precision"] == used
    assert store.signature.get("precision", "fp32") == used  # fp32 stores sign without it
    assert f"at {used}," in embed.status.text()
