"""Cost of CellProfiler's measurements (cp-measure) per 512 px site, against embedding the same
site with the bundled default model (the anchor: what every site already costs).

``analysis.measurements.measure_site`` runs cp-measure's intensity, texture (numba kernel),
granularity, size/shape and radial-distribution featurizers per stain and compartment; this
prints, per synthetic site (three cell types, fixed seeds), the cells, the seconds to measure all
of them, the seconds with a seeded sample of ``--sample`` cells, the seconds to embed the site
(cell tokens, the channel tokens side by side, as the product does) and the ratio. It also
times each featurizer once on the first site, so a slow one can be named. Run on a quiet
machine for numbers to quote; on a shared one compare the columns of one run:

    python benchmarks/bench_measurements.py [--size 512] [--sample 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import add_threads, use_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sample", type=int, default=50)
    add_threads(ap, 1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    use_threads(args.threads)
    from napari_concept_discovery.analysis import measurements as M
    from napari_concept_discovery.embed.compute import embed_site
    from napari_concept_discovery.models import load_model
    from napari_concept_discovery.synth.site import generate_site

    backend = load_model("default")
    sites = [
        generate_site(ct, "mito_fragmentation", size=args.size, seed=args.seed + i)
        for i, ct in enumerate(("HUVEC", "HEPG2", "U2OS"))
    ]
    names = list(sites[0].channel_names)
    M.measure_site(sites[0].image[:, :64, :64], sites[0].cells[:64, :64], names)  # compile
    print(f"{args.size} px sites, {len(names)} stains, cells / nuclei / cytoplasm; seconds")
    print(f"{'cell type':>9} {'cells':>5} {'measure':>8} {'sample':>7} {'embed':>6} {'ratio':>6}")
    for site, ct in zip(sites, ("HUVEC", "HEPG2", "U2OS"), strict=True):
        n = len(np.unique(site.cells)) - 1
        t = time.perf_counter()
        M.measure_site(site.image, site.cells, names)
        full = time.perf_counter() - t
        t = time.perf_counter()
        M.measure_site(site.image, site.cells, names, max_cells=args.sample, seed=0)
        sample = time.perf_counter() - t
        t = time.perf_counter()
        embed_site(site.image, backend, labels=site.cells, channel_tokens=True)
        embed = time.perf_counter() - t
        print(f"{ct:>9} {n:5d} {full:8.2f} {sample:7.2f} {embed:6.2f} {full / embed:6.1f}")
    # where the time goes, per featurizer, on the first site's cells (one stain)
    site = sites[0]
    funcs = M._featurizers()
    image = M._unit_scale(site.image)
    from skimage.segmentation import relabel_sequential

    mask = relabel_sequential(site.cells)[0]
    print("one stain, Cells, first site:")
    calls = {
        "intensity": lambda: funcs["intensity"](mask, image[4]),
        "texture": lambda: funcs["texture"](mask, image[4], scale=3, gray_levels=256),
        "granularity": lambda: funcs["granularity"](
            mask, image[4], granular_spectrum_length=M.GRANULARITY_STEPS, **M.GRANULARITY
        ),
        "sizeshape": lambda: funcs["sizeshape"](mask, None, calculate_advanced=False),
        "radial": lambda: funcs["radial"](mask, image[4], bin_count=M.RADIAL_BINS),
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            print(f"  {name:12s} {time.perf_counter() - t:6.3f}")


if __name__ == "__main__":
    main()
