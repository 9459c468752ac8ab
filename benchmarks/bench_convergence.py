"""How many samples a dictionary needs: held-out FVU against samples seen, ICFL and TopK.

The setting of a user training on one plate's cells: about 4,000 cell tokens of width 192 (the
bundled model's), and a larger set (40,000, a few plates) to see how the rule scales. The CPU
defaults: M = 1024, batch 1024, ICFL J = 8, L = 4, TopK k = 32. Tokens are "planted" (32-sparse
combinations of a random 1024-atom dictionary plus noise, unit norm, as in bench_dictionary) so
that the run needs no embedding. Every ``--every`` steps the FVU on 2,000 held-out tokens is
recorded. For each set and method the table gives FVU against samples and passes over the data
(epochs), the first epoch from which the held-out FVU stays within 2% (relative) of the best it
reaches in the run, and the FVU at the steps the default rule chooses (``first_steps``:
``FIRST_EPOCHS`` passes within ``FIRST_STEPS``), which is what the default has to justify.

The figure (``--figure``, docs/images/convergence.png by default) shows the curves, one panel per
token set, with the default's steps marked.

Run: python benchmarks/bench_convergence.py
     (about 5 minutes on a busy 2-core machine; writes benchmarks/results/bench_convergence.txt
     and the figure; --out '' / --figure '' keep none)
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
from _report import default_path, results_file  # noqa: E402
from bench_dictionary import make_data  # noqa: E402

from napari_concept_discovery.dictionary import ICFL, ICFLConfig, TopKConfig, TopKSAE, train
from napari_concept_discovery.dictionary.metrics import fvu
from napari_concept_discovery.dictionary.settings import FIRST_EPOCHS, FIRST_STEPS, first_steps

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.02  # "converged": held-out FVU within 2% (relative) of the run's best


def heldout_fvu(model, x: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        x_hat = model.decode(model.encode(x))
    model.train(was)
    return float(fvu(x.numpy(), x_hat.numpy()))


def build(name: str, dim: int, atoms: int):
    if name == "icfl":
        return ICFL(dim, ICFLConfig(n_atoms=atoms, n_iter=8, n_pick=4), seed=0)
    return TopKSAE(dim, TopKConfig(n_atoms=atoms, k=32), seed=0)


def curve(name, x, held, args, steps) -> tuple[list[tuple[int, float]], float]:
    """[(samples, held-out FVU)] every ``args.every`` steps (and at the default's steps)."""
    model = build(name, x.shape[1], args.atoms)
    default = first_steps(len(x), args.batch)
    points: list[tuple[int, float]] = []

    per_step = min(args.batch, len(x))  # a batch is never larger than the data

    def on_checkpoint(m, step):
        if step % args.every == 0 or step in (1, 2, 5, 10, default, steps):
            points.append((step * per_step, heldout_fvu(m, held)))

    t = time.perf_counter()
    result = train(model, x, steps=steps, batch_size=args.batch, on_checkpoint=on_checkpoint,
                   checkpoint_every=1)  # fmt: skip
    sec = time.perf_counter() - t
    # the training batches' FVU over the last tenth of the run, against the held-out FVU
    tail = [p.info["fvu"] for p in result.history if p.done > 0.9 * steps]
    return points, sec, float(np.mean(tail))


def summary(points, n_tokens: int, default_samples: int) -> dict:
    samples = np.array([s for s, _ in points])
    f = np.array([v for _, v in points])
    best = float(f.min())
    ok = f <= best * (1 + WITHIN)
    # the first point from which every later point stays within WITHIN of the best
    settled = int(np.flatnonzero(~ok)[-1] + 1) if (~ok).any() else 0
    at_default = float(f[np.flatnonzero(samples == default_samples)[0]])
    return {
        "best": best,
        "best_epochs": samples[int(f.argmin())] / n_tokens,
        "final": float(f[-1]),
        "settled_epochs": samples[settled] / n_tokens if settled < len(f) else None,
        "at_default": at_default,
        "default_gap": at_default / best - 1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="4000,40000", help="token set sizes, comma-separated")
    p.add_argument("--held", type=int, default=2000, help="held-out tokens")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--atoms", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run (default: 150 epochs, <= 1000)",
    )
    p.add_argument("--every", type=int, default=20, help="steps between held-out evaluations")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: least disturbed by a shared machine)",
    )
    p.add_argument("--figure", default=str(ROOT / "docs" / "images" / "convergence.png"))
    p.add_argument("--out", default=default_path("bench_convergence"))
    args = p.parse_args()
    with results_file(args.out):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    sizes = [int(s) for s in args.tokens.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    print(
        f"planted tokens x {args.dim}, M={args.atoms}, batch {args.batch}, ICFL J=8 L=4, TopK "
        f"k=32; held-out FVU on {args.held} tokens every {args.every} steps"
    )
    print(f"default rule: {FIRST_EPOCHS} passes over the tokens, within {FIRST_STEPS} steps")
    runs = {}
    for n in sizes:
        data = make_data("planted", n + args.held, args.dim, args.atoms, 32, 0)
        x, held = data[:n].numpy(), data[n:]
        default = first_steps(n, args.batch)
        batch = min(args.batch, n)  # samples per step
        steps = args.steps or min(-(-150 * n // batch), FIRST_STEPS[1])
        steps = max(steps, default)
        curves = {name: curve(name, x, held, args, steps) for name in ("icfl", "topk")}
        runs[n] = (default, steps, curves)

        print(
            f"\n[{n} tokens] {steps} steps = {steps * batch / n:.0f} epochs; the default "
            f"rule gives {default} steps = {default * batch / n:.0f} epochs"
        )
        print(f"{'samples':>9s} {'epochs':>7s} " + " ".join(f"{m + ' FVU':>10s}" for m in curves))
        rows = zip(*(c[0] for c in curves.values()), strict=True)
        for row in rows:
            samples = row[0][0]
            mark = "  <- default" if samples == default * batch else ""
            print(
                f"{samples:9d} {samples / n:7.1f} " + " ".join(f"{f:10.4f}" for _, f in row) + mark
            )
        for name, (points, sec, train_fvu) in curves.items():
            s = summary(points, n, default * batch)
            settled = s["settled_epochs"]
            print(
                f"{name}: held-out FVU best {s['best']:.4f} (at {s['best_epochs']:.0f} epochs), "
                f"final {s['final']:.4f} (training batches {train_fvu:.4f}); "
                + (
                    f"within {WITHIN:.0%} of the best from {settled:.0f} epochs on"
                    if settled is not None
                    else f"not within {WITHIN:.0%} of the best at the end"
                )
                + f"; at the default {s['at_default']:.4f} ({100 * s['default_gap']:+.1f}% vs "
                f"best); {sec:.0f} s for {steps} steps ({sec / steps * 1e3:.0f} ms/step)"
            )
    if args.figure:
        figure(runs, sizes, args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load {os.getloadavg()}")


def figure(runs, sizes, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_concept_discovery._files import atomic_path

    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        default, _, curves = runs[n]
        batch = min(args.batch, n)
        for name, (points, *_) in curves.items():
            s, f = zip(*points, strict=True)
            ax.plot(s, f, marker=".", ms=3, label={"icfl": "ICFL", "topk": "TopK SAE"}[name])
        ax.axvline(default * batch, color="0.4", ls="--", lw=1)
        ax.annotate(
            f"default: {default} steps\n({default * batch / n:.0f} epochs)",
            (default * batch, 0.97),
            xycoords=("data", "axes fraction"),
            ha="right",
            va="top",
            fontsize=8,
            xytext=(-4, 0),
            textcoords="offset points",
        )
        ax.set_xscale("log")
        ax.set_xlabel("training samples")
        ax.set_title(f"{n:,} tokens (M={args.atoms}, batch {args.batch})", fontsize=10)
        top = ax.secondary_xaxis("top", functions=(lambda s, n=n: s / n, lambda e, n=n: e * n))
        top.set_xlabel("epochs", fontsize=8)
        top.tick_params(labelsize=8)
    axes[0][0].set_ylabel("held-out FVU")
    axes[0][0].legend()
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.figure) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
