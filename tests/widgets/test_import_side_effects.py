"""Importing the plugin leaves napari's process as it found it (other plugins share it).

The widgets used to set ``sys.modules["triton"] = None`` for the whole process, because triton's
LLVM segfaults when it loads after Mesa's OpenGL LLVM. Now ``models`` hides triton only while its
own first import of timm runs, and only where a driver's LLVM is already mapped. Each case runs
in a fresh interpreter: the suite's own process goes without triton (conftest), so it cannot
show what a user's process gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_importing_the_widgets_headless_keeps_triton_importable():
    try:  # the suite's process blocks triton (conftest): ask the installed metadata
        metadata.version("triton")
    except metadata.PackageNotFoundError:
        pytest.skip("triton is not installed (it comes with torch's Linux wheels)")
    proc = _run(
        """
        import sys
        import napari_concept_discovery.widgets  # imports models, hence timm and torchvision
        assert sys.modules.get("triton", "absent") is not None, "triton was blocked"
        import triton  # another plugin can still use it
        print("ok", type(sys.modules["triton"]).__name__)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "module"]


def test_driver_llvm_is_seen_in_the_process_map(tmp_path):
    from napari_concept_discovery.models._triton import driver_llvm_loaded

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert driver_llvm_loaded(maps)
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /venv/llvmlite/binding/libllvmlite.so\n")
    assert not driver_llvm_loaded(maps)  # numba's LLVM is not a driver's
    assert not driver_llvm_loaded(tmp_path / "missing")


@pytest.mark.gui
@pytest.mark.slow
def test_widgets_open_after_the_canvas_without_blocking_triton_for_the_process():
    """A user's order: napari draws its canvas (Mesa under Xvfb), then the plugin's dock widget
    is opened and a model is loaded and run. Before, this needed the process-wide block; now
    it runs with no ``triton`` entry left in ``sys.modules``."""
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display: run the suite under xvfb-run")
    proc = _run(
        """
        import sys
        import numpy as np
        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        viewer.add_image(np.random.default_rng(0).random((64, 64)))
        QApplication.processEvents()
        viewer.screenshot(canvas_only=True, flash=False)  # the GL canvas has drawn
        from napari_concept_discovery.models._triton import driver_llvm_loaded
        print("driver-llvm", driver_llvm_loaded())
        viewer.window.add_plugin_dock_widget("napari-concept-discovery", "Embed")
        QApplication.processEvents()
        print("triton-entry", repr(sys.modules.get("triton", "absent"))[:20])
        import torch
        from napari_concept_discovery.models import load_model
        backend = load_model("default")
        tokens = backend.tokens(torch.rand(1, 3, 256, 256), None)
        print("tokens", tuple(tokens.shape))
        viewer.close()
        """
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    # where Mesa's LLVM is loaded, triton is absent (not imported), never a None entry
    if lines["driver-llvm"] == "True":
        assert lines["triton-entry"] == "'absent'"
    assert lines["triton-entry"] != "None"
    assert lines["tokens"].startswith("(1,")
