"""Where a training step of ICFL (Gram pursuit) and of our TopK SAE spends its time.

The bench_dictionary setting (M = 4096, D = 384, batch 4096, 32 non-zeros: ICFL J = 8, L = 4,
TopK k = 32), one torch thread. Two views of the same steps, both in CPU time of this thread
(``time.thread_time``), which other processes on a shared machine disturb far less than wall
time: the median step of each method over steps taken in turn, and a per-phase split of the
ICFL pursuit (each phase repeated on real picks). Last, torch's profiler table (self CPU time
per operator) for two steps of each.

Then the same for applying a trained dictionary to one 1080 x 1080 site (4,624 tokens, as in
bench_encode's viewer line): CPU ms of whitening, the coder and the CSR conversion, and the
profiler table of one site encode per method.

Run: python benchmarks/profile_icfl.py [--steps 9] [--no-table] [--out FILE]
     (writes benchmarks/results/profile_icfl.txt unless --out '')
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import default_path, results_file  # noqa: E402

from napari_concept_discovery.dictionary import ICFL, ICFLConfig, TopKConfig, TopKSAE
from napari_concept_discovery.dictionary import icfl as icfl_mod


def unit_tokens(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def build(name: str, d: int, m: int, x: torch.Tensor):
    if name == "topk":
        model = TopKSAE(d, TopKConfig(n_atoms=m, k=32), seed=0)
    else:
        model = ICFL(d, ICFLConfig(n_atoms=m, n_iter=8, n_pick=4), seed=0)
    model.train()
    model.init_from_data(x, torch.Generator().manual_seed(0))
    return model, model.make_optimizer()


def step(model, opt, x, i) -> None:
    out = model(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    model.before_step()
    opt.step()
    model.after_step(i, opt)


def cpu_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def phases(model: ICFL, x: torch.Tensor) -> dict[str, float]:
    """CPU ms of each part of one Gram pursuit of ``x`` (J = 8 picks, 7 score updates)."""
    cfg = model.config
    atoms = model.W.detach()
    r = x - model.b.detach()
    width = 128
    m = atoms.shape[0]
    n_blocks = m // width
    gram = icfl_mod.gram_blocks(atoms, width)
    blocks_t = atoms.view(n_blocks, width, -1).transpose(1, 2)
    scores = torch.matmul(r, blocks_t)
    block_max = scores.amax(2)
    rhs, picked = icfl_mod._pick_blocked(scores, block_max, cfg.n_pick)
    flat = gram.view(-1)
    s1, s2 = picked.unsqueeze(2), picked.unsqueeze(1)
    where = (s2 // width) * (m * width) + s1 * width + s2 % width
    coef = icfl_mod._solve(flat.take(where), rhs)
    rows = (torch.arange(n_blocks) * m).view(n_blocks, 1, 1)

    def score_update():
        cols = (rows + picked).view(-1, cfg.n_pick)
        update = icfl_mod._coefficient_matrix(cols, coef.expand(n_blocks, -1, -1), n_blocks * m)
        scores.view(-1, width).addmm_(update, gram.view(-1, width))
        torch.amax(scores, 2, out=block_max)

    j = cfg.n_iter
    return {
        "Gram matrix (symmetric, column blocks)": cpu_ms(
            lambda: icfl_mod.gram_blocks(atoms, width, gram)
        ),
        "first scores (B x D x M product)": cpu_ms(lambda: torch.matmul(r, blocks_t, out=scores)),
        f"picks x {j} (block maxima -> top-L)": j
        * cpu_ms(lambda: icfl_mod._pick_blocked(scores, block_max, cfg.n_pick)),
        f"G[S, S] + L x L solves x {j}": j * cpu_ms(lambda: icfl_mod._solve(flat.take(where), rhs)),
        f"score updates + block maxima x {j - 1}": (j - 1) * cpu_ms(score_update),
        "whole pursuit": cpu_ms(
            lambda: icfl_mod.pursuit_gram(r, atoms, cfg.n_iter, cfg.n_pick), repeat=3
        ),
    }


def phases_kernel(model: ICFL, x: torch.Tensor, huge: bool = True) -> dict[str, float]:
    """CPU ms of each part of the compiled CPU pursuit (``pursuit_cpu``), the path ICFL takes
    on a CPU: Gram rows, the first scores, then the kernel (every pick, solve, score update and
    block maxima of all J iterations, token by token). ``huge``: G and the scores on 2 MiB
    pages, as the library allocates them; else on ordinary 4 KiB pages."""
    from napari_concept_discovery.dictionary import pursuit_cpu
    from napari_concept_discovery.dictionary.base import huge_empty

    cfg = model.config
    atoms = model.W.detach()
    r = x - model.b.detach()
    m = atoms.shape[0]
    mp = pursuit_cpu.padded_size(m)

    def buffer(rows: int) -> torch.Tensor:
        return huge_empty(rows * mp, atoms).view(rows, mp) if huge else torch.empty(rows, mp)

    gram = pursuit_cpu.gram_rows(atoms, buffer(mp))
    scores, fresh = buffer(len(r)), buffer(len(r))
    values = np.empty((len(r), cfg.n_iter * cfg.n_pick), np.float32)
    indices = np.empty(values.shape, np.int64)
    eps, tiny = np.float32(10 * np.finfo(np.float32).eps), np.float32(np.finfo(np.float32).tiny)
    torch.mm(r, atoms.T, out=scores[:, :m])

    def kernel():
        fresh.copy_(scores)  # the kernel updates its scores in place
        pursuit_cpu._pursuit_rows(
            fresh.numpy(), gram.numpy(), cfg.n_iter, cfg.n_pick, values, indices, eps, tiny
        )

    copy = cpu_ms(lambda: fresh.copy_(scores))
    out = {
        "Gram matrix (symmetric, rows)": cpu_ms(lambda: pursuit_cpu.gram_rows(atoms, gram)),
        "first scores (B x D x M product)": cpu_ms(lambda: torch.mm(r, atoms.T, out=scores[:, :m])),
        f"kernel: {cfg.n_iter} picks and solves, {cfg.n_iter - 1} updates": cpu_ms(kernel) - copy,
    }
    if huge:
        ws: dict = {}
        out["whole pursuit (reused buffers, as in training)"] = cpu_ms(
            lambda: pursuit_cpu.pursuit_rows(r, atoms, cfg.n_iter, cfg.n_pick, workspace=ws)
        )
    return out


def step_parts(model: ICFL, opt, x: torch.Tensor) -> dict[str, float]:
    """CPU ms of an ICFL training step outside the Gram matrix and the kernel: the loss with
    its backward, compiled (``decode_cpu``, what the step runs) and through torch's ops (what
    it ran before), and the optimiser step with the renormalisation."""
    from napari_concept_discovery.dictionary.base import sparse_decode
    from napari_concept_discovery.dictionary.decode_cpu import fixed_codes_loss

    codes = model.encode(x, workspace=model._workspace)

    def compiled():
        fixed_codes_loss(x, codes, model.W, model.b)[1].backward()

    def through_torch():
        x_hat = sparse_decode(codes, model.W) + model.b
        (x - x_hat).pow(2).sum(1).mean().backward()

    def optimiser():
        opt.step()
        model.after_step(1, opt)

    parts = {
        "pursuit (residual, G, scores, kernel)": cpu_ms(
            lambda: model.encode(x, workspace=model._workspace), 3
        ),
        "loss + backward, compiled (decode_cpu)": cpu_ms(compiled),
        "loss + backward through torch (before)": cpu_ms(through_torch),
    }
    compiled()
    parts["Adam + unit-norm atoms"] = cpu_ms(optimiser)
    opt.zero_grad(set_to_none=True)
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atoms", type=int, default=4096)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--site-tokens", type=int, default=4624)
    p.add_argument("--out", default=default_path("profile_icfl"))
    args = p.parse_args()
    with results_file(args.out):
        run(args)


def site_encode(args, x: torch.Tensor) -> None:
    """Applying a dictionary (M atoms) to one site: whitening, coder, CSR; CPU ms, 1 thread."""
    from napari_concept_discovery.dictionary import Whitener
    from napari_concept_discovery.dictionary.applied import Dictionary, prepare
    from napari_concept_discovery.dictionary.base import codes_to_csr

    rng = np.random.default_rng(0)
    raw = rng.standard_normal((5000 + args.site_tokens, args.dim)).astype(np.float32) * 3 + 0.5
    whitener = Whitener().fit(raw[:5000])
    site = raw[5000:]
    white = prepare(site, None, whitener)
    print(f"\napplying a dictionary to one site ({len(site)} tokens, M={args.atoms}), CPU ms:")
    for name in ("icfl", "topk"):
        model = build(name, whitener.n_components_, args.atoms, white)[0].eval()
        dic = Dictionary(model, whitener)
        with torch.no_grad():
            codes = model.encode(white)
            parts = {
                "whole Dictionary.encode": cpu_ms(lambda dic=dic: dic.encode(site), 3),
                "whitening": cpu_ms(lambda: prepare(site, None, whitener), 3),
                "coder": cpu_ms(lambda model=model: model.encode(white), 3),
                "to CSR": cpu_ms(lambda m=model, c=codes: codes_to_csr(c, m.n_atoms), 3),
            }
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))
        if not args.no_table:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                dic.encode(site)
            print(f"\n{name}: torch profiler, one site encode")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def run(args) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    print(f"torch {torch.__version__}, 1 thread, load {os.getloadavg()}")
    print(f"M={args.atoms}, D={args.dim}, batch {args.batch}, 32 non-zeros")
    x = unit_tokens(4 * args.batch, args.dim, 0)
    runs = {name: build(name, args.dim, args.atoms, x[: args.batch]) for name in ("topk", "icfl")}
    times = {name: [] for name in runs}
    for i in range(1, args.steps + 2):
        xb = x[(i % 4) * args.batch : (i % 4 + 1) * args.batch]
        for name, (model, opt) in runs.items():
            t = time.thread_time()
            step(model, opt, xb, i)
            if i > 1:
                times[name].append(time.thread_time() - t)
    med = {name: 1e3 * sorted(v)[len(v) // 2] for name, v in times.items()}
    print(f"\nmedian CPU ms per training step over {args.steps} steps each, taken in turn:")
    for name, ms in med.items():
        print(f"  {name:<6}{ms:8.1f} ms  ({args.batch / ms * 1e3:8.0f} samples/s)")
    print(f"  ICFL / TopK samples/s = {med['topk'] / med['icfl']:.2f}x (bar >= 0.85x)")

    print("\nICFL pursuit of one batch, CPU ms per phase: the compiled CPU kernel (the path ICFL")
    print("takes on a CPU)")
    for name, ms in phases_kernel(runs["icfl"][0], x[: args.batch]).items():
        print(f"  {name:<44}{ms:8.1f}")
    print("the same kernel with G and the scores on ordinary 4 KiB pages:")
    for name, ms in phases_kernel(runs["icfl"][0], x[: args.batch], huge=False).items():
        print(f"  {name:<44}{ms:8.1f}")
    print("ICFL training step, CPU ms per part:")
    for name, ms in step_parts(*runs["icfl"], x[: args.batch]).items():
        print(f"  {name:<44}{ms:8.1f}")
    print("and the torch Gram pursuit (the path on a GPU; on a CPU before the kernel):")
    for name, ms in phases(runs["icfl"][0], x[: args.batch]).items():
        print(f"  {name:<44}{ms:8.1f}")

    if not args.no_table:
        from torch.profiler import ProfilerActivity, profile

        for name, (model, opt) in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(2):
                    step(model, opt, x[: args.batch], 100 + i)
            print(f"\n{name}: torch profiler, two steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

    site_encode(args, x)


if __name__ == "__main__":
    main()
