"""Embedding throughput and memory, side by side with the anchors, in one run.

For the bundled default model and an OpenPhenom-shaped ViT-S/16 (random weights) it prints:
tiles/s through our pipeline (scaling, tiling, batching, tokens of the last block, patch grids,
crop tokens, coverage-weighted cell pooling) against a bare timm ``forward_features`` of the same
network on the same pre-made tensors, their ratio (bar: >= 0.9), and the achieved GFLOP/s (FLOPs
counted by ``torch.utils.flop_counter``) against a large fp32 matmul on this machine. Then the
peak resident memory and wall time of embedding the 2-plate synthetic set (24 wells, 2 sites,
512 px) with the default model through the CLI, in a child process.

Images and labels are read before timing, so both sides see the same in-memory data; each side
runs ``--repeats`` times interleaved and the best time counts (the machine is shared).

Precision (``--precision`` of ``embed``): tiles/s of the pipeline at fp32, bf16 (autocast; only
where the CPU has native bf16) and int8 (dynamically quantised Linear layers), interleaved, and
the cosine of every patch token to the fp32 one. Bars: >= 1.5x the fp32 tiles/s on the
OpenPhenom-shaped network, cosine >= 0.99. Cosines are measured on the bundled (trained) model
and on the OpenPhenom-shaped network with its layer scales set to 1 (at timm's initial 1e-4 the
random blocks barely move the tokens, and any precision would look exact).

Concepts at each precision (benchmarks/bench_precision_concepts.py, which says more): a
demo-sized synthetic plate set (2 plates x 16 wells, 512 px, seed 1) is embedded with the
bundled model at each precision. For two ICFL settings (the default, sized to the tokens, and
64 atoms, 8 non-zeros, 300 steps; both whitened on each plate's controls) and each seed
(``--concept-seeds``, 8 by default: at 4, a shift can look systematic by chance), a dictionary
trained on the fp32 tokens is applied to the fp32 tokens (A) and to the other precision's (B:
the effect of the tokens alone), and one trained on the other precision's tokens with the same
seed (C: what a user of --precision gets). Printed per concept: A's seed mean and
seed-to-seed spread, max |B - A|, and the paired C - A (mean, spread, 95% interval over seeds,
simultaneous over the concepts). Bar: within 0.01 of fp32: (a) max |B - A|; (b) every
concept's mean C - A within 0.01 with its interval (PASS), an interval wholly beyond 0.01
(FAIL), or in between (unresolved: training chaos, never a pass).

From disk: the pipeline reading and decoding the sites itself (``read_sites``, which reads the
next site on a thread while the forward runs) against the bare forward on tiles in memory;
bar >= 0.95x.

    python benchmarks/bench_embed.py [--threads 2] [--tiles 16] [--phenom-tiles 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_concept_discovery.embed.compute import Embedder, cpu_has_bf16, tile_image
from napari_concept_discovery.models import (
    ChannelAgnosticBackend,
    ChannelAgnosticViT,
    hash_state_dict,
    load_model,
)
from napari_concept_discovery.models.cpu_bf16 import kernels_path

sys.path.insert(0, str(Path(__file__).parent))
from _report import kernels_off  # noqa: E402


def sync(device) -> None:
    """Wait for queued GPU work, so that wall time covers it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int = 2048, reps: int = 5, dtype=torch.float32, device="cpu") -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(model, x) -> int:
    """FLOPs of one forward: torch's counter, plus attention where it has no CPU formula.

    On CPU ``scaled_dot_product_attention`` dispatches to a kernel the counter does not know, so
    QK^T and AV (4 N^2 D per block and sample) are added by hand when absent from its counts.
    """
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        tokens = model.forward_features(x)
    total = fc.get_total_flops()
    ops = " ".join(str(k) for k in fc.get_flop_counts().get("Global", {}))
    if "attention" not in ops:
        b, n, d = tokens.shape
        total += len(model.blocks) * 4 * b * n * n * d
    return total


def tile_batches(backend, images, batch: int) -> list[torch.Tensor]:
    """The model's 256 px tiles of ``images`` in batches, on the backend's device: the bare
    forward's input."""
    tiles = np.concatenate([tile_image(backend.scale_to_unit(im), 256)[0] for im in images])
    dev = backend.device
    return [torch.from_numpy(tiles[i : i + batch]).to(dev) for i in range(0, len(tiles), batch)]


