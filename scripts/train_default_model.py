"""Train the bundled default model: a small channel-agnostic ViT, self-supervised on Cell Painting.

Writes ``models/weights/default.safetensors`` (the encoder, stored as float16) and the model card
``default.json`` (architecture, recipe, data, hardware, loss curve, and the linear-probe table of
``probe_default_model.py`` with the default block it chose).

The recipe, and why:

- Data: synthetic plates drawn in memory by ``synth.generate_site`` (generator seed 1000; the
  probe's held-out plates use seed 2000), with every plate's own batch effect, plus optionally a
  few real Cell Painting sites (10% of batches). Random 256 px crops (one model tile), flips,
  quarter turns, and in 30% of batches a random subset of at least two channels, so that the
  channel-agnostic encoder sees varying channel sets.
- Masked modelling (MAE, mask ratio 0.75 over all channel tokens): a small decoder reconstructs
  the masked 16x16 patches: their standardised pixels, their amplitude spectra (phase-free, so
  stochastic textures are rewarded for their kind) and their texture statistics (below).
  Every stain is standardised on its own, so each weighs the same in these losses.
- Texture statistics kept readable (MaskFeat-style handcrafted targets): a linear head on the
  encoder's tokens, run once more with nothing masked (as at inference), regresses, for every
  channel token, statistics of the standardised stain in its patch and in the 3x3, 5x5 and 7x7
  patch windows around it (mean, sd, max, 90th percentile, fractions above 1 and 3 sd, log power
  in five radial frequency bands). A linear probe on pooled cell tokens can only use what is
  linear in the tokens; without this term the masked-pixel loss alone left the tokens weak on
  texture (actin fibres, mitochondrial fragmentation). No label of any kind is used.

Several variants (``--variant``) can train side by side on one device, taking turns step by step;
each is probed, and the one that meets the most probe bars, then has the largest smallest margin
over the anchor, ships. Training is resumable: each variant keeps a checkpoint (weights, AdamW
moments, step, elapsed time, random states, run history) under ``WORKDIR/<variant>/checkpoint``,
and ``--resume`` continues it; the cosine schedule then runs over the new, longer time budget.

The shipped model came from two runs on one NVIDIA H200 (bf16 autocast; 270 s of training for
the shipped variant, about 9.5 minutes of machine time with data generation and probes):

    python scripts/train_default_model.py --pack-real real.npz --real \
        tests/data/real/jump_BR00117006 tests/data/real/pediatric_cancer_atlas_BR00143976 \
        tests/data/real/nf1_plate2/images
    python scripts/train_default_model.py --device cuda --minutes 5.0 --workdir W \
        --real-npz real.npz --variant A --variant B:pixel_weight=0,fourier_weight=0
    python scripts/train_default_model.py --device cuda --minutes 4.5 --workdir W \
        --real-npz real.npz --variant B:pixel_weight=0,fourier_weight=0 --resume

The first run trained A (with the pixel and spectrum losses) and B (without) for 150 s each; B met
more bars and was resumed alone for 120 s more. On a CPU the same script runs in a time budget
with less data and smaller batches (slowly: a few steps a minute on two cores), e.g.

    python scripts/train_default_model.py --device cpu --minutes 60 --train-plates 2 \
        --wells 24 --batch 8 --crop 128 --probe-wells 48 --variant B:pixel_weight=0,fourier_weight=0
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from napari_concept_discovery.models.vit import ChannelAgnosticViT, sincos_2d, standardize

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src/napari_concept_discovery/models/weights"

#: Texture statistics per patch (in the standardised stain), then the same over windows.
STAT_NAMES = ("mean", "sd", "max", "q90", "frac_gt1", "frac_gt3") + tuple(
    f"logpower_band{i}" for i in range(5)
)
#: Radial frequency band edges (cycles per pixel) of the power bands; DC is left out.
BAND_EDGES = (0.01, 0.1, 0.2, 0.3, 0.5, 0.8)
#: Window sides in patches: the patch itself, then 3x3, 5x5 and 7x7 neighbourhoods.
WINDOWS = (1, 3, 5, 7)
#: Loss weights a variant may override (``--variant NAME:key=value,...``).
LOSS_KEYS = ("pixel_weight", "fourier_weight", "masked_stats_weight", "visible_stats_weight")
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mask_ratio")


# -- texture statistics ------------------------------------------------------------------------


def _band_matrix(p: int, device) -> torch.Tensor:
    """(p * (p//2+1), n_bands) averaging matrix from rfft2 bins to radial bands."""
    ky = torch.fft.fftfreq(p, device=device)[:, None]
    kx = torch.fft.rfftfreq(p, device=device)[None, :]
    r = (ky**2 + kx**2).sqrt().flatten()
    cols = []
    for a, b in zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True):
        m = ((r >= a) & (r < b)).float()
        cols.append(m / m.sum())
    return torch.stack(cols, 1)


def patch_stats(xs: torch.Tensor, p: int) -> torch.Tensor:
    """Statistics of every p x p patch of every channel: (B, C, rows, cols, len(STAT_NAMES))."""
    b, c, h, w = xs.shape
    r, k = h // p, w // p
    pt = xs.reshape(b, c, r, p, k, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, r, k, p * p)
    q90 = pt.kthvalue(int(round(0.9 * p * p)), dim=-1).values
    power = torch.fft.rfft2(pt.reshape(b, c, r, k, p, p), norm="ortho").abs().square()
    bands = torch.log1p(power.flatten(-2) @ _band_matrix(p, xs.device))
    simple = [
        pt.mean(-1),
        pt.std(-1),
        pt.amax(-1),
        q90,
        (pt > 1.0).float().mean(-1),
        (pt > 3.0).float().mean(-1),
    ]
    return torch.cat([torch.stack(simple, -1), bands], -1)


def multiscale_stats(xs: torch.Tensor, p: int) -> torch.Tensor:
    """Patch statistics and their window versions: (B, C, rows, cols, len(STAT_NAMES) * 4).

    A window averages every statistic over the k x k patches around a patch, except the
    maximum, which it takes the maximum of (windows are clipped at the tile's edge).
    """
    f = patch_stats(xs, p)
    b, c, r, k, n = f.shape
    g = f.permute(0, 1, 4, 2, 3).reshape(b, c * n, r, k)
    is_max = torch.zeros(n, dtype=torch.bool, device=xs.device)
    is_max[STAT_NAMES.index("max")] = True
    is_max = is_max.repeat(c)[None, :, None, None]
    outs = [f]
    for win in WINDOWS[1:]:
        avg = F.avg_pool2d(g, win, 1, win // 2, count_include_pad=False)
        mx = F.max_pool2d(g, win, 1, win // 2)
        outs.append(torch.where(is_max, mx, avg).reshape(b, c, n, r, k).permute(0, 1, 3, 4, 2))
    return torch.cat(outs, -1)


N_STATS = len(STAT_NAMES) * len(WINDOWS)


# -- model -------------------------------------------------------------------------------------


class MaskedAutoencoder(nn.Module):
    """Channel-agnostic MAE around a ``ChannelAgnosticViT`` encoder (decoder and heads discarded).

    Masked tokens of channel c are given the mean of the visible decoder tokens of channel c as
    context, so the decoder knows which channel to draw without a learned channel embedding and
    the whole model stays channel-agnostic.
    """

    def __init__(self, encoder: ChannelAgnosticViT, dec_dim: int = 128, dec_depth: int = 2):
        super().__init__()
        self.encoder = encoder
        p = encoder.patch_size
        self.dec_embed = nn.Linear(encoder.embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.dec_blocks = nn.ModuleList(
            [Block(dec_dim, num_heads=4, mlp_ratio=4.0, qkv_bias=True) for _ in range(dec_depth)]
        )
        self.dec_norm = nn.LayerNorm(dec_dim)
        self.dec_pred = nn.Linear(dec_dim, p * p)
        self.dec_stats = nn.Linear(dec_dim, N_STATS)
        self.stats_head = nn.Linear(encoder.embed_dim, N_STATS)  # linear: readable by a probe
        self.dec_dim = dec_dim
        grid = encoder.img_size // p
        # Fixed positions of a whole tile, kept on the module's device (no host copies per step).
        self.register_buffer(
            "enc_pos", sincos_2d(grid, grid, encoder.embed_dim).reshape(grid, grid, -1), False
        )
        self.register_buffer(
            "dec_pos", sincos_2d(grid, grid, dec_dim).reshape(grid, grid, -1), False
        )
        # Target normalisation of the statistics (set from the first batches, then fixed).
        self.register_buffer("stats_mean", torch.zeros(N_STATS))
        self.register_buffer("stats_std", torch.ones(N_STATS))
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.no_grad()
    def fit_stats_norm(self, batches: list[torch.Tensor]) -> None:
        s = torch.cat(
            [
                multiscale_stats(standardize(x), self.encoder.patch_size).flatten(0, 3)
                for x in batches
            ]
        )
        self.stats_mean.copy_(s.mean(0))
        self.stats_std.copy_(s.std(0).clamp_min(1e-3))

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised input and the normalised statistics (B, C*rows*cols, N_STATS)."""
        with torch.autocast(x.device.type, enabled=False):
            xs = standardize(x)
            s = multiscale_stats(xs, self.encoder.patch_size)
            s = (s - self.stats_mean) / self.stats_std
        return xs, s.flatten(1, 3)

    def masked_losses(self, xs, stats, mask_ratio, gen, offset) -> dict[str, torch.Tensor]:
        """Losses of the masked pass: pixels, amplitude spectra and statistics of masked tokens."""
        enc = self.encoder
        b, c, h, w = xs.shape
        p = enc.patch_size
        tokens = enc.patch_embed.proj(xs.reshape(b * c, 1, h, w))
        rows, cols = tokens.shape[-2:]
        n = rows * cols
        tokens = tokens.reshape(b, c, enc.embed_dim, n).transpose(2, 3)
        oy, ox = offset
        pos = self.enc_pos[oy : oy + rows, ox : ox + cols].reshape(n, -1)
        tokens = (tokens + pos.to(tokens.dtype)).reshape(b, c * n, enc.embed_dim)
        total = c * n
        keep = max(c, int(round(total * (1 - mask_ratio))))
        order = torch.rand(b, total, generator=gen, device=xs.device).argsort(dim=1)
        visible = order[:, :keep]
        vis = torch.gather(tokens, 1, visible[..., None].expand(-1, -1, enc.embed_dim))
        z = enc.prepend_cls(vis)
        for blk in enc.blocks:
            z = blk(z)
        z = self.dec_embed(z)
        cls, zv = z[:, :1], z[:, 1:]
        chan_of_vis = visible // n
        onehot = (chan_of_vis[..., None] == torch.arange(c, device=xs.device)).to(zv.dtype)
        counts = onehot.sum(1).clamp_min(1.0)
        ctx = torch.einsum("bkc,bkd->bcd", onehot, zv) / counts[..., None]
        full = self.mask_token.expand(b, total, -1) + ctx.repeat_interleave(n, dim=1)
        full = full.to(zv.dtype)  # autocast runs sums in float32 on CUDA
        full = full.scatter(1, visible[..., None].expand(-1, -1, self.dec_dim), zv)
        dpos = self.dec_pos[oy : oy + rows, ox : ox + cols].reshape(n, -1).repeat(c, 1)[None]
        y = torch.cat([cls, full + dpos.to(full.dtype)], dim=1)
        for blk in self.dec_blocks:
            y = blk(y)
        y = self.dec_norm(y[:, 1:])
        masked = torch.ones(b, total, dtype=torch.bool, device=xs.device)
        masked.scatter_(1, visible, False)
        weight = masked.float() / masked.sum()
        with torch.autocast(xs.device.type, enabled=False):
            pred = self.dec_pred(y.float())
            target = xs.reshape(b, c, rows, p, cols, p).permute(0, 1, 2, 4, 3, 5)
            target = target.reshape(b, total, p * p)
            pix = ((pred - target) ** 2).mean(-1)
            amp_p = torch.fft.rfft2(pred.reshape(b, total, p, p), norm="ortho").abs()
            amp_t = torch.fft.rfft2(target.reshape(b, total, p, p), norm="ortho").abs()
            four = ((amp_p - amp_t) ** 2).mean((-1, -2))
            st = ((self.dec_stats(y.float()) - stats) ** 2).mean(-1)
            return {
                "pixel": (pix * weight).sum(),
                "fourier": (four * weight).sum(),
                "masked_stats": (st * weight).sum(),
            }

    def visible_stats_loss(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Nothing masked (as at inference): a linear head reads the statistics off the tokens."""
        t = self.encoder.forward_tokens(x)[:, self.encoder.num_prefix_tokens :]
        with torch.autocast(x.device.type, enabled=False):
            return ((self.stats_head(t.float()) - stats) ** 2).mean()


# -- data --------------------------------------------------------------------------------------


def _synth_job(args) -> np.ndarray:
    from napari_concept_discovery.synth import planned_site

    plan, site, size, seed = args
    s = planned_site(plan, site, size, seed)
    return s.image


def synthetic_sites(
    n_plates: int, n_wells: int, n_sites: int, size: int, seed: int, workers: int
) -> np.ndarray:
    """(S, 6, size, size) uint8: the sites ``write_synthetic_plates`` would write, in memory."""
    from napari_concept_discovery.synth import plan_plate

    jobs = [
        (plan, s, size, seed)
        for p in range(1, n_plates + 1)
        for plan in plan_plate(p, n_wells, seed)
        for s in range(1, n_sites + 1)
    ]
    if workers <= 1:
        images = [_synth_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            images = list(pool.map(_synth_job, jobs, chunksize=4))
    return np.stack(images)


#: Filename patterns tried on real folders that no layout preset recognises (NF1 naming).
REAL_PATTERNS = ("{well}_01_{channel_index}_{site}_{channel}_001.tif",)


def read_real_sites(roots: list[Path], depth: int = 2) -> dict[str, np.ndarray]:
    """Every site of the plate folders under ``roots`` (raw dtype), keyed by folder and site."""
    from napari_concept_discovery.plate import open_plate

    out: dict[str, np.ndarray] = {}

    def visit(root: Path, d: int) -> None:
        for pattern in (None, *REAL_PATTERNS):
            try:
                plate = open_plate(root, pattern=pattern)
                for i, site in enumerate(plate):
                    out[f"{root.name}/{i}"] = np.asarray(site.read())
                return
            except Exception as exc:  # not a plate folder (with this pattern): say so, try on
                print(
                    f"{root}: not a plate with pattern {pattern}: {str(exc)[:100]}", file=sys.stderr
                )
        if d > 0:
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                visit(sub, d - 1)

    for r in roots:
        visit(Path(r), depth)
    return out


def pack_real(roots: list[Path], out: Path, crop: int) -> None:
    """Pack real sites (centre crop of ``crop`` px, raw dtype) into one compressed npz."""
    sites = read_real_sites(roots)
    packed = {}
    for k, a in sites.items():
        h, w = a.shape[-2:]
        y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        packed[k.replace("/", "__")] = a[:, y0 : y0 + crop, x0 : x0 + crop]
    np.savez_compressed(out, **packed)
    print(f"packed {len(packed)} real sites into {out} ({out.stat().st_size / 1e6:.1f} MB)")


class Bank:
    """Training images on the device, and random augmented crops from them."""

    def __init__(self, synth: np.ndarray, real: dict[str, np.ndarray], device, crop: int):
        from napari_concept_discovery.models import scale_to_unit

        self.synth = torch.from_numpy(synth).to(device)  # uint8, scaled per batch
        self.crop = crop
        by_c: dict[int, list[torch.Tensor]] = {}
        self.real_used = []
        for name, a in real.items():
            if min(a.shape[-2:]) < crop:
                continue
            by_c.setdefault(a.shape[0], []).append(torch.from_numpy(scale_to_unit(a)).to(device))
            self.real_used.append({"site": name, "channels": int(a.shape[0]), "shape": a.shape[1:]})
        self.real = list(by_c.values())
        self.device = device
        self.arange = torch.arange(crop, device=device)

    def synth_batch(self, batch: int, gen) -> torch.Tensor:
        s, c, h, w = self.synth.shape
        dev = self.device
        idx = torch.randint(0, s, (batch,), generator=gen, device=dev)
        oy = torch.randint(0, h - self.crop + 1, (batch,), generator=gen, device=dev)
        ox = torch.randint(0, w - self.crop + 1, (batch,), generator=gen, device=dev)
        ys = (oy[:, None] + self.arange)[:, None, :, None]
        xs = (ox[:, None] + self.arange)[:, None, None, :]
        ch = torch.arange(c, device=dev)[None, :, None, None]
        return self.synth[idx[:, None, None, None], ch, ys, xs].float() / 255.0

    def real_batch(self, batch: int, rng: np.random.Generator) -> torch.Tensor:
        g = self.real[rng.integers(len(self.real))]
        out = []
        for _ in range(batch):
            img = g[rng.integers(len(g))]
            h, w = img.shape[-2:]
            y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
            out.append(img[:, y : y + self.crop, x : x + self.crop])
        return torch.stack(out)

    def batch(self, batch: int, real_fraction: float, gen, rng) -> torch.Tensor:
        """(B, C, crop, crop) in [0, 1]: flips per crop, a quarter turn and channel subset per batch.

        Per-crop randomness comes from the device generator ``gen``, per-batch choices from the
        numpy ``rng``, so that no step waits for the device.
        """
        if self.real and rng.random() < real_fraction:
            x = self.real_batch(batch, rng)
        else:
            x = self.synth_batch(batch, gen)
        flip = torch.rand(batch, generator=gen, device=self.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = torch.rot90(x, k=int(rng.integers(4)), dims=(2, 3))
        c = x.shape[1]
        if c > 2 and rng.random() < 0.3:
            k = int(rng.integers(2, c))
            keep = torch.randperm(c, generator=gen, device=self.device)[:k].sort().values
            x = x.index_select(1, keep)
        return x.contiguous()


# -- one variant: model, optimiser, checkpoint --------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME' or 'NAME:key=value,key=value' (keys: loss weights, embed_dim, depth, ...)."""
    name, _, rest = text.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in LOSS_KEYS + ARCH_KEYS:
            raise SystemExit(f"--variant {text!r}: unknown key {k!r} (use {LOSS_KEYS + ARCH_KEYS})")
        over[k] = float(v) if k in LOSS_KEYS or k == "mask_ratio" else int(v)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--variant {text!r}: the name must be letters, digits, '-' or '_'")
    return name, over


class Variant:
    """One model in training: its settings, network, optimiser, random streams and loss curve."""

    def __init__(self, name: str, over: dict, args, device, index: int):
        self.name = name
        self.cfg = {
            "embed_dim": args.embed_dim,
            "depth": args.depth,
            "num_heads": args.num_heads,
            "mask_ratio": args.mask_ratio,
            "pixel_weight": args.pixel_weight,
            "fourier_weight": args.fourier_weight,
            "masked_stats_weight": args.masked_stats_weight,
            "visible_stats_weight": args.visible_stats_weight,
        } | over
        self.dir = args.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed + 1000 * index)
        arch = dict(
            embed_dim=self.cfg["embed_dim"],
            depth=self.cfg["depth"],
            num_heads=self.cfg["num_heads"],
            max_channels=11,
            img_size=256,
            patch_size=16,
        )
        self.encoder = ChannelAgnosticViT(**arch)
        self.mae = MaskedAutoencoder(self.encoder, args.dec_dim, args.dec_depth).to(device)
        self.params = {n: p for n, p in self.mae.named_parameters() if p.requires_grad}
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed + 1000 * index)
        self.rng = np.random.default_rng([args.seed, index])
        self.step = 0
        self.elapsed = 0.0  # seconds of training (this variant's share), summed over resumes
        self.curve: list[dict] = []
        self.running: dict[str, float] = {}
        self.stats_ready = False
        self.runs: list[dict] = []  # one record per training run (resumes append)

    # checkpoint: weights, AdamW moments (by parameter name), step, time, random state, curve
    def save_checkpoint(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.mae.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        for moment in ("exp_avg", "exp_avg_sq"):
            m = {
                n: self.opt.state[p][moment].detach().cpu().contiguous()
                for n, p in self.params.items()
                if p in self.opt.state
            }
            save_file(m, str(tmp / f"adam_{moment}.safetensors"))
        meta = {
            "variant": self.name,
            "cfg": self.cfg,
            "step": self.step,
            "elapsed": self.elapsed,
            "adam_steps": {
                n: float(self.opt.state[p]["step"])
                for n, p in self.params.items()
                if p in self.opt.state
            },
            "generator": base64.b64encode(self.gen.get_state().numpy().tobytes()).decode(),
            "rng": self.rng.bit_generator.state,
            "curve": self.curve,
            "running": self.running,
            "stats_ready": self.stats_ready,
            "runs": self.runs,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def load_checkpoint(self, folder: Path) -> None:
        meta = json.loads((folder / "state.json").read_text())
        if meta["cfg"] != self.cfg:
            raise SystemExit(f"{folder}: checkpoint of other settings {meta['cfg']} != {self.cfg}")
        dev = next(self.mae.parameters()).device
        self.mae.load_state_dict(
            {k: v.to(dev) for k, v in load_file(str(folder / "model.safetensors")).items()}
        )
        m = load_file(str(folder / "adam_exp_avg.safetensors"))
        v = load_file(str(folder / "adam_exp_avg_sq.safetensors"))
        for n, p in self.params.items():
            if n in m:
                self.opt.state[p] = {
                    "step": torch.tensor(meta["adam_steps"][n]),
                    "exp_avg": m[n].to(dev),
                    "exp_avg_sq": v[n].to(dev),
                }
        state = np.frombuffer(base64.b64decode(meta["generator"]), dtype=np.uint8).copy()
        self.gen.set_state(torch.from_numpy(state))
        self.rng.bit_generator.state = meta["rng"]
        self.step, self.elapsed = meta["step"], meta["elapsed"]
        self.curve, self.running = meta["curve"], meta["running"]
        self.stats_ready = meta["stats_ready"]
        self.runs = meta.get("runs", [])
        print(
            f"[{self.name}] resumed at step {self.step} ({self.elapsed / 60:.1f} min)", flush=True
        )

    def train_step(self, bank: Bank, args, lr: float) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the losses as detached device tensors (no sync)."""
        dev = bank.device
        x = bank.batch(args.batch, args.real_fraction if bank.real else 0.0, self.gen, self.rng)
        for g in self.opt.param_groups:
            g["lr"] = lr
        grid = 256 // 16
        rows = x.shape[-1] // 16
        o = self.rng.integers(0, grid - rows + 1, 2).tolist()
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.amp == "bf16" else _null()
        xs, stats = self.mae.targets(x)
        cfg = self.cfg
        with amp:
            parts = self.mae.masked_losses(xs, stats, cfg["mask_ratio"], self.gen, o)
            if cfg["visible_stats_weight"]:
                parts["visible_stats"] = self.mae.visible_stats_loss(x, stats)
        loss = (
            cfg["pixel_weight"] * parts["pixel"]
            + cfg["fourier_weight"] * parts["fourier"]
            + cfg["masked_stats_weight"] * parts["masked_stats"]
            + cfg["visible_stats_weight"] * parts.get("visible_stats", 0.0)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.opt.step()
        return {"loss": loss.detach()} | {k: v.detach() for k, v in parts.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# -- saving and card ---------------------------------------------------------------------------


def save_encoder(v: Variant, path: Path, dtype: str) -> None:
    """The encoder alone (what inference loads), as float16 or float32 safetensors."""
    dt = torch.float16 if dtype == "float16" else torch.float32
    state = {k: t.detach().to(dt).cpu().contiguous() for k, t in v.encoder.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"1 x {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def make_card(v: Variant, args, bank: Bank, device, recipe_argv: list[str]) -> dict:
    cfg = v.cfg
    every = max(1, len(v.curve) // 200)
    return {
        "name": "default",
        "description": (
            "Small channel-agnostic ViT trained by this project, self-supervised ("
            + (
                "masked autoencoder, "
                if cfg["pixel_weight"] or cfg["fourier_weight"]
                else "masked prediction of "
            )
            + "texture statistics, and the same statistics read linearly off unmasked tokens) "
            "on synthetic Cell Painting plates"
            + (" and a few real Cell Painting images" if bank.real_used else "")
            + ". For tests, demos and offline use: real discovery needs OpenPhenom or your own "
            "checkpoint."
        ),
        "architecture": {"class": "ChannelAgnosticViT", **v.encoder.architecture()},
        "weights_dtype": args.save_dtype,
        "input_normalisation": (
            "uint8 / 255, other dtypes / per-site per-channel maximum; then per-tile per-channel "
            "standardisation (instance norm without affine, eps 1e-5)"
        ),
        "training": {
            "variant": v.name,
            "objective": (
                f"{cfg['pixel_weight']} x MSE of standardised pixels of masked tokens + "
                f"{cfg['fourier_weight']} x MSE of their 16x16 amplitude spectra + "
                f"{cfg['masked_stats_weight']} x MSE of their texture statistics (decoder) + "
                f"{cfg['visible_stats_weight']} x MSE of every token's texture statistics read "
                "by a linear head from an unmasked pass; statistics per channel token: "
                + ", ".join(STAT_NAMES)
                + f" of the standardised stain over the patch and its {WINDOWS[1:]} patch "
                "windows (max: maximum over the window, others: mean), each normalised by its "
                "mean and sd over the first batches"
            ),
            "mask_ratio": cfg["mask_ratio"],
            "decoder": {"dim": args.dec_dim, "depth": args.dec_depth, "discarded": True},
            "steps": v.step,
            "batch": args.batch,
            "crop": args.crop,
            "optimizer": {
                "name": "AdamW",
                "lr": args.lr,
                "betas": [0.9, 0.95],
                "weight_decay": args.weight_decay,
                "grad_clip": 1.0,
                "schedule": (
                    f"linear warmup {args.warmup} steps, then cosine to 2% over "
                    "max(step / max_steps, elapsed / time budget)"
                ),
                "max_steps": args.steps,
                "time_budget_minutes": args.minutes,
            },
            "augmentation": (
                f"random {args.crop} px crops, flips per crop, a quarter turn per batch, a random "
                "subset of >= 2 channels in 30% of batches"
            ),
            "precision": "bf16 autocast" if args.amp == "bf16" else "float32",
            "seed": args.seed,
            "hardware": hardware(device),
            "seconds": round(v.elapsed, 1),
            "runs": v.runs,
            "final_loss_smoothed": {k: round(x, 4) for k, x in v.running.items()},
        },
        "data": {
            "synthetic": {
                "generator": "napari_concept_discovery.synth.generate_site (its defaults)",
                "n_plates": args.train_plates,
                "n_wells": args.wells,
                "n_sites": args.sites,
                "size": args.size,
                "seed": args.data_seed,
            },
            "real": [
                {k: (list(x) if k == "shape" else x) for k, x in r.items()} for r in bank.real_used
            ],
            "real_fraction_of_batches": args.real_fraction if bank.real_used else 0.0,
        },
        "loss_curve": v.curve[::every],
    }


def probe_key(summary: dict, bars: dict) -> tuple:
    met = sum(bool(r["met"]) for r in bars.values() if r["met"] is not None)
    return (met, summary["perturbation_margin_min"])


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("scratch/default_model"))
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where the winner ships")
    ap.add_argument("--device", default=None, help="torch device (default: CUDA if available)")
    ap.add_argument("--variant", action="append", default=None, help="NAME[:key=value,...]")
    ap.add_argument("--resume", action="store_true", help="continue each variant's checkpoint")
    ap.add_argument(
        "--minutes", type=float, default=5.0, help="training time budget (all variants)"
    )
    ap.add_argument("--steps", type=int, default=100000, help="at most this many steps per variant")
    ap.add_argument("--checkpoint-minutes", type=float, default=2.0)
    ap.add_argument(
        "--mirror-checkpoint",
        type=Path,
        default=None,
        help="also keep the first variant's checkpoint here (and the winner's at the end)",
    )
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--dec-dim", type=int, default=128)
    ap.add_argument("--dec-depth", type=int, default=2)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--pixel-weight", type=float, default=1.0)
    ap.add_argument("--fourier-weight", type=float, default=1.0)
    ap.add_argument("--masked-stats-weight", type=float, default=1.0)
    ap.add_argument("--visible-stats-weight", type=float, default=1.0)
    ap.add_argument("--train-plates", type=int, default=12)
    ap.add_argument("--wells", type=int, default=64)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--data-seed", type=int, default=1000)
    ap.add_argument("--real", type=Path, nargs="*", default=[], help="folders of real plates")
    ap.add_argument("--real-npz", type=Path, default=None, help="real sites packed by --pack-real")
    ap.add_argument("--real-fraction", type=float, default=0.1)
    ap.add_argument("--pack-real", type=Path, default=None, help="pack --real folders here, exit")
    ap.add_argument("--pack-crop", type=int, default=768)
    ap.add_argument(
        "--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 on CUDA only"
    )
    ap.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--workers", type=int, default=None, help="processes for data (default: cores)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--probe-wells", type=int, default=None, help="held-out wells per plate")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.pack_real is not None:
        pack_real(args.real, args.pack_real, args.pack_crop)
        return 0
    args.variant = args.variant or ["A"]
    variants_spec = [parse_variant(t) for t in args.variant]
    if len({n for n, _ in variants_spec}) != len(variants_spec):
        raise SystemExit("--variant names must differ")
    t_all = time.time()
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_concept_discovery.models import pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" else "off"
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"device {hardware(device)}; {workers} data workers", flush=True)

    synth = synthetic_sites(
        args.train_plates, args.wells, args.sites, args.size, args.data_seed, workers
    )
    real = read_real_sites(args.real) if args.real else {}
    if args.real_npz is not None:
        with np.load(args.real_npz) as z:
            real |= {k.replace("__", "/"): z[k] for k in z.files}
    bank = Bank(synth, real, device, args.crop)
    del synth
    print(
        f"{bank.synth.shape[0]} synthetic sites, {len(bank.real_used)} real sites "
        f"({time.time() - t_all:.0f}s)",
        flush=True,
    )

    variants = [Variant(n, o, args, device, i) for i, (n, o) in enumerate(variants_spec)]
    for v in variants:
        ck = v.dir / "checkpoint"
        if args.resume and (ck / "state.json").is_file():
            v.load_checkpoint(ck)
        if not v.stats_ready:
            v.mae.fit_stats_norm([bank.synth_batch(32, v.gen) for _ in range(4)])
            v.stats_ready = True

    budget = args.minutes * 60.0
    warmup = args.warmup
    start = {v.name: (v.step, v.elapsed) for v in variants}
    # Wall time of training so far, shared by the variants (they take turns step by step).
    spent_before = max((v.elapsed for v in variants), default=0.0) * len(variants)
    t_train = time.time()

    def wall() -> float:
        return spent_before + time.time() - t_train

    def progress(v: Variant) -> float:
        return max(v.step / args.steps, wall() / budget)

    def lr_at(v: Variant) -> float:
        if v.step < warmup:
            return args.lr * (v.step + 1) / warmup
        t = min(1.0, progress(v))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    def record(v: Variant, running: dict[str, torch.Tensor]) -> None:
        v.running = {k: round(float(x), 4) for k, x in running.items()}  # syncs the device
        v.elapsed = wall() / len(variants)
        v.curve.append({"step": v.step, **v.running})

    last_ck = time.time()
    running: dict[str, dict[str, torch.Tensor]] = {
        v.name: {k: torch.tensor(x, device=device) for k, x in v.running.items()} for v in variants
    }
    for v in variants:
        v.mae.train()
    active = list(variants)
    while active:
        for v in list(active):
            if progress(v) >= 1.0:
                record(v, running[v.name])
                active.remove(v)
                continue
            vals = v.train_step(bank, args, lr_at(v))
            r = running[v.name]
            for k, x in vals.items():
                r[k] = x.clone() if k not in r else 0.98 * r[k] + 0.02 * x
            v.step += 1
            if v.step % 25 == 0:
                record(v, r)
            if v.step % 100 == 0:
                run = "  ".join(f"{k} {x:.3f}" for k, x in v.running.items())
                print(
                    f"[{v.name}] step {v.step:6d}  {run}  lr {lr_at(v):.2e}  "
                    f"{wall() / len(variants) / v.step * 1000:.0f} ms/step  {wall() / 60:.1f} min",
                    flush=True,
                )
        if time.time() - last_ck > args.checkpoint_minutes * 60 and active:
            for i, v in enumerate(variants):
                record(v, running[v.name])
                v.save_checkpoint(v.dir / "checkpoint")
                if i == 0 and args.mirror_checkpoint is not None:
                    v.save_checkpoint(args.mirror_checkpoint)
            last_ck = time.time()
            print(f"checkpoints saved ({(time.time() - t_all) / 60:.1f} min)", flush=True)

    recipe_argv = [a for a in argv]
    results = []
    for v in variants:
        v.runs.append(
            {
                "command": "python scripts/train_default_model.py " + " ".join(recipe_argv),
                "hardware": hardware(device),
                "time_budget_minutes": args.minutes,
                "side_by_side": [o.name for o in variants],
                "steps": [start[v.name][0], v.step],
                "seconds": round(v.elapsed - start[v.name][1], 1),
                "resumed": start[v.name][0] > 0,
            }
        )
        v.save_checkpoint(v.dir / "checkpoint")
        v.mae.eval()
        weights = v.dir / "default.safetensors"
        save_encoder(v, weights, args.save_dtype)
        card = make_card(v, args, bank, device, recipe_argv)
        (v.dir / "default.json").write_text(json.dumps(card, indent=1))
        print(f"[{v.name}] saved {weights} ({weights.stat().st_size / 1e6:.1f} MB)", flush=True)
        results.append((v, weights, card))
    # Provisional output (the first variant, unprobed) in case the probes do not finish.
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results[0][1], args.out / "default.safetensors")
    (args.out / "default.json").write_text(json.dumps(results[0][2], indent=1))
    if args.mirror_checkpoint is not None:
        variants[0].save_checkpoint(args.mirror_checkpoint)
    del bank
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_probe:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from probe_default_model import run_probe

        heldout = {"n_wells": args.probe_wells} if args.probe_wells else None
        for v, weights, card in results:
            t0 = time.time()
            probe = run_probe(weights, device=str(device), workers=workers, heldout=heldout)
            card["probe"] = probe
            card["default_block"] = probe["default_block"]
            v.runs[-1]["probe_summary"] = probe["summary"]
            v.runs[-1]["probe_table"] = probe["table"]
            v.save_checkpoint(v.dir / "checkpoint")
            (v.dir / "default.json").write_text(json.dumps(card, indent=1))
            print(f"[{v.name}] probe ({time.time() - t0:.0f}s):\n{probe['table']}", flush=True)
            print(json.dumps(probe["summary"]), flush=True)
        best = max(
            results,
            key=lambda r: probe_key(
                r[2]["probe"]["summary"], r[2]["probe"]["bars"][str(r[2]["default_block"])]
            ),
        )
    else:
        best = results[0]
    v, weights, card = best
    card["training"]["side_by_side_this_run"] = {
        o.name: {
            "settings": o.cfg,
            "steps": o.step,
            "probe_summary": c.get("probe", {}).get("summary"),
            "probe_table": c.get("probe", {}).get("table"),
        }
        for o, _, c in results
    }
    card["training"]["chosen_variant"] = v.name
    card["training"]["total_seconds"] = round(time.time() - t_all, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, args.out / "default.safetensors")
    (args.out / "default.json").write_text(json.dumps(card, indent=1))
    if args.mirror_checkpoint is not None:
        v.save_checkpoint(args.mirror_checkpoint)
    print(
        f"shipped variant {v.name} to {args.out} ({(time.time() - t_all) / 60:.1f} min)", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
