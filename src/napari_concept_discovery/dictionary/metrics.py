"""Reconstruction and sparsity metrics, one definition for every method.

All are computed in the space the dictionary models (after whitening and unit norm), as
docs/architecture.md, "Dictionaries" states them:

- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with mean(x) the per-dimension mean over
  the evaluation set;
- mean cosine(x, x_hat) over tokens;
- L0 = mean number of non-zero codes per token (a feature is active when its code is non-zero);
- dead features: active on fewer than ``dead_threshold`` (1e-5) of the tokens, or on none.

:func:`evaluate` streams over the tokens through the one batch-encode loop
(:func:`.applied.encode_batches`) with float64 accumulators, so it runs on a zarr array of any
length in bounded memory and gives the same numbers as the in-memory forms.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..progress import Cancel, ProgressCallback
from .applied import encode_batches
from .base import Codes, SparseDictionary, codes_to_csr

DEAD_THRESHOLD = 1e-5


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained of (N, D) tokens by their reconstruction."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def mean_cosine(x, x_hat) -> float:
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    num = (x * x_hat).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def l0(codes: sp.csr_matrix) -> float:
    """Mean non-zero codes per token (explicit zeros are not counted)."""
    codes = sp.csr_matrix(codes)
    return float((codes.data != 0).sum() / max(codes.shape[0], 1))


def activation_counts(codes: sp.spmatrix) -> np.ndarray:
    """Number of tokens on which each feature is active."""
    codes = sp.csr_matrix(codes)
    return np.bincount(codes.indices[codes.data != 0], minlength=codes.shape[1])


def dead_mask(counts: np.ndarray, n_tokens: int, threshold: float = DEAD_THRESHOLD) -> np.ndarray:
    """Features active on fewer than ``threshold`` of ``n_tokens`` tokens, or on none."""
    counts = np.asarray(counts)
    return (counts == 0) | (counts < threshold * n_tokens)


def evaluate(
    model: SparseDictionary,
    tokens,
    *,
    whitener=None,
    groups=None,
    batch_size: int = 4096,
    dead_threshold: float = DEAD_THRESHOLD,
    return_codes: bool = False,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
):
    """FVU, mean cosine, L0 and dead fraction of ``model`` on all of ``tokens`` (N, D).

    ``tokens`` are raw when ``whitener`` is given (whitened per batch). Returns a dict, or
    ``(dict, codes)`` with the codes as a CSR matrix (N, M) when ``return_codes``. Progress is
    reported as stage ``"evaluate"``; a set ``cancel`` raises ``Cancelled`` between batches.
    """
    n = int(tokens.shape[0])
    err = 0.0
    cos_sum = 0.0
    nnz = 0
    s1 = s2 = None
    counts = np.zeros(model.n_atoms, dtype=np.int64)
    parts = []
    batches = encode_batches(
        model,
        tokens,
        whitener=whitener,
        groups=groups,
        batch_size=batch_size,
        progress=progress,
        cancel=cancel,
        stage="evaluate",
    )
    for _, _, x, codes in batches:
        with torch.no_grad():
            x_hat = model.decode(codes)
        x64 = x.double()
        h64 = x_hat.double()
        err += float((x64 - h64).pow(2).sum())
        cos = (x64 * h64).sum(1) / (x64.norm(dim=1) * h64.norm(dim=1)).clamp_min(1e-30)
        cos_sum += float(cos.sum())
        b1, b2 = x64.sum(0), x64.pow(2).sum(0)
        s1 = b1 if s1 is None else s1 + b1
        s2 = b2 if s2 is None else s2 + b2
        csr = codes_to_csr(Codes(codes.values.detach(), codes.indices), model.n_atoms)
        nnz += csr.nnz
        counts += np.bincount(csr.indices, minlength=model.n_atoms)
        if return_codes:
            parts.append(csr)
    total_var = float((s2 - s1.pow(2) / n).sum()) if n else float("nan")
    dead = dead_mask(counts, n, dead_threshold)
    result = {
        "fvu": err / total_var if total_var > 0 else float("nan"),
        "mean_cosine": cos_sum / max(n, 1),
        "l0": nnz / max(n, 1),
        "dead_fraction": float(dead.mean()),
        "n_dead": int(dead.sum()),
        "n_tokens": n,
        "n_atoms": int(model.n_atoms),
    }
    if return_codes:
        codes_all = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, model.n_atoms))
        return result, codes_all
    return result