def bare_forward(model, batches) -> None:
    """timm's ``forward_features`` over ``batches``: the anchor every pipeline row is held to."""
    dev = batches[0].device
    with torch.inference_mode():
        for x in batches:
            model.forward_features(x)
    sync(dev)


def bench_bf16(backend, sites, batch, repeats, matmul_n):
    """bf16 forward of ``backend`` against a bf16 matmul measured in the same run, interleaved.

    Rows: the bare forward in fp32, with the weights cast to bf16 once (what ``precision bf16``
    runs) with attention in torch's SDPA (before) and in the compiled kernel where this CPU
    runs it (now), and the whole pipeline at bf16; each with GFLOP/s and its share of the bf16
    matmul of the same round (the best round counts for each), the same share in FLOPs per
    CPU second of this process (on a loaded machine other processes stretch wall times, the
    many short operators of a forward more than one long matmul), plus the cosine of every
    patch token of the bf16 weights to fp32.
    """
    from napari_concept_discovery.embed.compute import with_precision

    dev = backend.device
    model = backend.model
    bf16 = with_precision(backend, "bf16").model
    batches = tile_batches(backend, [im for _, im, _, _ in sites], batch)
    n_tiles = sum(len(x) for x in batches)
    flops = forward_flops(model, batches[0][:1])
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=dev)

    def matmul():
        a @ b
        sync(dev)

    # made once, as a run makes it once: its bf16 copy of the weights (~0.5 CPU s for ViT-S/16)
    # is not part of each batch
    embedder = Embedder(backend, None, batch_size=batch, precision="bf16")
    arms = {
        "bare fp32": lambda: bare_forward(model, batches),
        "bare bf16, torch SDPA (before)": lambda: bare_forward_sdpa(bf16, batches),
        "bare bf16 weights (now)": lambda: bare_forward(bf16, batches),
        "pipeline bf16": lambda: list(embedder.iter_sites(iter(sites))),
    }
    for f in (matmul, *arms.values()):
        f()  # warm-up
    best = dict.fromkeys(["matmul", *arms], float("inf"))
    cpu = dict(best)  # CPU seconds of this process: what a loaded machine's wall time hides
    for _ in range(repeats):
        for name, f in (("matmul", matmul), *arms.items()):
            c, t = time.process_time(), time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    with torch.inference_mode():
        x = batches[0]
        ref = model.forward_features(x).float()
        got = bf16.forward_features(x).float()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    peak = 2 * matmul_n**3 / best["matmul"] / 1e9
    rows = {
        name: (
            n_tiles / best[name],
            flops * n_tiles / best[name] / 1e9,
            flops * n_tiles / cpu[name] / (2 * matmul_n**3 / cpu["matmul"]),
        )
        for name in arms
    }
    return peak, flops / 1e9, rows, float(cos.min()), float(cos.mean()), n_tiles


def bare_forward_sdpa(model, batches) -> None:
    with kernels_off():
        bare_forward(model, batches)


