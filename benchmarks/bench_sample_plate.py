"""Seconds from napari's sample plate to a trained dictionary, with the widgets' defaults.

What a first-time user does: File > Open Sample > Synthetic Cell Painting plate, then Embed
(the bundled model, the form as it opens) and Train in the Dictionary widget (the form as it
opens, whitening on the controls it picks). Each step is the widget's own button handler in a
viewer; the times are wall-clock until the store, then the dictionary, are the session's. The
sample plate is written to a fresh cache folder, so its generation is timed too. The bar: a
minute for embed + train on a laptop CPU. Not a test. Run under Xvfb:

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_sample_plate.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (before Qt, see docs/architecture.md)

sys.path.insert(0, str(Path(__file__).parent))
from _report import print_and_keep  # noqa: E402

BAR_S = 60.0
PLUGIN = "napari-concept-discovery"


def wait(app, condition, timeout: float = 1800.0) -> float:
    t0 = time.perf_counter()
    while not condition():
        app.processEvents()
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the widget did not finish in time")
        time.sleep(0.01)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_CONCEPT_DISCOVERY_CACHE"] = tmp
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_concept_discovery._sample_data import SAMPLE_ARGS
        from napari_concept_discovery.widgets import DictionaryWidget, EmbedWidget, get_session

        viewer = napari.Viewer(show=False)
        app = QApplication.instance()
        t = time.perf_counter()
        viewer.open_sample(PLUGIN, "synthetic_plate")
        session = get_session(viewer)
        wait(app, lambda: session.plate is not None)
        sample_s = time.perf_counter() - t
        plate = session.plate
        _, embed = viewer.window.add_plugin_dock_widget(PLUGIN, "Embed")
        _, dictionary = viewer.window.add_plugin_dock_widget(PLUGIN, "Dictionary")
        assert isinstance(embed, EmbedWidget) and isinstance(dictionary, DictionaryWidget)

        model = embed.settings().model
        t, c = time.perf_counter(), time.process_time()
        embed.run()
        wait(app, lambda: session.store is not None and not embed.jobs.busy)
        embed_s, embed_cpu = time.perf_counter() - t, time.process_time() - c
        print(f"embed: {embed_s:.1f} s ({embed_cpu:.1f} s CPU)", flush=True)
        store = session.store
        wait(app, lambda: not dictionary.jobs.busy)  # the form's control dropdowns are filled
        settings = dictionary.settings()
        t, c = time.perf_counter(), time.process_time()
        dictionary.train()
        wait(app, lambda: session.dictionary is not None and not dictionary.training)
        train_s, train_cpu = time.perf_counter() - t, time.process_time() - c
        print(f"train: {train_s:.1f} s ({train_cpu:.1f} s CPU)", flush=True)
        status = dictionary.status.text()
        n_cells = int(store.tokens("cell").shape[0])
        n_patches = int(store.tokens("patch").shape[0])
        viewer.close()

    total = embed_s + train_s
    lines = [
        f"bench_sample_plate: sample plate {SAMPLE_ARGS} -> {len(plate)} sites, "
        f"{n_cells} cells, {n_patches} patches; model {model}",
        f"dictionary form: {settings.method} on {settings.unit} tokens, {settings.atoms} atoms, "
        f"{settings.steps} steps, batch {settings.batch_size}, whiten {settings.whiten}",
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} (CPU: this process, all threads)",
        f"sample plate written and shown: {sample_s:6.1f} s",
        f"embed (Embed widget):           {embed_s:6.1f} s  {embed_cpu:6.1f} s CPU",
        f"train (Dictionary widget):      {train_s:6.1f} s  {train_cpu:6.1f} s CPU  ({status})",
        f"embed + train:                  {total:6.1f} s  {embed_cpu + train_cpu:6.1f} s CPU  "
        f"bar {BAR_S:.0f} s: " + ("PASS" if total <= BAR_S else "FAIL"),
    ]
    print_and_keep(lines, args.out)


if __name__ == "__main__":
    main()
