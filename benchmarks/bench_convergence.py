"""How many samples a dictionary needs on one plate's cells: FVU against samples seen.

The setting of a user training from the GUI on one plate: about 4,000 cell tokens of width 192
(the bundled model's), whitened, the CPU defaults (M = 1024, batch 1024; ICFL J = 8, L = 4;
TopK k = 32). Tokens are "planted" (32-sparse combinations of a random 1024-atom dictionary plus
noise, as in bench_dictionary) so that the run needs no embedding. Every ``--every`` steps the
FVU on 1,000 held-out tokens is recorded; the table gives FVU against samples and epochs, and
the epoch at which each method comes within 1% (relative) of the FVU it ends with, which is
what a default counted in epochs should cover. ``--figure`` writes the curves as a PNG.

Run: python benchmarks/bench_convergence.py [--steps 2000] [--every 50] [--figure out.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dictionary import make_data  # noqa: E402

from napari_concept_discovery.dictionary import (  # noqa: E402
    ICFL,
    ICFLConfig,
    TopKConfig,
    TopKSAE,
    train,
)
from napari_concept_discovery.dictionary.metrics import fvu  # noqa: E402


def heldout_fvu(model, x: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        x_hat = model.decode(model.encode(x))
    model.train(was)
    return float(fvu(x.numpy(), x_hat.numpy()))


def recorder(points: list, held: torch.Tensor, batch: int):
    """A checkpoint callback appending (samples, held-out FVU) to ``points``."""

    def on_checkpoint(model, step):
        points.append((step * batch, heldout_fvu(model, held)))

    return on_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--atoms", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    data = make_data("planted", args.tokens + 1000, args.dim, args.atoms, 32, 0)
    x, held = data[: args.tokens].numpy(), data[args.tokens :]
    print(
        f"{args.tokens} tokens x {args.dim}, M={args.atoms}, batch {args.batch}, "
        f"{args.steps} steps = {args.steps * args.batch / args.tokens:.0f} epochs"
    )
    curves = {}
    for name in ("icfl", "topk"):
        if name == "icfl":
            model = ICFL(args.dim, ICFLConfig(n_atoms=args.atoms), seed=0)
        else:
            model = TopKSAE(args.dim, TopKConfig(n_atoms=args.atoms, k=32), seed=0)
        points: list[tuple[int, float]] = []
        t = time.perf_counter()
        train(
            model,
            x,
            steps=args.steps,
            batch_size=args.batch,
            on_checkpoint=recorder(points, held, args.batch),
            checkpoint_every=args.every,
        )
        curves[name] = (points, time.perf_counter() - t)

    print(f"\n{'samples':>9s} {'epochs':>7s} " + " ".join(f"{n + ' FVU':>10s}" for n in curves))
    rows = list(zip(*(c[0] for c in curves.values()), strict=True))
    for row in rows:
        samples = row[0][0]
        print(
            f"{samples:9d} {samples / args.tokens:7.1f} " + " ".join(f"{f:10.4f}" for _, f in row)
        )
    for name, (points, sec) in curves.items():
        final = points[-1][1]
        first = next(s for s, f in points if f <= final * 1.01)
        print(
            f"{name}: final FVU {final:.4f} after {sec:.0f} s; within 1% of it from "
            f"{first} samples = {first / args.tokens:.0f} epochs"
        )
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (points, _) in curves.items():
            s, f = zip(*points, strict=True)
            ax.plot(np.array(s) / args.tokens, f, label=name)
        ax.set_xlabel(f"epochs over {args.tokens} tokens")
        ax.set_ylabel("held-out FVU")
        ax.set_xscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
