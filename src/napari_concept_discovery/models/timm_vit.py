"""Any timm ViT checkpoint (ImageNet-style, DINOv2-style) as a backend, with a channel rule.

Such models take a fixed number of input channels (3 for RGB), while plates have any number of
named stains. Two documented rules map a plate's C channels onto the model's input:

- ``"per-channel"`` (default): every channel is fed separately as a grey image (replicated to the
  model's input channels), giving one token per channel and patch; the patch token is their mean,
  exactly as for channel-agnostic models. Costs C forward passes per tile, keeps per-channel tokens.
- ``"mean"``: the channels are averaged into one grey image, replicated to the input channels; one
  forward pass, one token group.

When the model's input channel count equals C, ``"identity"`` feeds the channels as they are.
Inputs (after ``scale_to_unit``) are normalised with the model's pretrained mean and std.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from ..errors import ModelError
from .backend import Backend
from .cpu_bf16 import attention, kernel_usable
from .vit import resolve_block, run_blocks

CHANNEL_RULES = ("per-channel", "mean", "identity")


class KernelAttention(Attention):
    """timm's ``Attention`` (no state of its own) whose product runs through the compiled bf16
    kernel of :mod:`.cpu_bf16` where it is usable (bf16 on a CPU with AVX512-BF16, no mask, no
    gate, no gradient); timm's own forward everywhere else. The backend gives this class to its
    model's plain ``Attention`` modules, so fp32 and GPU runs are unchanged."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if (
            attn_mask is not None
            or is_causal
            or self.training
            or getattr(self, "gate", None) is not None
            or not kernel_usable(x, self.head_dim)
        ):
            return super().forward(x, attn_mask, is_causal)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        out = attention(q, k, v, self.scale, self.q_norm, self.k_norm)
        return self.proj_drop(self.proj(self.norm(out)))


class TimmViTBackend(Backend):
    """Backend around a timm ``VisionTransformer`` built with ``dynamic_img_size=True``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        model_id: str,
        weights_hash: str,
        channel_rule: str = "per-channel",
        mean=None,
        std=None,
        default_block: int | None = None,
        source: str = "",
        card: dict | None = None,
    ):
        if channel_rule not in CHANNEL_RULES:
            raise ModelError(f"unknown channel rule {channel_rule!r}; use one of {CHANNEL_RULES}")
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise ModelError(f"{model_id} is not a timm ViT (no blocks / patch_embed)")
        model.eval()
        for blk in model.blocks:
            if type(getattr(blk, "attn", None)) is Attention:
                blk.attn.__class__ = KernelAttention  # same module, bf16 kernel where usable
        patch = int(model.patch_embed.patch_size[0])
        n = len(model.blocks)
        self.in_chans = int(model.patch_embed.proj.weight.shape[1])
        mean = list(mean) if mean is not None else [0.5] * self.in_chans
        std = list(std) if std is not None else [0.5] * self.in_chans
        super().__init__(
            model_id=model_id,
            weights_hash=weights_hash,
            embed_dim=int(model.embed_dim),
            num_blocks=n,
            patch_size=patch,
            # Largest multiple of the patch size not above 256 (252 for DINOv2's 14 px patches).
            tile_size=patch * (256 // patch),
            max_channels=self.in_chans if channel_rule == "identity" else None,
            # The last block unless told otherwise: timm ViTs are trained for their final tokens.
            default_block=resolve_block(default_block, n, n - 1, model_id),
            normalisation=(
                f"uint8 / 255, other dtypes / per-site per-channel maximum; channel rule "
                f"{channel_rule!r}; then (x - {mean}) / {std} per input channel"
            ),
            source=source,
            card=card or {},
        )
        self.model = model
        self.channel_rule = channel_rule
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def module(self) -> nn.Module:
        return self.model

    def check_channels(self, channels: int) -> None:
        super().check_channels(channels)
        if self.channel_rule == "identity" and channels != self.in_chans:
            raise ModelError(
                f"{self.model_id} takes exactly {self.in_chans} channels with the 'identity' rule, "
                f"the image has {channels}; use channel_rule='per-channel' or 'mean'"
            )

    def _run(self, x: torch.Tensor, block: int) -> torch.Tensor:
        m = self.model
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        t = m.patch_embed(x.to(m.patch_embed.proj.weight.dtype))  # bf16 weights take bf16 input
        t = m._pos_embed(t)
        t = m.patch_drop(t)
        t = run_blocks(m, m.norm_pre(t), block)
        return t[:, m.num_prefix_tokens :]

    def tokens(self, batch: torch.Tensor, block: int | None = None) -> torch.Tensor:
        b = self.resolve_block(block)
        bsz, c, h, w = batch.shape
        self.check_channels(c)
        x = batch.float()
        if self.channel_rule == "identity":
            t = self._run(x, b)
            return t[:, None]
        if self.channel_rule == "mean":
            grey = x.mean(dim=1, keepdim=True)
            t = self._run(grey.expand(-1, self.in_chans, -1, -1), b)
            return t[:, None]
        grey = x.reshape(bsz * c, 1, h, w).expand(-1, self.in_chans, -1, -1)
        t = self._run(grey, b)
        return t.reshape(bsz, c, t.shape[1], self.embed_dim)
