"""Sparse dictionary learning on foundation-model activations: whitening, ICFL, TopK SAE.

Qt-free; torch lives here (docs/architecture.md, "Dictionaries"). The modules, each importable on its own:

- ``settings``: WhitenSettings, TrainSettings, AnalyzeSettings (no torch; the CLI and forms);
- ``whiten``: control-based whitening; ``base``, ``icfl``, ``topk``: the methods;
- ``registry``: the methods by name; ``training``: the training loop; ``metrics``: evaluation;
- ``applied``: a trained dictionary (whitening + coder + metadata) and the one encode loop;
- ``views``: the whitened, within-type and centred views (no torch); ``combined``: a dictionary in views;
- ``meta``: DictionaryMeta, what a dictionary was trained on (no torch); ``io``: the
  dictionary file; ``pipeline``: train on a whole store; ``stains``: which
  stains an atom reads.

Encoding a store with a dictionary and what follows are in ``analysis/``.

Names are loaded on first use, so that importing the settings does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ICFL": "icfl",
    "ICFLConfig": "config",
    "TopKConfig": "config",
    "TopKSAE": "topk",
    "Codes": "base",
    "ForwardOutput": "base",
    "SparseDictionary": "base",
    "codes_to_csr": "base",
    "METHODS": "registry",
    "build_model": "registry",
    "Dictionary": "applied",
    "DictionaryFile": "applied",
    "CombinedDictionary": "combined",
    "DictionaryMeta": "meta",
    "encode_batches": "applied",
    "load_dictionary": "io",
    "save_dictionary": "io",
    "evaluate": "metrics",
    "TrainResult": "training",
    "train": "training",
    "Whitener": "whiten",
    "control_mask": "whiten",
    "parse_control": "control",
    "AnalyzeSettings": "settings",
    "TrainSettings": "settings",
    "WhitenSettings": "settings",
    "TrainedDictionary": "pipeline",
    "train_on_store": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