def profile_bf16(backend, sites, batch, rows: int = 12) -> None:
    """The top operators of one bf16 batch with bf16 weights: attention in torch's SDPA
    (before) and in the compiled kernel (now, where this CPU runs it)."""
    from torch.profiler import ProfilerActivity, profile

    from napari_concept_discovery.embed.compute import with_precision

    x = tile_batches(backend, [im for _, im, _, _ in sites], batch)[0]
    bf16 = with_precision(backend, "bf16").model
    for name, run in (
        ("bf16 weights, torch SDPA", bare_forward_sdpa),
        ("bf16 weights, attention as now", bare_forward),
    ):
        run(bf16, [x])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(bf16, [x])
        print(f"\nprofile, one batch of {len(x)} tiles, {name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_model(name, backend, sites, batch, repeats):
    """(pipeline tiles/s, bare tiles/s, GFLOP/s of each) on the same sites."""
    model = backend.model
    block = backend.num_blocks - 1
    batches = tile_batches(backend, [im for _, im, _, _ in sites], batch)
    n_tiles = sum(len(x) for x in batches)
    flops_per_tile = forward_flops(model, batches[0][:1])

    def bare():
        bare_forward(model, batches)

    def pipeline():
        emb = Embedder(backend, block, batch_size=batch)  # fp32, as the bare forward
        out = list(emb.iter_sites(iter(sites)))
        assert sum(len(s.crop_tokens) for s in out) == n_tiles

    t_pipe, t_bare = best_interleaved(pipeline, bare, repeats)
    return {
        "name": name,
        "tiles": n_tiles,
        "channels": batches[0].shape[1],
        "gflop_per_tile": flops_per_tile / 1e9,
        "pipe_tps": n_tiles / t_pipe,
        "bare_tps": n_tiles / t_bare,
        "pipe_gflops": flops_per_tile * n_tiles / t_pipe / 1e9,
        "bare_gflops": flops_per_tile * n_tiles / t_bare / 1e9,
    }


def best_interleaved(pipeline, bare, repeats: int) -> tuple[float, float]:
    """(best pipeline seconds, best bare seconds) over ``repeats`` turns of each, interleaved
    so that a machine's load falls on both alike; ``bare`` runs once first as the warm-up
    (allocator, kernels)."""
    bare()
    t_pipe = t_bare = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        pipeline()
        t_pipe = min(t_pipe, time.perf_counter() - t)
        t = time.perf_counter()
        bare()
        t_bare = min(t_bare, time.perf_counter() - t)
    return t_pipe, t_bare


def bench_precisions(backend, sites, batch, repeats, precisions):
    """{precision: (pipeline tiles/s, min patch-token cosine, mean cosine)}, interleaved runs."""
    n_tiles = sum(len(tile_image(backend.scale_to_unit(im), 256)[0]) for _, im, _, _ in sites)
    embedders = {p: Embedder(backend, None, batch_size=batch, precision=p) for p in precisions}
    grids = {p: [st.patch_grid for st in e.iter_sites(iter(sites))] for p, e in embedders.items()}
    best = dict.fromkeys(precisions, float("inf"))
    for _ in range(repeats):
        for p, e in embedders.items():
            t = time.perf_counter()
            list(e.iter_sites(iter(sites)))
            best[p] = min(best[p], time.perf_counter() - t)
    ref = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids["fp32"]])
    out = {}
    for p in precisions:
        got = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids[p]])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        out[p] = (n_tiles / best[p], float(cos.min()), float(cos.mean()))
    return out


