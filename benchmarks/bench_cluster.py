"""Embedding several plates on a Dask cluster: throughput and per-process peak memory.

Embeds N synthetic plate folders (one store each) with the default model three ways, each in a
fresh child process so that peak memory belongs to one run only:

- ``single``: the anchor, every plate in one process with torch on all of this machine's cores
  (what ``concept-discovery embed P1 P2 ...`` does without ``--workers``);
- ``workers=1`` and ``workers=2``: a local Dask cluster of that many worker processes, one
  thread each (``embed ... --workers N``); the client process loads the model once too, to sign
  the stores.

For each: plates/s and tiles/s over the embedding, model loads included (the cluster's start-up
is timed apart), and
the peak RSS of every process (client and each worker; the workers' maxima are read with
``getrusage`` in the workers themselves). The stores of every run are compared with the
anchor's (largest token difference; float16 rounding allowed). Throughput on a cluster grows
with cores: a machine with fewer cores than workers shares them, so read the 2-worker figure
against the number of cores printed at the top.

    python benchmarks/bench_cluster.py [--plates 3] [--wells 4] [--sites 1] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_cluster.txt"


def _mib(kib: int) -> float:
    return kib / 1024.0  # ru_maxrss is in KiB on Linux


def run_mode(mode: str, folders: list[Path], out: Path) -> dict:
    """Child side: embed ``folders`` into ``out/<name>.zarr`` one way; a JSON-able summary."""
    import torch

    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate, load_embed_model

    settings = EmbedSettings(model="default")
    outs = [out / f"{f.name}.zarr" for f in folders]
    summary: dict = {"mode": mode}
    if mode == "single":
        torch.set_num_threads(os.cpu_count() or 1)
        summary["threads"] = torch.get_num_threads()
        t = time.perf_counter()
        backend = load_embed_model(settings)  # once, as the CLI does for several plates
        stores = [
            embed_plate(f, settings, o, backend=backend) for f, o in zip(folders, outs, strict=True)
        ]
        summary["wall"] = time.perf_counter() - t
        summary["workers_rss"] = []
    else:
        from napari_concept_discovery.embed.cluster import connect, embed_plates_on_cluster

        n = int(mode.split("=")[1])
        t = time.perf_counter()
        client = connect(workers=n)
        client.wait_for_workers(n)
        summary["startup"] = time.perf_counter() - t
        summary["threads"] = sorted(client.run(torch.get_num_threads).values())
        t = time.perf_counter()
        stores = embed_plates_on_cluster(folders, settings, outs, client, sites_per_task=2)
        summary["wall"] = time.perf_counter() - t

        def peak() -> int:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        summary["workers_rss"] = [_mib(v) for v in client.run(peak).values()]
        cluster = client.cluster
        client.close()
        cluster.close()
    summary["client_rss"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    summary["tiles"] = sum(int(s.attrs["counts"]["crop"]) for s in stores)
    summary["cells"] = sum(int(s.attrs["counts"]["cell"]) for s in stores)
    summary["stores"] = [str(s.path) for s in stores]
    return summary


def max_difference(a: str, b: str) -> float:
    """Largest absolute difference between the tokens of two stores of the same plate."""
    import numpy as np

    from napari_concept_discovery.embed.store import UNITS, ActivationStore

    sa, sb = ActivationStore.open(a), ActivationStore.open(b)
    worst = 0.0
    for unit in UNITS:
        x = np.asarray(sa.tokens(unit), dtype=np.float32)
        y = np.asarray(sb.tokens(unit), dtype=np.float32)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--plates", type=int, default=3, help="plate folders (one store each)")
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--sites", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--modes", default="single,workers=1,workers=2")
    ap.add_argument("--data", type=Path, default=None, help="where the synthetic plates go")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
    args = ap.parse_args(argv)

    name = f"ncd_bench_cluster_{args.plates}x{args.wells}x{args.sites}x{args.size}"
    data = args.data or Path(tempfile.gettempdir()) / name
    folders = [data / f"plate{i + 1}" for i in range(args.plates)]
    if args.child:
        print(json.dumps(run_mode(args.child, folders, args.out)))
        return 0

    from napari_concept_discovery.synth import write_synthetic_plates

    for i, f in enumerate(folders):
        if not (f / "metadata.csv").exists():
            write_synthetic_plates(f, 1, args.wells, args.sites, args.size, seed=i)
    import torch

    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores (ONLY {os.cpu_count()}: two "
        "workers share them with the client and with whatever else runs here), torch "
        f"{torch.__version__}, load avg {os.getloadavg()[0]:.2f} at start",
        f"data: {args.plates} plate folders x {args.wells} wells x {args.sites} sites, "
        f"{args.size} px, 6 channels; model 'default'; 2 sites per Dask task",
    ]
    for line in lines:
        print(line, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            out = Path(tmp) / mode.replace("=", "")
            out.mkdir()
            cmd = [sys.executable, __file__, "--plates", str(args.plates), "--wells"]
            cmd += [str(args.wells), "--sites", str(args.sites), "--size", str(args.size)]
            cmd += ["--data", str(data), "--child", mode, "--out", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        anchor = results[0]
        diffs = [
            max(max_difference(a, b) for a, b in zip(anchor["stores"], r["stores"], strict=True))
            for r in results
        ]
    head = (
        f"{'run':10s} {'threads':>8s} {'start s':>8s} {'embed s':>8s} {'plates/s':>9s} "
        f"{'tiles/s':>8s} {'vs anchor':>9s} {'client MiB':>10s} {'worker peak MiB':>20s} "
        f"{'max |dtoken|':>12s}"
    )
    table = [head, "-" * len(head)]
    for r, diff in zip(results, diffs, strict=True):
        tps = r["tiles"] / r["wall"]
        workers = ", ".join(f"{v:.0f}" for v in r["workers_rss"]) or "-"
        start = f"{r['startup']:.1f}" if "startup" in r else "-"
        table.append(
            f"{r['mode']:10s} {str(r['threads']):>8s} {start:>8s} {r['wall']:8.1f} "
            f"{args.plates / r['wall']:9.3f} {tps:8.2f} "
            f"{tps / (anchor['tiles'] / anchor['wall']):9.2f} {r['client_rss']:10.0f} "
            f"{workers:>20s} {diff:12.2e}"
        )
    table.append(
        f"{anchor['tiles']} tiles, {anchor['cells']} cells per run; load avg "
        f"{os.getloadavg()[0]:.2f} at the end. 'single' is the anchor (one process, torch on "
        "all cores); workers run one torch thread each; max |dtoken| is the largest token "
        "difference from the anchor's stores (float16 patch tokens round at ~1e-3)."
    )
    for line in table:
        print(line)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines + table) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
