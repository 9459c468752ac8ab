"""Writes old_format.safetensors and tokens.npz: a dictionary file in the layout written before
DictionaryMeta (whitening recorded three times: ``meta["whitening"]`` without eps,
``meta["train_settings"]["whiten"]``, and the whitener's own ``params`` with ``by`` as
``group_by``), with the tokens and table it was trained on and the codes it gave.

Run once with the code of commit 8ab843a (`git worktree add /tmp/old 8ab843a`, then
`PYTHONPATH=/tmp/old/src python tests/data/dictionary_v1/make.py`); the files are kept as they
came out, so that tests/dictionary/test_dictionary_meta.py checks what an old file gives today.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import WhitenSettings

HERE = Path(__file__).parent


class TinyStore:
    """What ``train_on_store`` reads of an activation store, over seeded random tokens."""

    model_id = "tiny-vit"
    model_source = "timm:tiny?seed=1"
    weights_hash = "ab" * 32
    block = 3
    embed_dim = 16
    token_groups = 2
    channel_names = ("DNA", "RNA")
    has_channel_tokens = True
    signature = "0123456789abcdef"
    path = "tiny-store"

    def __init__(self):
        rng = np.random.default_rng(7)
        n = 240
        self._table = pd.DataFrame(
            {
                "plate": np.repeat(["P1", "P2"], n // 2),
                "well": np.tile(np.repeat(["A01", "A02", "B01", "B02"], n // 8), 2),
                "well_type": np.tile(np.repeat(["negative_control", "treatment"], n // 4), 2),
            }
        )
        self._tokens = rng.normal(size=(n, 32)).astype(np.float32)
        self._tokens[self._table["well_type"].to_numpy() == "treatment", :4] += 1.5

    def tokens(self, unit, form="mean"):
        return self._tokens

    def table(self, unit):
        return self._table


if __name__ == "__main__":
    store = TinyStore()
    sys.path.insert(0, str(HERE.parents[1]))
    from helpers import small_train  # the tests' small training settings

    whiten = WhitenSettings("well_type=negative_control", by="plate", n_components=8, eps=1e-5)
    settings = small_train(checkpoint_every=0, whiten=whiten)
    out = HERE / "old_format.safetensors"
    trained = train_on_store(store, settings, out=out, overwrite=True)
    codes = trained.dictionary.encode_table(store.tokens("cell"), store.table("cell"))
    np.savez_compressed(
        HERE / "tokens.npz",
        tokens=store.tokens("cell"),
        codes=codes.toarray(),
        **{f"table_{c}": store.table("cell")[c].to_numpy(str) for c in store.table("cell")},
    )
    print(out, out.stat().st_size)