def bench_from_disk(backend, plate, keys, batch, repeats):
    """(pipeline tiles/s reading the sites from disk, bare forward tiles/s on tiles in memory)."""
    from napari_concept_discovery.embed.plate import read_sites

    model = backend.model
    block = backend.num_blocks - 1
    batches = tile_batches(backend, [plate[k].read() for k in keys], batch)
    n_tiles = sum(len(x) for x in batches)

    def bare():
        bare_forward(model, batches)

    def pipeline():
        emb = Embedder(backend, block, batch_size=batch)
        for _ in emb.iter_sites(read_sites(plate, keys, cells="file")):
            pass

    t_pipe, t_bare = best_interleaved(pipeline, bare, repeats)
    return n_tiles / t_pipe, n_tiles / t_bare


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=16, help="tiles timed for the default model")
    ap.add_argument("--phenom-tiles", type=int, default=4, help="tiles timed for ViT-S/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="where to write the synthetic set")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--disk-sites", type=int, default=8, help="sites read from disk (default model)"
    )
    ap.add_argument("--skip-concepts", action="store_true", help="skip the concept AUROCs")
    ap.add_argument(
        "--concept-seeds", type=int, nargs="+", default=list(range(8)), help="seeds of the concepts"
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where every model runs")
    ap.add_argument(
        "--bf16-tiles", type=int, default=8, help="tiles of the bf16 vs matmul comparison"
    )
    ap.add_argument("--matmul-n", type=int, default=4096, help="size of the bf16 matmul anchor")
    ap.add_argument(
        "--only-bf16", action="store_true", help="only the bf16 vs matmul comparison (fast)"
    )
    ap.add_argument("--profile", action="store_true", help="print the top ops of a bf16 batch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from napari_concept_discovery.plate import open_plate
    from napari_concept_discovery.synth import write_synthetic_plates

    data = args.data or Path(tempfile.gettempdir()) / "ncd_bench_synth_2x24x2x512"
    if not (data / "metadata.csv").exists():
        write_synthetic_plates(data, n_plates=2, n_wells=24, n_sites=2, size=512, seed=0)
    plate = open_plate(data)
    keys = list(plate.sites)

    def load(n_tiles):
        out = []
        for k in keys[: max(1, n_tiles // 4)]:
            s = plate[k]
            out.append((k, s.read(), s.read_labels(), {}))
        return out

    where = str(device)
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    native = device.type == "cuda" or cpu_has_bf16()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, cpu count {os.cpu_count()}, device {where}, native bf16 "
        f"{'yes' if native else 'no'}, load avg {os.getloadavg()[0]:.2f}"
    )
    mm = matmul_gflops(device=device)
    print(f"anchor: fp32 matmul 2048^3: {mm:.1f} GFLOP/s")

    default = load_model("default", device)
    torch.manual_seed(0)
    phenom = ChannelAgnosticViT(embed_dim=384, depth=12, num_heads=6, max_channels=11).eval()
    phenom_b = ChannelAgnosticBackend(
        phenom,
        model_id="openphenom-shaped-random",
        weights_hash=hash_state_dict(phenom.state_dict()),
    ).to(device)

    if native:
        # layer scales 1 (see the precision section): at timm's 1e-4 the tokens barely move
        unit = ChannelAgnosticViT(embed_dim=384, depth=12, num_heads=6, max_channels=11).eval()
        unit.load_state_dict(phenom.state_dict())
        with torch.no_grad():
            for blk in unit.blocks:
                blk.ls.gamma.fill_(1.0)
        unit_be = ChannelAgnosticBackend(unit, model_id="ls1", weights_hash="-").to(device)
        sites = load(args.bf16_tiles)
        if args.profile:
            profile_bf16(unit_be, sites, args.batch)
        peak, gflop, rows, cmin, cmean, n = bench_bf16(
            unit_be, sites, args.batch, args.repeats, args.matmul_n
        )
        print(
            f"\nbf16, OpenPhenom-shaped ViT-S/16 (layer scale 1), {n} tiles, batch {args.batch}, "
            f"{gflop:.1f} GFLOP/tile, best of {args.repeats} interleaved rounds"
        )
        print(f"anchor: bf16 matmul {args.matmul_n}^3: {peak:.1f} GFLOP/s (same rounds)")
        print(f"bf16 attention (now): {kernels_path()}")
        head = (
            f"{'forward':32s} {'tiles/s':>8s} {'GFLOP/s':>8s} {'of bf16 matmul':>14s} "
            f"{'same, per CPU second':>20s}"
        )
        print(head)
        print("-" * len(head))
        for name, (tps, gf, per_cpu) in rows.items():
            print(f"{name:32s} {tps:8.3f} {gf:8.1f} {gf / peak:14.0%} {per_cpu:20.0%}")
        ratio = rows["pipeline bf16"][0] / rows["bare bf16 weights (now)"][0]
        print(
            f"now / SDPA: "
            f"{rows['bare bf16 weights (now)'][0] / rows['bare bf16, torch SDPA (before)'][0]:.2f}x; "
            f"pipeline / bare (bf16): {ratio:.3f}; token cosine to fp32: min {cmin:.5f}, mean "
            f"{cmean:.6f}"
        )
        print(
            "bars: >= 60% of the bf16 matmul, cosine >= 0.999 (per CPU second: FLOPs per CPU "
            "second of this process against the matmul's, less swayed by other processes; on the "
            "CPU only)"
        )
    else:
        print("bf16: no native bf16 on this device; the bf16 comparison is skipped")
    if args.only_bf16:
        return 0
    rows = [
        bench_model(
            "default (192w, 4 blocks)", default, load(args.tiles), args.batch, args.repeats
        ),
        bench_model(
            "OpenPhenom-shaped ViT-S/16 (random)",
            phenom_b,
            load(args.phenom_tiles),
            args.batch,
            args.repeats,
        ),
    ]
    head = (
        f"{'model':38s} {'tiles':>5s} {'C':>2s} {'GFLOP/tile':>10s} {'pipeline t/s':>12s} "
        f"{'bare timm t/s':>13s} {'ratio':>6s} {'pipe GFLOP/s':>12s} {'bare GFLOP/s':>12s} "
        f"{'of matmul':>9s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["pipe_tps"] / r["bare_tps"]
        print(
            f"{r['name']:38s} {r['tiles']:5d} {r['channels']:2d} {r['gflop_per_tile']:10.1f} "
            f"{r['pipe_tps']:12.3f} {r['bare_tps']:13.3f} {ratio:6.3f} {r['pipe_gflops']:12.1f} "
            f"{r['bare_gflops']:12.1f} {r['pipe_gflops'] / mm:9.0%}"
        )
    print("bar: ratio >= 0.9 (tiling, block hooks and pooling cost at most 10%)")

    if device.type == "cuda":
        precisions = ["fp32", "bf16"]  # int8 (dynamic quantisation) is CPU-only
    else:
        precisions = ["fp32"] + (["bf16"] if cpu_has_bf16() else []) + ["int8"]
    if not cpu_has_bf16():
        print("bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX); not measured")
    unit_phenom = ChannelAgnosticViT(embed_dim=384, depth=12, num_heads=6, max_channels=11).eval()
    unit_phenom.load_state_dict(phenom.state_dict())
    with torch.no_grad():
        for blk in unit_phenom.blocks:
            blk.ls.gamma.fill_(1.0)
    unit_b = ChannelAgnosticBackend(
        unit_phenom, model_id="openphenom-shaped-ls1", weights_hash="-"
    ).to(device)
    cases = [
        ("OpenPhenom-shaped ViT-S/16 (random)", phenom_b, load(args.phenom_tiles)),
        ("  same, layer scale 1 (for cosine)", unit_b, load(args.phenom_tiles)),
        ("default (192w, 4 blocks, trained)", default, load(args.tiles)),
    ]
    print(
        f"\nprecision (pipeline, {args.threads} threads, batch {args.batch}, best of {args.repeats})"
    )
    head = f"{'model':38s} {'precision':>9s} {'tiles/s':>8s} {'x fp32':>7s} {'cos min':>8s} {'cos mean':>9s}"
    print(head)
    print("-" * len(head))
    for name, be, sites in cases:
        res = bench_precisions(be, sites, args.batch, args.repeats, precisions)
        for p, (tps, cmin, cmean) in res.items():
            print(
                f"{name:38s} {p:>9s} {tps:8.3f} {tps / res['fp32'][0]:7.2f} {cmin:8.5f} "
                f"{cmean:9.6f}"
            )
    print("bars: >= 1.5x fp32 tiles/s on the OpenPhenom-shaped network, cosine >= 0.99")

    if not args.skip_concepts:
        import bench_precision_concepts as concepts

        work = data.parent / "ncd_bench_precision_concepts"
        t = time.perf_counter()
        stores = concepts.embed_stores(work, args.device, precisions)
        truth = concepts.concepts_of(work, stores["fp32"])
        print("\nbest single-feature AUROC per true concept, default model")
        # sized: what `train` gives by default; bench: 64 atoms, 8 non-zeros, 300 steps
        for name in ("sized", "bench"):
            setting = concepts.SETTINGS[name]
            rows = concepts.run_setting(
                setting, args.concept_seeds, stores, truth, others=precisions[1:]
            )
            for p in precisions[1:]:
                concepts.print_summary(setting, concepts.summarise(rows, p), p)
        print(f"({time.perf_counter() - t:.0f} s)")

    keys_disk = keys[: args.disk_sites]
    pipe, bare_tps = bench_from_disk(default, plate, keys_disk, args.batch, args.repeats)
    print(
        f"\nfrom disk, default model, {len(keys_disk)} sites (PNG decode + labels on the reading "
        f"thread): pipeline {pipe:.3f} tiles/s, bare forward on tiles in memory "
        f"{bare_tps:.3f} tiles/s, ratio {pipe / bare_tps:.3f} (bar >= 0.95)"
    )

    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "napari_concept_discovery",
                "embed",
                str(data),
                "--model",
                "default",
                "--out",
                str(Path(tmp) / "store"),
                "--threads",
                str(args.threads),
                "--batch-size",
                str(args.batch),
                "--device",
                args.device,
            ]
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if res.returncode:
                print(res.stderr[-2000:])
                return res.returncode
            print(
                f"embed 2-plate synthetic set ({len(keys)} sites, 512 px, 6 channels, "
                f"{4 * len(keys)} tiles) with the default model via the CLI: "
                f"{wall:.1f} s wall, {4 * len(keys) / wall:.2f} tiles/s, "
                f"peak RSS {peak_kb / 1024:.0f} MiB"
            )
            print("  " + res.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
