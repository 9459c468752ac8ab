"""Time to write the standard synthetic plate set (2 plates x 24 wells x 2 sites x 512 px).

Prints wall time, sites/s and cells/s, then the per-site cost of generation alone and of
segmentation, so that a slowdown can be placed. Target: well under a minute on a
2-core machine.

    python benchmarks/bench_synth.py [--workers N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import pandas as pd

from napari_concept_discovery.segment.site import matched_f1, segment_site
from napari_concept_discovery.synth import generate_site, write_synthetic_plates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the plates here (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_synth_")
    try:
        t0 = time.perf_counter()
        write_synthetic_plates(
            out, n_plates=2, n_wells=24, n_sites=2, size=512, seed=0, workers=args.workers
        )
        wall = time.perf_counter() - t0
        truth = pd.read_csv(os.path.join(out, "truth.csv"))
        n_sites = 2 * 24 * 2
        size_mb = (
            sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
            / 2**20
        )
        print("synthetic plates: 2 plates x 24 wells x 2 sites, 512x512 px, 6 channels")
        print(f"  workers           {args.workers or 'auto'} (cpu_count={os.cpu_count()})")
        print(f"  wall time         {wall:.1f} s")
        print(f"  sites/s           {n_sites / wall:.2f}")
        print(f"  cells             {len(truth)}  ({len(truth) / wall:.0f} cells/s)")
        print(f"  on disk           {size_mb:.0f} MiB")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    # Single-process costs per site, for one site of each cell type.
    gen, seg, f1 = [], [], []
    for cell_type in ("HUVEC", "HEPG2", "U2OS"):
        t = time.perf_counter()
        site = generate_site(cell_type, "control", size=512, seed=1)
        gen.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, cells = segment_site(site.image, site.channel_names)
        seg.append(time.perf_counter() - t)
        f1.append(matched_f1(cells, site.cells))
    print("one process, per 512 px site (HUVEC, HEPG2, U2OS):")
    print("  generate          " + "  ".join(f"{x * 1000:.0f} ms" for x in gen))
    print("  segment           " + "  ".join(f"{x * 1000:.0f} ms" for x in seg))
    print("  cell F1 @ IoU 0.5 " + "  ".join(f"{x:.3f}" for x in f1))


if __name__ == "__main__":
    main()
