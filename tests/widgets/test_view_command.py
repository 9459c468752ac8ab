"""The real commands a user starts, in their own processes, under the display the suite runs on.

``concept-discovery view DEMO_OUT`` and ``napari PLATE`` (plate opened by the plugin's reader, the
four widgets docked from the Plugins menu) each run napari's own event loop in a subprocess with
a scripted user (:mod:`napari_concept_discovery.widgets._drive`) who applies the dictionary,
paints a feature, opens another site and clicks a cell; the viewer must stay up for 30 s and
close with exit code 0. These caught what in-process widget tests could not: the viewer died a
few seconds after the dictionary was applied, as Qt's pool threads ended
(test_thread_teardown.py has the root cause). The ``view`` session runs with glibc's and
Python's allocator checks and bounds-checked kernels, so a write past a buffer fails in it
rather than later.

``CONCEPT_DISCOVERY_DEMO_OUT`` names a finished ``concept-discovery demo`` folder to use (CI gives
it the README's ``demo-out``); otherwise a small demo is made with the real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

STAY_S = 30
NAPARI_SESSION = Path(__file__).parents[1] / "scripts" / "napari_session.py"
CLI = [sys.executable, "-m", "napari_concept_discovery.cli"]


def _display_or_skip() -> None:
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display: run the suite under xvfb-run")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    given = os.environ.get("CONCEPT_DISCOVERY_DEMO_OUT")
    if given:
        path = Path(given)
        assert (path / "store.zarr").is_dir(), f"{path} is not a finished demo output folder"
        return path
    out = tmp_path_factory.mktemp("view") / "demo-out"
    proc = subprocess.run(
        # sites of 512 x 512 as the README's demo: the store's patch tokens then fill encode
        # buffers of several MiB, as a real plate's do (smaller ones never took the path that
        # crashed the viewer)
        [*CLI, "-q", "demo", str(out), "--wells", "6", "--size", "512", "--steps", "100"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run_scripted(tmp_path: Path, command: list[str], **env) -> tuple[dict, str]:
    report, shot = tmp_path / "report.json", tmp_path / "viewer.png"
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            {
                "steps": ["feature", "site", "cell"],
                "stay": STAY_S,
                "timeout": 240,
                "report": str(report),
                "screenshot": str(shot),
            }
        )
    )
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=STAY_S + 400,
        env={**os.environ, "CONCEPT_DISCOVERY_VIEW_SCRIPT": str(script), **env},
    )
    log = f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert report.is_file(), log
    result = json.loads(report.read_text())
    assert result["exit_code"] == 0 and result["error"] is None, log
    assert shot.is_file() and shot.stat().st_size > 10_000, log
    return result, log


def _check_steps(result: dict, log: str) -> None:
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["feature", "site", "cell"], log
    feature, site, cell = steps["feature"], steps["site"], steps["cell"]
    assert isinstance(feature["feature"], int), log
    assert tuple(site["from"]) == tuple(feature["site"]) and site["to"] != site["from"], log
    assert tuple(cell["site"]) == tuple(site["to"]) and cell["label"] > 0, log
    assert result["closed_at_s"] >= STAY_S, log


def test_view_command_stays_up_while_a_user_paints_moves_and_clicks(demo_out, tmp_path):
    _display_or_skip()
    result, log = _run_scripted(
        tmp_path,
        [*CLI, "view", str(demo_out)],
        MALLOC_CHECK_="3",  # glibc checks its heap on every call: corruption aborts here
        MALLOC_PERTURB_="165",  # freed memory is scribbled over, so a use after free shows
        PYTHONMALLOC="debug",  # Python's allocator checks its blocks too
        CONCEPT_DISCOVERY_CHECKED_KERNELS="1",  # bounds checks in the compiled kernels
    )
    _check_steps(result, log)


def test_napari_opens_a_plate_with_the_reader_and_widgets_from_the_plugins_menu(demo_out, tmp_path):
    from napari_concept_discovery.views.workspace import find_view_inputs

    _display_or_skip()
    inputs = find_view_inputs(demo_out)  # what `view` opens: the same plate, store, dictionary
    command = [sys.executable, str(NAPARI_SESSION), str(inputs.plate), str(inputs.store)]
    # napari's settings (a remembered reader) go to a folder of the test's own
    env = {"NAPARI_CONFIG": str(tmp_path / "napari-settings.yaml")}
    result, log = _run_scripted(tmp_path, [*command, str(inputs.dictionary)], **env)
    _check_steps(result, log)
