"""Train the bundled default model: a small channel-agnostic ViT as a masked autoencoder.

Reproducible CPU job (about 20 minutes on two shared cores). It writes synthetic Cell Painting
plates with ``write_synthetic_plates`` (training plates and held-out plates from other seeds),
optionally adds folders of real images, trains an MAE on random 128 px crops, saves the encoder
as ``models/weights/default.safetensors`` and writes the model card ``default.json`` with the
architecture, data, steps, loss curve and the linear-probe numbers of ``probe_default_model.py``.

Why these choices: the MAE encodes only the visible 25% of the tokens, so a step costs about a
quarter of a full forward pass; positions are fixed sin-cos computed for any grid, so 128 px crops
(8x8 patches per channel) train the same weights that later see 256 px tiles. The decoder is
thrown away; masked tokens of channel c are given the mean of the visible tokens of channel c as
context, so the decoder knows which channel to draw without a learned channel embedding and the
whole model stays channel-agnostic.

    python scripts/train_default_model.py --minutes 22 --real ../shared/data/real
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch import nn

from napari_concept_discovery.models import scale_to_unit
from napari_concept_discovery.models.vit import ChannelAgnosticViT, sincos_2d, standardize

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src/napari_concept_discovery/models/weights"

ARCH = dict(embed_dim=192, depth=4, num_heads=3, max_channels=11, img_size=256, patch_size=16)


class MaskedAutoencoder(nn.Module):
    """Channel-agnostic MAE around a ``ChannelAgnosticViT`` encoder (decoder used for training only)."""

    def __init__(
        self,
        encoder: ChannelAgnosticViT,
        dec_dim: int = 128,
        dec_depth: int = 1,
        fourier_weight: float = 1.0,
    ):
        super().__init__()
        self.fourier_weight = float(fourier_weight)
        self.encoder = encoder
        self.dec_embed = nn.Linear(encoder.embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.dec_blocks = nn.ModuleList(
            [Block(dec_dim, num_heads=4, mlp_ratio=4.0, qkv_bias=True) for _ in range(dec_depth)]
        )
        self.dec_norm = nn.LayerNorm(dec_dim)
        self.dec_pred = nn.Linear(dec_dim, encoder.patch_size**2)
        self.dec_dim = dec_dim
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        b, c, h, w = x.shape
        p = enc.patch_size
        # Patch embedding as in the encoder, but each crop gets the positions of a random place
        # inside a full tile, so that positions 8..15 are seen in training, not only at inference.
        xs = standardize(x)
        tokens = enc.patch_embed.proj(xs.reshape(b * c, 1, h, w))
        rows, cols = tokens.shape[-2:]
        n = rows * cols
        tokens = tokens.reshape(b, c, enc.embed_dim, n).transpose(2, 3)
        grid = enc.img_size // p
        oy = np.random.randint(0, grid - rows + 1)  # noqa: NPY002 (seeded in main)
        ox = np.random.randint(0, grid - cols + 1)  # noqa: NPY002
        pos_full = sincos_2d(grid, grid, enc.embed_dim).reshape(grid, grid, -1)
        pos = pos_full[oy : oy + rows, ox : ox + cols].reshape(n, -1)
        tokens = (tokens + pos).reshape(b, c * n, enc.embed_dim)
        total = c * n
        keep = max(c, int(round(total * (1 - mask_ratio))))
        order = torch.rand(b, total).argsort(dim=1)
        visible = order[:, :keep]
        vis = torch.gather(tokens, 1, visible[..., None].expand(-1, -1, enc.embed_dim))
        z = enc.prepend_cls(vis)
        for blk in enc.blocks:
            z = blk(z)
        z = self.dec_embed(z)
        cls, zv = z[:, :1], z[:, 1:]

        # Context per channel: mean of that channel's visible decoder tokens (channel-agnostic).
        chan_of_vis = visible // n  # (B, keep)
        onehot = torch.nn.functional.one_hot(chan_of_vis, c).float()  # (B, keep, C)
        counts = onehot.sum(1).clamp_min(1.0)  # (B, C)
        ctx = torch.einsum("bkc,bkd->bcd", onehot, zv) / counts[..., None]  # (B, C, Dd)

        full = self.mask_token.expand(b, total, -1).clone()
        full = full + ctx.repeat_interleave(n, dim=1)
        full = full.scatter(1, visible[..., None].expand(-1, -1, self.dec_dim), zv)
        dpos = sincos_2d(grid, grid, self.dec_dim).reshape(grid, grid, -1)
        pos = dpos[oy : oy + rows, ox : ox + cols].reshape(n, -1).repeat(c, 1)[None]
        y = torch.cat([cls, full + pos], dim=1)
        for blk in self.dec_blocks:
            y = blk(y)
        pred = self.dec_pred(self.dec_norm(y[:, 1:]))  # (B, C*N, p*p)

        target = xs.reshape(b, c, rows, p, cols, p).permute(0, 1, 2, 4, 3, 5)
        target = target.reshape(b, total, p * p)
        masked = torch.ones(b, total, dtype=torch.bool)
        masked.scatter_(1, visible, False)
        err = ((pred - target) ** 2).mean(-1)
        if self.fourier_weight:
            # Texture term (as OpenPhenom's MAE): amplitude spectra of the 16x16 patches, which a
            # blurry mean prediction cannot match; phase is free, so stochastic textures
            # (mitochondria, ER, Golgi puncta) are rewarded for their kind, not their exact pixels.
            amp_p = torch.fft.rfft2(pred.reshape(b, total, p, p), norm="ortho").abs()
            amp_t = torch.fft.rfft2(target.reshape(b, total, p, p), norm="ortho").abs()
            err = err + self.fourier_weight * ((amp_p - amp_t) ** 2).mean((-1, -2))
        loss = (err * masked).sum() / masked.sum()
        return loss, pred


def load_sites(roots: list[Path], pattern: str | None = None) -> list[np.ndarray]:
    """All sites of the given plate folders as float32 (C, H, W) in [0, 1] (the model's scaling)."""
    from napari_concept_discovery.plate import open_plate

    out = []
    for root in roots:
        plate = open_plate(root, pattern=pattern)
        for site in plate:
            out.append(scale_to_unit(site.read()))
    return out


#: Filename patterns tried on real folders that no layout preset recognises (NF1 naming).
REAL_PATTERNS = ("{well}_01_{channel_index}_{site}_{channel}_001.tif",)


def find_plates(root: Path, depth: int = 2):
    """(folder, sites) for ``root`` if it opens as a plate, else for its sub-folders (2 levels)."""
    for pattern in (None, *REAL_PATTERNS):
        try:
            yield root, load_sites([root], pattern)
            return
        except Exception as exc:  # not a plate folder (with this pattern): say so, try on
            print(f"{root}: not a plate with pattern {pattern}: {str(exc)[:120]}", file=sys.stderr)
    if depth > 0:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            yield from find_plates(sub, depth - 1)


def sample_batch(
    groups: list[list[np.ndarray]], weights: np.ndarray, batch: int, crop: int, rng
) -> torch.Tensor:
    """Random crops (B, C, crop, crop) from one group of sites with the same channel count.

    Flips and quarter turns augment; with probability 0.3 a random subset of at least two
    channels is kept so the encoder sees varying channel sets (it is channel-agnostic).
    """
    g = groups[rng.choice(len(groups), p=weights)]
    c = g[0].shape[0]
    chans = np.arange(c)
    if c > 2 and rng.random() < 0.3:
        chans = np.sort(rng.choice(c, size=rng.integers(2, c), replace=False))
    out = np.empty((batch, len(chans), crop, crop), np.float32)
    for i in range(batch):
        img = g[rng.integers(len(g))]
        y = rng.integers(0, img.shape[1] - crop + 1)
        x = rng.integers(0, img.shape[2] - crop + 1)
        patch = img[chans, y : y + crop, x : x + crop]
        patch = np.rot90(patch, k=rng.integers(4), axes=(1, 2))
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        out[i] = patch
    return torch.from_numpy(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("scratch/default_model"))
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--real", type=Path, nargs="*", default=[], help="folders of real plates")
    ap.add_argument("--train-plates", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="at most this many steps")
    ap.add_argument(
        "--minutes",
        type=float,
        default=22.0,
        help="time budget: the schedule runs on max(step/steps, elapsed/budget) and stops at 1",
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--real-fraction", type=float, default=0.1)
    ap.add_argument("--fourier-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--init-encoder",
        type=Path,
        default=None,
        help="continue from encoder weights (safetensors + card); the decoder starts fresh",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 (crop positions inside the tile grid)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from napari_concept_discovery.synth import write_synthetic_plates

    synth_train = args.workdir / "synth_train"
    if not (synth_train / "metadata.csv").exists():
        t0 = time.time()
        write_synthetic_plates(
            synth_train,
            n_plates=args.train_plates,
            n_wells=24,
            n_sites=2,
            size=512,
            seed=1000,
            workers=args.threads,
        )
        print(f"wrote training plates in {time.time() - t0:.0f}s", flush=True)
    plate_dirs = sorted(p for p in (synth_train / "images").glob("*/Plate*") if p.is_dir())
    synth_sites = load_sites([synth_train])
    groups: list[list[np.ndarray]] = [synth_sites]
    weights = [1.0]
    real_used = []
    for root in args.real:
        for sub, sites in find_plates(root):
            sites = [s for s in sites if min(s.shape[1:]) >= args.crop]
            by_c: dict[int, list[np.ndarray]] = {}
            for s in sites:
                by_c.setdefault(s.shape[0], []).append(s)
            for c, ss in by_c.items():
                groups.append(ss)
                real_used.append({"folder": str(sub), "sites": len(ss), "channels": c})
    if len(groups) > 1:
        w = args.real_fraction / (len(groups) - 1)
        weights = [1.0 - args.real_fraction] + [w] * (len(groups) - 1)
    weights = np.asarray(weights) / np.sum(weights)
    print(f"{len(synth_sites)} synthetic sites; real groups: {real_used}", flush=True)

    encoder = ChannelAgnosticViT(**ARCH)
    previous = None
    if args.init_encoder is not None:
        from safetensors.torch import load_file

        encoder.load_state_dict(load_file(str(args.init_encoder)), strict=True)
        card_in = args.init_encoder.with_suffix(".json")
        previous = json.loads(card_in.read_text()).get("training") if card_in.is_file() else None
    mae = MaskedAutoencoder(encoder, fourier_weight=args.fourier_weight)
    params = [p for p in mae.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = 25

    budget = args.minutes * 60.0

    def progress(step: int) -> float:
        """Fraction of training done: steps or wall time, whichever runs out first."""
        return max(step / args.steps, (time.time() - t_start) / budget)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = min(1.0, progress(step))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    curve = []
    t_start = time.time()
    running = None
    mae.train()
    steps_done = 0
    for step in range(args.steps):
        if step >= warmup and progress(step) >= 1.0:
            break
        steps_done = step + 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = sample_batch(groups, weights, args.batch, args.crop, rng)
        loss, _ = mae(x, args.mask_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        val = float(loss.detach())
        running = val if running is None else 0.95 * running + 0.05 * val
        if step % 10 == 0:
            el = time.time() - t_start
            curve.append({"step": step, "loss": round(val, 4), "smoothed": round(running, 4)})
            print(
                f"step {step:5d}  loss {val:.4f}  smoothed {running:.4f}  "
                f"lr {lr_at(step):.2e}  {el / (step + 1):.2f}s/step  elapsed {el / 60:.1f} min",
                flush=True,
            )
    train_seconds = time.time() - t_start
    if not curve or curve[-1]["step"] != steps_done - 1:
        curve.append({"step": steps_done - 1, "loss": round(val, 4), "smoothed": round(running, 4)})

    args.out.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    weights_path = args.out / "default.safetensors"
    save_file(state, str(weights_path), metadata={"format": "pt"})
    card = {
        "name": "default",
        "description": (
            "Small channel-agnostic ViT trained by this project as a masked autoencoder on "
            "synthetic Cell Painting plates"
            + (" and a few real Cell Painting images" if real_used else "")
            + ". For tests, demos and offline use: real discovery needs OpenPhenom or your own "
            "checkpoint."
        ),
        "architecture": {"class": "ChannelAgnosticViT", **encoder.architecture()},
        "input_normalisation": (
            "uint8 / 255, other dtypes / per-site per-channel maximum; then per-tile per-channel "
            "standardisation (instance norm without affine, eps 1e-5)"
        ),
        "training": {
            "objective": (
                "masked autoencoder: MSE on standardised pixels of masked tokens + "
                f"{args.fourier_weight} x MSE of their 16x16 amplitude spectra"
            ),
            "mask_ratio": args.mask_ratio,
            "decoder": {"dim": mae.dec_dim, "depth": len(mae.dec_blocks), "discarded": True},
            "steps": steps_done,
            "max_steps": args.steps,
            "time_budget_minutes": args.minutes,
            "batch": args.batch,
            "crop": args.crop,
            "optimizer": {
                "name": "AdamW",
                "lr": args.lr,
                "betas": [0.9, 0.95],
                "weight_decay": args.weight_decay,
                "schedule": (
                    f"linear warmup {warmup} steps, then cosine to 2% over "
                    "max(step/max_steps, elapsed/time budget)"
                ),
            },
            "augmentation": (
                "random 128 px crops placed at random positions of a 256 px tile's grid, flips, "
                "quarter turns, random channel subsets (p=0.3)"
            ),
            "seed": args.seed,
            "threads": args.threads,
            "seconds": round(train_seconds, 1),
            "final_loss_smoothed": round(running, 4),
            "continued_from": previous,
        },
        "data": {
            "synthetic": {
                "generator": "napari_concept_discovery.synth.write_synthetic_plates",
                "n_plates": args.train_plates,
                "n_wells": 24,
                "n_sites": 2,
                "size": 512,
                "seed": 1000,
                "plates": [p.name for p in plate_dirs],
            },
            "real": real_used,
            "real_fraction_of_batches": args.real_fraction if real_used else 0.0,
        },
        "loss_curve": curve,
    }
    card_path = args.out / "default.json"
    card_path.write_text(json.dumps(card, indent=1))
    print(f"saved {weights_path} ({weights_path.stat().st_size / 1e6:.1f} MB)", flush=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_default_model import run_probe

    probe = run_probe(weights_path, workdir=args.workdir, threads=args.threads)
    card["probe"] = probe
    card["default_block"] = probe["default_block"]
    card_path.write_text(json.dumps(card, indent=1))
    print(json.dumps(probe, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
