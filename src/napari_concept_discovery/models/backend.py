"""The one interface every foundation-model backend offers: tiles in, tokens of a block out.

A backend carries its own input normalisation (as timm's pretrained configs do), so the embedding
pipeline never needs to know which model it drives: it scales a site with ``scale_to_unit``, cuts
tiles of ``tile_size`` and asks ``tokens(batch, block)`` for per-channel patch tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .vit import ChannelAgnosticViT, resolve_block


def scale_to_unit(image: np.ndarray) -> np.ndarray:
    """Scale a (C, H, W) site to float32 in [0, 1] before the model's own standardisation.

    uint8 is divided by 255, as OpenPhenom was trained. Any other dtype (uint16, float) is divided
    by each channel's maximum over the site: the per-tile standardisation that follows removes
    scale anyway, and this keeps dim 12-bit data in 16-bit containers from sinking under the
    standardisation's variance floor (1e-5), which dividing by 65535 would do. An all-zero channel
    stays zero.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    out = a.astype(np.float32, copy=True)
    if out.ndim != 3:
        raise ModelError(f"expected a (C, H, W) image, got shape {a.shape}")
    peak = out.reshape(out.shape[0], -1).max(axis=1)
    peak[~(peak > 0)] = 1.0
    out /= peak[:, None, None]
    return out


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else CUDA, then Apple MPS, then CPU."""
    if device is not None and str(device) not in ("", "auto"):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ModelError(f"unknown device {device!r}: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ModelError(f"device {device!r} asked for, but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes, dtypes and bytes, for weights that live only in memory."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Backend:
    """Base of all backends: identity, geometry, normalisation, and ``tokens``.

    ``tokens(batch, block)`` takes (B, C, tile, tile) float in [0, 1] (from ``scale_to_unit``) and
    returns (B, G, N, D): G token groups per patch (G = C channel tokens for channel-agnostic
    models and the per-channel rule, 1 otherwise), N = (tile / patch)^2 patches in row-major order,
    CLS and register tokens dropped. Blocks after ``block`` are not run; ``block=None`` is
    ``default_block`` (``resolve_block``, the one rule every model follows).

    ``weights_hash`` identifies the weights (sha256 of the weights file, or of the tensors for
    weights made in memory); ``source`` is the string ``load_model`` takes to rebuild this backend
    (docs/architecture.md, "Models"), recorded by stores and dictionaries.
    """

    model_id: str
    weights_hash: str
    embed_dim: int
    num_blocks: int
    patch_size: int
    tile_size: int
    max_channels: int | None
    default_block: int
    normalisation: str
    source: str = ""
    card: dict = field(default_factory=dict)

    def scale_to_unit(self, image: np.ndarray) -> np.ndarray:
        return scale_to_unit(image)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def module(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def to(self, device: str | torch.device | None) -> Backend:
        self.module.to(pick_device(device))
        return self

    def resolve_block(self, block: int | None) -> int:
        """Block index in [0, num_blocks): None is ``default_block``, negative from the end."""
        return resolve_block(block, self.num_blocks, self.default_block, self.model_id)

    def check_channels(self, channels: int) -> None:
        """Raise ModelError when this model cannot take ``channels`` channels."""
        if channels < 1:
            raise ModelError("the image has no channels")
        if self.max_channels is not None and channels > self.max_channels:
            raise ModelError(
                f"{self.model_id} takes at most {self.max_channels} channels, the image has "
                f"{channels}; pass a channel subset"
            )

    def tokens(self, batch: torch.Tensor, block: int | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


CA_NORMALISATION = (
    "uint8 / 255, other dtypes / per-site per-channel maximum; then per-tile, per-channel "
    "standardisation (instance norm without affine, eps 1e-5)"
)


class ChannelAgnosticBackend(Backend):
    """Backend around a ``ChannelAgnosticViT`` (the bundled default, OpenPhenom-format weights).

    ``default_block=None`` keeps the model's own ``default_block``; a given one becomes the
    model's too, so ``backend.resolve_block`` and ``model.resolve_block`` always agree.
    """

    def __init__(
        self,
        model: ChannelAgnosticViT,
        *,
        model_id: str,
        weights_hash: str,
        default_block: int | None = None,
        source: str = "",
        card: dict | None = None,
    ):
        model.eval()
        if default_block is not None:
            model.default_block = model.resolve_block(default_block)
        super().__init__(
            model_id=model_id,
            weights_hash=weights_hash,
            embed_dim=model.embed_dim,
            num_blocks=model.num_blocks,
            patch_size=model.patch_size,
            tile_size=model.img_size,
            max_channels=model.max_channels,
            default_block=model.default_block,
            normalisation=CA_NORMALISATION,
            source=source,
            card=card or {},
        )
        self.model = model

    @property
    def module(self) -> nn.Module:
        return self.model

    def tokens(self, batch: torch.Tensor, block: int | None = None) -> torch.Tensor:
        b = self.resolve_block(block)
        bsz, c, h, w = batch.shape
        self.check_channels(c)
        t = self.model.forward_tokens(batch, b)[:, self.model.num_prefix_tokens :]
        n = t.shape[1] // c
        return t.reshape(bsz, c, n, self.embed_dim)
