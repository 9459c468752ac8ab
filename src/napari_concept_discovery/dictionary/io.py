"""Dictionary files: one safetensors file holding the tensors and, in its header, the metadata.

Tensors: ``atoms`` (M, D), ``bias`` (D,), ``encoder``/``encoder_bias`` for a TopK SAE, and the
whitening state (``whiten_mean`` (G, D_raw), ``whiten_transform`` (G, D, D_raw),
``whiten_eigenvalues``) as float64 so that it round-trips exactly. The safetensors header's
string metadata holds JSON: the method's config, the whitening parameters, and a free ``meta``
dict (token unit, model id and block, embedding width, channel names, training-data signature,
metrics). Keeping it all in one file means a dictionary cannot lose its whitening or its
provenance. Writes go to a temporary file in the same folder and are renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import DictionaryError
from .base import SparseDictionary
from .icfl import ICFL, ICFLConfig
from .topk import TopKConfig, TopKSAE
from .whiten import Whitener

FORMAT = "napari-concept-discovery/dictionary"
FORMAT_VERSION = 1
METHODS: dict[str, tuple[type[SparseDictionary], type]] = {
    "icfl": (ICFL, ICFLConfig),
    "topk": (TopKSAE, TopKConfig),
}


def build_model(method: str, d_in: int, config=None, *, seed: int = 0) -> SparseDictionary:
    """A fresh dictionary of ``method`` ("icfl" or "topk"); ``config`` is a config or a dict."""
    if method not in METHODS:
        raise DictionaryError(
            f"unknown dictionary method {method!r}; choose one of {list(METHODS)}"
        )
    cls, cfg_cls = METHODS[method]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = cfg_cls.from_dict(config)
    return cls(d_in, config, seed=seed)


def sparsity_config(
    method: str,
    n_atoms: int,
    sparsity: int | None = None,
    *,
    n_iter: int | None = None,
    n_pick: int | None = None,
    lr: float | None = None,
) -> dict:
    """Config dict for ``build_model`` from a target number of non-zeros per token.

    TopK takes ``k = sparsity`` (default 32). ICFL reaches ``sparsity = J * L`` with ``L = n_pick``
    (default 4) atoms per pursuit iteration, so ``sparsity`` must be a multiple of ``L``; without
    ``sparsity`` it uses ``J = n_iter`` (default 8). One rule for the CLI, the demo and widgets.
    """
    cfg: dict = {"n_atoms": n_atoms}
    if lr is not None:
        cfg["lr"] = lr
    if method == "topk":
        if n_iter is not None or n_pick is not None:
            raise DictionaryError("J and L (--J/--L) are ICFL settings; TopK takes only sparsity k")
        cfg["k"] = sparsity if sparsity is not None else 32
        return cfg
    n_pick = n_pick if n_pick is not None else 4
    if sparsity is not None:
        if n_iter is not None and n_iter * n_pick != sparsity:
            raise DictionaryError(f"sparsity {sparsity} disagrees with J {n_iter} x L {n_pick}")
        if sparsity % n_pick:
            raise DictionaryError(f"ICFL sparsity {sparsity} must be a multiple of L ({n_pick})")
        n_iter = sparsity // n_pick
    elif n_iter is None:
        n_iter = 8
    cfg.update(n_iter=n_iter, n_pick=n_pick)
    return cfg


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class DictionaryFile:
    """A loaded dictionary: the module, its whitening, and its metadata."""

    model: SparseDictionary
    whitener: Whitener | None = None
    meta: dict = field(default_factory=dict)

    @property
    def input_width(self) -> int:
        """Width of the raw activations this dictionary takes (before whitening)."""
        return self.whitener.n_features_in_ if self.whitener is not None else self.model.d_in

    def describe(self) -> str:
        m = self.meta
        return (
            f"model {m.get('model_id')!r} block {m.get('block')!r} "
            f"(width {self.input_width}, unit {m.get('unit')!r})"
        )

    def check_compatible(self, *, model_id=None, block=None, width: int | None = None) -> None:
        """Refuse activations of another model, block or width, naming both sides."""
        m = self.meta
        mismatch = []
        if model_id is not None and m.get("model_id") is not None and model_id != m["model_id"]:
            mismatch.append("model")
        if block is not None and m.get("block") is not None and int(block) != int(m["block"]):
            mismatch.append("block")
        if width is not None and int(width) != self.input_width:
            mismatch.append("width")
        if mismatch:
            raise DictionaryError(
                f"this dictionary was trained on activations of {self.describe()}, but these come "
                f"from model {model_id!r} block {block!r} (width {width}); "
                f"{' and '.join(mismatch)} differ"
            )

    def prepare(self, tokens, groups=None) -> np.ndarray:
        """Raw tokens to the dictionary's space (whitened and unit norm when it was trained so)."""
        x = np.asarray(tokens, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_width:
            raise DictionaryError(
                f"this dictionary takes {self.input_width}-dimensional activations "
                f"({self.describe()}); got shape {x.shape}"
            )
        return self.whitener.transform(x, groups) if self.whitener is not None else x

    def encode(
        self, tokens, groups=None, *, batch_size: int = 4096, model_id=None, block=None
    ) -> sp.csr_matrix:
        """Codes (N, M) as CSR for raw tokens (N, D), streaming in batches."""
        from .base import codes_to_csr

        self.check_compatible(model_id=model_id, block=block, width=tokens.shape[1])
        g = None if groups is None else np.asarray(groups).astype(str)
        parts = []
        self.model.eval()
        for s in range(0, tokens.shape[0], batch_size):
            e = min(s + batch_size, tokens.shape[0])
            x = self.prepare(tokens[s:e], None if g is None else g[s:e])
            with torch.no_grad():
                parts.append(
                    codes_to_csr(self.model.encode(torch.from_numpy(x)), self.model.n_atoms)
                )
        if not parts:
            return sp.csr_matrix((0, self.model.n_atoms), dtype=np.float32)
        return sp.vstack(parts, format="csr")


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
    model: SparseDictionary,
    whitener: Whitener | None = None,
    meta: dict | None = None,
) -> Path:
    """Write ``model`` (+ whitening and metadata) to one safetensors file, atomically."""
    from safetensors.torch import save

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


def load_dictionary(path: str | Path) -> DictionaryFile:
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
    return DictionaryFile(model, whitener, json.loads(header["meta"]))
