"""Dictionary learning side by side: our TopK SAE, our ICFL (Gram and plain pursuit), sparsify.

Same data for every method (100,000 x 384 unit-norm tokens; "random": Gaussian directions;
"planted": 32-sparse combinations of a random unit-norm 4096-atom dictionary plus noise), the
same batches in the same order, M = 4096 atoms, 32 non-zeros per token (TopK k = 32; ICFL
J = 8, L = 4, and J = 4, L = 8 as "icfl-gram-4x8"), batch 4096. The methods train in lockstep,
a few steps each in turn, so that load from other processes on a shared CPU falls on all of
them alike; read the ratios, not the absolute rates. Reported per method: samples/s (first step excluded), peak memory (extra
resident memory of a separate process running the same steps, over its baseline with the data
loaded), FVU / mean cosine / L0 / dead fraction on 10,000 held-out tokens after the same number
of training samples (metrics as in DESIGN.md, one code path for all).

The anchor is EleutherAI's sparsify (``SparseCoder``), trained with the loop of its
``Trainer`` (b_dec at the first batch's mean, Adam at 2e-4 / sqrt(M / 2^14) without warm-up,
the gradient parallel to each atom removed, unit-norm atoms, AuxK at 1/32). It is not a project
dependency; install it into the venv for this script only, without letting pip replace torch:

    pip install --no-deps eai-sparsify einops simple-parsing schedulefree accelerate \\
        transformers datasets regex multiprocess dill xxhash

(``import sparsify`` imports its trainer, hence transformers/datasets/accelerate.)

Threads: one torch thread by default. The machines this runs on are shared; with two threads,
every parallel operation waits for the slower thread whenever another process holds a core,
which penalises methods made of many short operations (ICFL's pursuit) far more than one large
matmul. ``--threads 2`` runs it the other way.

``--device cuda`` runs every method (sparsify too) on the GPU, the data on it; peak memory is
then the GPU memory allocated. benchmarks/gpu_run.sh runs it so.

Run: python benchmarks/bench_dictionary.py [--steps 30] [--threads 1] [--device cpu]
     (prints the tables and writes them to benchmarks/results/bench_dictionary.txt; --out ''
     keeps none)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import default_path, results_file  # noqa: E402

# sparsify picks its Triton decoder whenever triton imports (it comes with torch), and that
# decoder needs a GPU; its own switch selects the eager (embedding_bag) decoder on a CPU
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

METHODS = ("topk", "icfl-gram", "icfl-plain", "icfl-gram-4x8", "sparsify")


def make_data(kind: str, n: int, d: int, m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    else:
        w = torch.randn(m, d, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        idx = torch.rand(n, m, generator=g).topk(k, dim=1).indices if n * m <= 5e8 else None
        if idx is None:
            idx = torch.cat(
                [
                    torch.rand(min(20000, n - s), m, generator=g).topk(k, 1).indices
                    for s in range(0, n, 20000)
                ]
            )
        vals = 0.5 + torch.rand(n, k, generator=g)
        x = torch.nn.functional.embedding_bag(idx, w, per_sample_weights=vals, mode="sum")
        x += 0.01 * torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


class Ours:
    def __init__(self, name, d, m, k, dead_tokens, seed, first_batch):
        device = first_batch.device
        from napari_concept_discovery.dictionary import ICFL, ICFLConfig, TopKConfig, TopKSAE

        if name == "topk":
            self.model = TopKSAE(d, TopKConfig(n_atoms=m, k=k, dead_tokens=dead_tokens), seed=seed)
        else:
            # J x L = k non-zeros: L = 4 (J = 8 at k = 32) unless the name says "-JxL"
            parts = name.split("-")
            n_iter, n_pick = (k // 4, 4) if len(parts) < 3 else map(int, parts[2].split("x"))
            cfg = ICFLConfig(n_atoms=m, n_iter=n_iter, n_pick=n_pick, pursuit=parts[1])
            self.model = ICFL(d, cfg, seed=seed)
        self.model.train()
        # initialised on the CPU with the CPU generator (same atoms on every device), then moved
        self.model.init_from_data(first_batch.cpu(), torch.Generator().manual_seed(seed))
        self.model.to(device)
        self.opt = self.model.make_optimizer()

    def step(self, i: int, x: torch.Tensor) -> float:
        out = self.model(x)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.model.before_step()
        self.opt.step()
        self.model.after_step(i, self.opt)
        return float(out.loss.detach())

    @torch.no_grad()
    def reconstruct(self, x):
        self.model.eval()
        codes = self.model.encode(x)
        out = self.model.decode(codes)
        self.model.train()
        return out, codes.values, codes.indices


class Sparsify:
    def __init__(self, name, d, m, k, dead_tokens, seed, first_batch):
        try:
            from sparsify import SparseCoder, SparseCoderConfig
        except ImportError as exc:
            raise SystemExit(
                f"sparsify is not installed ({exc}); see this script's header for the pip command, "
                "or leave it out with --methods topk,icfl-gram,icfl-plain"
            ) from exc
        torch.manual_seed(seed)
        device = first_batch.device
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k)).to(device)
        self.sae.b_dec.data = first_batch.mean(0)  # as its Trainer does on the first step
        self.sae.set_decoder_norm_to_unit_norm()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=2e-4 / math.sqrt(m / 2**14))
        self.since_fired = torch.zeros(m, dtype=torch.long, device=device)
        self.dead_tokens = dead_tokens

    def step(self, i: int, x: torch.Tensor) -> float:
        dead = self.since_fired > self.dead_tokens
        out = self.sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            self.since_fired += len(x)
            self.since_fired[fired] = 0
        return float(loss)

    @torch.no_grad()
    def reconstruct(self, x):
        enc = self.sae.encode(x)
        return self.sae.decode(enc.top_acts, enc.top_indices), enc.top_acts, enc.top_indices


def build(name, *a):
    return Sparsify(name, *a) if name == "sparsify" else Ours(name, *a)


def evaluate(runner, x: torch.Tensor, m: int) -> dict:
    from napari_concept_discovery.dictionary.base import Codes, codes_to_csr
    from napari_concept_discovery.dictionary.metrics import (
        activation_counts,
        dead_mask,
        fvu,
        l0,
        mean_cosine,
    )

    x_hat, values, indices = runner.reconstruct(x)
    x, x_hat = x.cpu(), x_hat.cpu()
    codes = codes_to_csr(Codes(values.cpu(), indices.cpu()), m)
    dead = dead_mask(activation_counts(codes), x.shape[0])
    return {
        "fvu": fvu(x.numpy(), x_hat.numpy()),
        "cosine": mean_cosine(x.numpy(), x_hat.numpy()),
        "l0": l0(codes),
        "dead": float(dead.mean()),
    }


def batches(n, batch, steps, seed):
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n) + 1)])
    return [torch.from_numpy(np.sort(order[i * batch : (i + 1) * batch])) for i in range(steps)]


def memory_probe(args) -> None:
    """Run in a child process: extra peak RSS (MiB) of a few steps of one method."""
    torch.set_num_threads(args.threads)
    x = make_data("random", args.tokens, args.dim, args.atoms, args.k, args.seed)
    x = x.to(args.device)
    order = batches(args.tokens, args.batch, 3, args.seed)
    runner = build(
        args.probe, args.dim, args.atoms, args.k, args.dead_tokens, args.seed, x[order[0]]
    )
    gpu = x.device.type == "cuda"
    if gpu:  # device memory, not host memory, is what a GPU run is short of
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1024
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, rows in enumerate(order, 1):
        runner.step(i, x[rows])
    peak = (
        torch.cuda.max_memory_allocated() / 1024
        if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    print(json.dumps({"extra_mib": (peak - base) / 1024, "peak_mib": peak / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--atoms", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30, help="training steps per method and dataset")
    p.add_argument("--round", type=int, default=3, help="steps per method per turn")
    p.add_argument("--eval", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu | cuda: where data and every method live (peak "
        "memory is then GPU memory allocated)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dead-tokens", type=int, default=1_000_000)
    p.add_argument("--datasets", default="random,planted")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--out", default=default_path("bench_dictionary"), help="also write it here")
    args = p.parse_args()
    if args.probe:
        return memory_probe(args)
    with results_file(args.out):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    t_start = time.perf_counter()
    where = args.device
    if args.device.startswith("cuda"):
        where = f"{args.device} ({torch.cuda.get_device_name(args.device)})"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {where}, "
        f"load {os.getloadavg()}"
    )
    print(
        f"{args.tokens} x {args.dim} tokens, M={args.atoms}, {args.k} non-zeros, batch "
        f"{args.batch}, {args.steps} steps = {args.steps * args.batch} samples per method"
    )
    if "sparsify" in methods:
        import importlib.metadata as md

        build("sparsify", 4, 8, 2, 1, 0, torch.zeros(2, 4))  # fails early with the install hint
        print(f"sparsify {md.version('eai-sparsify')}")

    memory = {}
    for name in methods:
        cmd = [
            sys.executable,
            __file__,
            "--probe",
            name,
            "--threads",
            str(args.threads),
            "--tokens",
            str(args.tokens),
            "--dim",
            str(args.dim),
            "--atoms",
            str(args.atoms),
            "--k",
            str(args.k),
            "--batch",
            str(args.batch),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])

    results = {}
    for kind in args.datasets.split(","):
        data = make_data(kind, args.tokens + args.eval, args.dim, args.atoms, args.k, args.seed)
        data = data.to(args.device)
        x, held = data[: args.tokens], data[args.tokens :]
        order = batches(args.tokens, args.batch, args.steps, args.seed + 1)
        runners = {
            n: build(n, args.dim, args.atoms, args.k, args.dead_tokens, args.seed, x[order[0]])
            for n in methods
        }
        seconds = dict.fromkeys(methods, 0.0)
        for start in range(0, args.steps, args.round):
            for name, runner in runners.items():
                for i in range(start, min(start + args.round, args.steps)):
                    xb = x[order[i]]
                    t = time.perf_counter()
                    runner.step(i + 1, xb)
                    if i > 0:
                        seconds[name] += time.perf_counter() - t
        for name, runner in runners.items():
            results[kind, name] = {
                "samples_s": (args.steps - 1) * args.batch / seconds[name],
                **evaluate(runner, held, args.atoms),
            }
        del runners

    for kind in args.datasets.split(","):
        print(
            f"\n[{kind}] after {args.steps * args.batch} samples; eval on {args.eval} held-out tokens"
        )
        print(
            f"{'method':<12}{'samples/s':>11}{'peak MiB':>10}{'FVU':>9}{'cosine':>9}{'L0':>7}"
            f"{'dead':>8}"
        )
        for name in methods:
            r = results[kind, name]
            print(
                f"{name:<12}{r['samples_s']:>11.0f}{memory[name]['extra_mib']:>10.0f}"
                f"{r['fvu']:>9.4f}{r['cosine']:>9.4f}{r['l0']:>7.1f}{r['dead']:>8.4f}"
            )
        base = results[kind, "topk"] if "topk" in methods else None
        if base and "sparsify" in methods:
            s = results[kind, "sparsify"]
            ratio = base["samples_s"] / s["samples_s"]
            rel = (base["fvu"] - s["fvu"]) / s["fvu"]
            ok = ratio >= 1.0 and rel <= 0.02
            print(
                f"  our TopK / sparsify samples/s = {ratio:.2f}x (bar >= 1.0x); FVU "
                f"{base['fvu']:.4f} vs {s['fvu']:.4f} ({100 * rel:+.1f}%, bar <= +2%): "
                f"{'PASS' if ok else 'FAIL'}"
            )
        if base and "icfl-gram" in methods:
            g = results[kind, "icfl-gram"]
            ratio = g["samples_s"] / base["samples_s"]
            print(
                f"  ICFL Gram / our TopK samples/s = {ratio:.2f}x (bar >= 0.85x): "
                f"{'PASS' if ratio >= 0.85 else 'FAIL'}"
            )
            if "icfl-plain" in methods:
                pl = results[kind, "icfl-plain"]
                print(
                    f"  ICFL Gram / ICFL plain samples/s = {g['samples_s'] / pl['samples_s']:.2f}x"
                )
            if "icfl-gram-4x8" in methods:
                g48 = results[kind, "icfl-gram-4x8"]
                print(
                    f"  ICFL Gram J=4, L=8 / our TopK samples/s = "
                    f"{g48['samples_s'] / base['samples_s']:.2f}x (same 32 non-zeros, half the passes)"
                )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
