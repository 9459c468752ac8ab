"""Linear probes on crop tokens of held-out synthetic plates: does the default model carry biology?

Two held-out plates (seed 2000, never seen in training, each with its own batch effects) are cut
into 256 px tiles; a crop token is the mean of a tile's patch tokens (channel tokens averaged),
taken after every block in one forward pass. A standardised logistic regression is fitted on
one plate and scored on the other (both ways, averaged), for:

- cell type (3 classes), on all crops;
- perturbation among the control and the non-null perturbations (7 classes), on crops of
  wells with those conditions; null perturbations are left out because nothing distinguishes them.

The same is done for a randomly initialised copy of the network (timm's init, same seed), the
baseline the trained weights must beat clearly. Results go into the model card.

    python scripts/probe_default_model.py [--weights .../default.safetensors]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_concept_discovery.models import (
    ChannelAgnosticViT,
    load_card_model,
    scale_to_unit,
)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src/napari_concept_discovery/models/weights"


def heldout_plates(workdir: Path, n_wells: int = 48, seed: int = 2000) -> Path:
    """Two plates from a seed the training never used (48 wells: every condition per type)."""
    from napari_concept_discovery.synth import write_synthetic_plates

    out = workdir / f"synth_heldout_{n_wells}_{seed}"
    if not (out / "metadata.csv").exists():
        write_synthetic_plates(
            out, n_plates=2, n_wells=n_wells, n_sites=1, size=512, seed=seed, workers=2
        )
    return out


@torch.inference_mode()
def crop_tokens_all_blocks(model: ChannelAgnosticViT, plate_dir: Path, batch: int = 8):
    """Crop tokens after every block, (n_blocks, n_crops, D), and a table of crop labels."""
    from napari_concept_discovery.embed import tile_image
    from napari_concept_discovery.plate import open_plate

    plate = open_plate(plate_dir)
    tiles, rows = [], []
    for key, site in plate.sites.items():
        t, _ = tile_image(scale_to_unit(site.read()), model.img_size)
        tiles.append(t)
        for _ in range(len(t)):
            rows.append(
                {
                    "plate": key.plate,
                    "well": key.well,
                    "site": key.site,
                    "cell_type": site.metadata["cell_type"],
                    "perturbation": site.metadata["perturbation"],
                }
            )
    tiles = np.concatenate(tiles)
    feats = [[] for _ in range(model.num_blocks)]
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[i : i + batch])
        t, _ = model.embed_patches(x)
        t = model.prepend_cls(t)
        for b, blk in enumerate(model.blocks):
            t = blk(t)
            feats[b].append(t[:, 1:].mean(dim=1).numpy())  # mean over channels and patches
    return np.stack([np.concatenate(f) for f in feats]), pd.DataFrame(rows)


def probe(features: np.ndarray, table: pd.DataFrame, column: str, keep=None) -> dict:
    """Balanced accuracy of a logistic regression fitted on one plate, scored on the other."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mask = np.ones(len(table), bool) if keep is None else table[column].isin(keep).to_numpy()
    plates = sorted(table.plate.unique())
    scores = []
    for train_plate in plates:
        tr = mask & (table.plate == train_plate).to_numpy()
        te = mask & (table.plate != train_plate).to_numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
        clf.fit(features[tr], table[column][tr])
        scores.append(balanced_accuracy_score(table[column][te], clf.predict(features[te])))
    y = table[column][mask]
    return {
        "balanced_accuracy": round(float(np.mean(scores)), 4),
        "per_direction": [round(float(s), 4) for s in scores],
        "classes": int(y.nunique()),
        "chance": round(1.0 / y.nunique(), 4),
        "n_crops": int(mask.sum()),
    }


def run_probe(
    weights: Path, workdir: Path = Path("scratch/default_model"), threads: int = 2, seed: int = 0
) -> dict:
    """All probe numbers for the card: per block, trained vs random initialisation."""
    from napari_concept_discovery.synth import PERTURBATIONS

    torch.set_num_threads(threads)
    t0 = time.time()
    plates = heldout_plates(Path(workdir))
    backend = load_card_model(Path(weights), Path(weights).with_suffix(".json"))
    trained = backend.model
    torch.manual_seed(seed)
    random_net = ChannelAgnosticViT(**trained.architecture()).eval()
    non_null = ["control"] + [p.name for p in PERTURBATIONS if not p.is_null]
    result = {
        "heldout": {
            "generator_seed": 2000,
            "n_plates": 2,
            "n_wells": 48,
            "n_sites": 1,
            "size": 512,
            "protocol": "fit on one plate, score on the other, mean",
        },
        "unit": "crop token (mean of a 256 px tile's patch tokens, channel tokens averaged)",
        "blocks": {},
    }
    for name, net in (("trained", trained), ("random_init", random_net)):
        feats, table = crop_tokens_all_blocks(net, plates)
        for b in range(net.num_blocks):
            entry = result["blocks"].setdefault(str(b), {})
            entry[name] = {
                "cell_type": probe(feats[b], table, "cell_type"),
                "perturbation_non_null": probe(feats[b], table, "perturbation", keep=non_null),
            }

    def score(b):
        e = result["blocks"][str(b)]["trained"]
        return e["cell_type"]["balanced_accuracy"] + e["perturbation_non_null"]["balanced_accuracy"]

    best = max(range(trained.num_blocks), key=score)
    result["default_block"] = best
    result["summary"] = {
        "block": best,
        "cell_type_trained": result["blocks"][str(best)]["trained"]["cell_type"][
            "balanced_accuracy"
        ],
        "cell_type_random": result["blocks"][str(best)]["random_init"]["cell_type"][
            "balanced_accuracy"
        ],
        "perturbation_trained": result["blocks"][str(best)]["trained"]["perturbation_non_null"][
            "balanced_accuracy"
        ],
        "perturbation_random": result["blocks"][str(best)]["random_init"]["perturbation_non_null"][
            "balanced_accuracy"
        ],
    }
    result["seconds"] = round(time.time() - t0, 1)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR / "default.safetensors")
    ap.add_argument("--workdir", type=Path, default=Path("scratch/default_model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-card", action="store_true", help="print only; leave the card alone")
    args = ap.parse_args(argv)
    result = run_probe(args.weights, args.workdir, args.threads)
    print(json.dumps(result["summary"], indent=1))
    if not args.no_card:
        card_path = args.weights.with_suffix(".json")
        card = json.loads(card_path.read_text())
        card["probe"] = result
        card["default_block"] = result["default_block"]
        card_path.write_text(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
