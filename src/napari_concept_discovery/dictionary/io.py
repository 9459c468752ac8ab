"""Dictionary files: one safetensors file holding the tensors and, in its header, the metadata.

Tensors: ``atoms`` (M, D), ``bias`` (D,), ``encoder``/``encoder_bias`` for a TopK SAE, and the
whitening state (``whiten_mean`` (G, D_raw), ``whiten_transform`` (G, D, D_raw),
``whiten_eigenvalues``) as float64 so that it round-trips exactly. The safetensors header's
string metadata holds JSON: the method's config, the whitening parameters, and a free ``meta``
dict (token unit, model id, source and block, embedding width, channel names, training-data
signature, training settings, metrics). Keeping it all in one file means a dictionary cannot
lose its whitening or its provenance. Writes are atomic, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write_bytes
from ..errors import DictionaryError
from .applied import Dictionary
from .base import SparseDictionary
from .registry import build_model
from .whiten import Whitener

FORMAT = "napari-concept-discovery/dictionary"
FORMAT_VERSION = 1


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_dictionary(
    path: str | Path,
    model: SparseDictionary | Dictionary,
    whitener: Whitener | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a dictionary (a :class:`Dictionary`, or a model + whitening + metadata) atomically."""
    from safetensors.torch import save

    if isinstance(model, Dictionary):
        if whitener is not None or meta is not None:
            raise DictionaryError("pass either a Dictionary or a model with its whitener and meta")
        model, whitener, meta = model.model, model.whitener, model.meta
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.tensors().items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": model.method,
        "d_in": str(model.d_in),
        "config": model.config.to_json(),
        "meta": json.dumps(_jsonable(meta or {}), sort_keys=True),
    }
    if whitener is not None:
        wmeta, warrays = whitener.state()
        header["whitener"] = json.dumps(_jsonable(wmeta), sort_keys=True)
        for k, v in warrays.items():
            tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
    return atomic_write_bytes(path, save(tensors, metadata=header))


def load_dictionary(path: str | Path) -> Dictionary:
    """Read a file written by :func:`save_dictionary`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"no dictionary file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise DictionaryError(f"{path} is not a readable safetensors file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise DictionaryError(
            f"{path} is a safetensors file but not a concept-discovery dictionary"
        )
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise DictionaryError(
            f"{path} was written by a newer version (format {header['format_version']}); "
            f"this one reads format {FORMAT_VERSION}"
        )
    model = build_model(header["method"], int(header["d_in"]), json.loads(header["config"]))
    model.load_tensors(tensors)
    model.eval()
    whitener = None
    if "whitener" in header:
        arrays = {k: v.numpy() for k, v in tensors.items() if k.startswith("whiten_")}
        whitener = Whitener.from_state(json.loads(header["whitener"]), arrays)
    return Dictionary(model, whitener, json.loads(header["meta"]))
