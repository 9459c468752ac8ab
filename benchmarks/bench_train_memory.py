"""Peak memory and tokens/s of dictionary training on 1 million tokens: streamed vs in memory.

Training reads a store's tokens through ``training.iterate_batches``: a zarr array is read one
block of whole chunks at a time into a shuffle buffer of a few batches, so memory should stay
bounded by the batch (and the model), whatever the store's size; a numpy array is indexed
directly. Whitening is applied once to the whole set when the raw and whitened tokens fit in
``training.WHITEN_ONCE_BYTES`` (1 GiB), else batch by batch; this benchmark runs both sides of
that limit. Each arm runs in a fresh process so its peak RSS (``ru_maxrss``) is its own; the
"baseline" arm imports everything and builds the model without training, so the differences
are what the tokens cost.

    python benchmarks/bench_train_memory.py [--tokens 1000000] [--dim 384] [--steps 200]

Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch, zarr
from napari_concept_discovery.dictionary import build_model
from napari_concept_discovery.dictionary.training import train
from napari_concept_discovery.dictionary.whiten import Whitener

arm, path, steps, batch, atoms, k = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(1)
data = zarr.open_array(path, mode="r")
n, d = data.shape
whitener = None
if arm.endswith("whitened"):
    rng = np.random.default_rng(0)
    controls = np.asarray(data[: 20000], dtype=np.float64)
    whitener = Whitener(mode="pca", shrinkage="auto").fit(controls)
if arm.startswith("in memory"):
    data = np.asarray(data[:], dtype=np.float32)
model = build_model("topk", d if whitener is None else whitener.n_components_, {"n_atoms": atoms, "k": k}, seed=0)
t = time.perf_counter()
if arm != "baseline":
    result = train(model, data, steps=steps, batch_size=batch, seed=0, whitener=whitener)
    assert result.steps_done == steps
wall = time.perf_counter() - t
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall": wall, "tokens_per_s": steps * batch / wall if arm != "baseline" else 0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384, help="token width (OpenPhenom: 384)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--atoms", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the tokens here")
    args = ap.parse_args()

    import numpy as np
    import zarr

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"tokens-{args.tokens}x{args.dim}.zarr"
    if not path.exists():
        t = time.perf_counter()
        rows = 1 << 14
        arr = zarr.create_array(
            str(path), shape=(args.tokens, args.dim), chunks=(rows, args.dim), dtype="float32"
        )
        rng = np.random.default_rng(0)
        basis = rng.standard_normal((64, args.dim)).astype(np.float32)
        for start in range(0, args.tokens, rows):
            m = min(rows, args.tokens - start)
            z = rng.standard_normal((m, 64)).astype(np.float32) * (rng.random((m, 64)) < 0.1)
            arr[start : start + m] = z @ basis + 0.1 * rng.standard_normal((m, args.dim))
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    raw_mib = args.tokens * args.dim * 4 / 2**20
    print(
        f"bench_train_memory: {args.tokens:,} tokens x {args.dim} float32 ({raw_mib:,.0f} MiB), "
        f"TopK M={args.atoms} k={args.k}, batch {args.batch}, {args.steps} steps, 1 torch thread; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    arms = ["baseline", "streamed", "streamed, whitened", "in memory", "in memory, whitened"]
    print(f"{'arm':24s} {'peak MiB':>9s} {'over baseline':>14s} {'tokens/s':>10s} {'wall s':>7s}")
    base = None
    for arm in arms:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                arm,
                str(path),
                str(args.steps),
                str(args.batch),
                str(args.atoms),
                str(args.k),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = r["peak_mib"] if base is None else base
        tps = f"{r['tokens_per_s']:,.0f}" if arm != "baseline" else "-"
        print(
            f"{arm:24s} {r['peak_mib']:9.0f} {r['peak_mib'] - base:14.0f} {tps:>10s} "
            f"{r['wall']:7.1f}"
        )
    once = args.tokens * 2 * args.dim * 4 <= 1 << 30
    print(
        "streamed: bounded by the shuffle buffer (a few batches) whatever the store's size. "
        "whitened: the whole set is whitened once when raw + whitened fit in 1 GiB; here it "
        + ("is (so the whitened arms hold it all)" if once else "is not: whitened batch by batch")
    )


if __name__ == "__main__":
    main()
