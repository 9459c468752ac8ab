"""The parts of a bf16 ViT-S/16 block (OpenPhenom's shape) against a bf16 matmul, in one run.

For one batch of tiles (1,537 tokens each: 6 channels x 256 patches + CLS; 6 heads of 64) it
times, interleaved, best of ``--repeats``: a 4096^3 bf16 matmul (the anchor), attention with
the qk-norm through the compiled kernel and through torch's SDPA, the block's three matrix
products at these shapes, and the MLP's bias + GELU fused and as torch's add + GELU. Each row
gives its share of the matmul by wall time and by CPU seconds of this process (steadier where
other processes share the cores).

    python benchmarks/bench_bf16_parts.py [--batch 8] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from napari_concept_discovery.models.cpu_bf16 import attention, bias_gelu, kernels_path

sys.path.insert(0, str(os.path.dirname(os.path.abspath(__file__))))
from _report import kernels_off  # noqa: E402

N, H, D, C, HIDDEN = 1537, 6, 64, 384, 1536


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="tiles per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, rows = args.batch, args.batch * N
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).bfloat16()

    y = rand(b, N, HIDDEN + 3 * C)  # the joint projection's output
    x_mlp, q, k, v = (t for t in y.split([HIDDEN, C, C, C], dim=-1))
    q, k, v = (t.view(b, N, H, D) for t in (q, k, v))
    q_norm, k_norm = torch.nn.LayerNorm(D).bfloat16(), torch.nn.LayerNorm(D).bfloat16()
    bias = rand(HIDDEN)
    x, w_in, w_attn, w_mlp, h = (
        rand(rows, C),
        rand(HIDDEN + 3 * C, C),
        rand(C, C),
        rand(C, HIDDEN),
        rand(rows, HIDDEN),
    )
    a, m = rand(4096, 4096), rand(4096, 4096)

    def sdpa():
        with kernels_off():
            attention(q, k, v, None, q_norm, k_norm)

    def gelu_torch():
        with kernels_off():
            bias_gelu(x_mlp, bias)

    att = 4 * b * H * N * N * D
    arms = {
        "matmul 4096^3 (anchor)": (lambda: a @ m, 2 * 4096**3),
        "attention + qk-norm, kernel": (lambda: attention(q, k, v, None, q_norm, k_norm), att),
        "attention + qk-norm, torch SDPA": (sdpa, att),
        f"in_proj   [{rows},{C}] x [{C},{HIDDEN + 3 * C}]": (
            lambda: x @ w_in.t(),
            2 * rows * C * (HIDDEN + 3 * C),
        ),
        f"attn_out  [{rows},{C}] x [{C},{C}]": (lambda: x @ w_attn.t(), 2 * rows * C * C),
        f"mlp_out   [{rows},{HIDDEN}] x [{HIDDEN},{C}]": (
            lambda: h @ w_mlp.t(),
            2 * rows * HIDDEN * C,
        ),
        "bias + GELU, kernel": (lambda: bias_gelu(x_mlp, bias), 0),
        "bias + GELU, torch add + gelu": (gelu_torch, 0),
    }
    with torch.inference_mode():
        for f, _ in arms.values():
            f()  # warm-up (and the kernels' build on first use)
        wall = dict.fromkeys(arms, float("inf"))
        cpu = dict(wall)
        for _ in range(args.repeats):
            for name, (f, _) in arms.items():
                c, t = time.process_time(), time.perf_counter()
                f()
                wall[name] = min(wall[name], time.perf_counter() - t)
                cpu[name] = min(cpu[name], time.process_time() - c)
    anchor = "matmul 4096^3 (anchor)"
    peak_wall = arms[anchor][1] / wall[anchor] / 1e9
    peak_cpu = arms[anchor][1] / cpu[anchor] / 1e9
    print(
        f"bf16 block parts, batch {b} tiles ({rows} tokens), {args.threads} threads, load avg "
        f"{os.getloadavg()[0]:.1f}; kernels: {kernels_path()}"
    )
    head = f"{'part':44s} {'ms':>8s} {'CPU ms':>8s} {'GFLOP/s':>8s} {'of matmul':>9s} {'per CPU s':>9s}"
    print(head)
    print("-" * len(head))
    for name, (_, flops) in arms.items():
        line = f"{name:44s} {wall[name] * 1e3:8.1f} {cpu[name] * 1e3:8.1f}"
        if flops:
            gf = flops / wall[name] / 1e9
            share_cpu = flops / cpu[name] / 1e9 / peak_cpu
            line += f" {gf:8.1f} {gf / peak_wall:9.0%} {share_cpu:9.0%}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
