"""Channel-agnostic ViT (the OpenPhenom family) on timm's VisionTransformer.

Every channel is cut into 16x16 patches by one shared ``Conv2d(1, D, 16, 16)``, so a tile with C
channels becomes C x (H/16 x W/16) tokens in channel-major order plus one CLS token. Positions are
fixed 2-D sin-cos embeddings, repeated for every channel; there is no learned channel embedding,
so the same weights take any number of channels. Subclassing timm's ``VisionTransformer`` keeps
the parameter names timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``,
``fc_norm.*``), which is what OpenPhenom's checkpoint uses under ``encoder.vit_backbone.``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn

from ..errors import ModelError
from .cpu_bf16 import attention, bias_gelu, kernel_usable

#: Variance floor of the per-image, per-channel standardisation (``nn.InstanceNorm2d``'s default).
INSTANCE_NORM_EPS = 1e-5


def sincos_2d(rows: int, cols: int, dim: int, scale: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a ``rows x cols`` grid, shape (rows*cols, dim).

    The layout is OpenPhenom's: ``[sin(h w_k), cos(h w_k), sin(x w_k), cos(x w_k)]`` with
    ``w_k = scale^(-k / (dim/4))``. Computed for any grid, so a 128 px crop gets exactly the
    positions of the top-left 8x8 patches of a 256 px tile (training on crops stays consistent
    with inference on tiles).
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for 2-D sin-cos positions")
    quarter = dim // 4
    freqs = 1.0 / (scale ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    hh, ww = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32),
        torch.arange(cols, dtype=torch.float32),
        indexing="ij",
    )
    ah = torch.outer(hh.flatten(), freqs)
    aw = torch.outer(ww.flatten(), freqs)
    return torch.cat([ah.sin(), ah.cos(), aw.sin(), aw.cos()], dim=1)


def resolve_block(block: int | None, num_blocks: int, default: int, name: str = "the model") -> int:
    """The one block rule: ``None`` is ``default``, negative counts from the end, else in range.

    Blocks are numbered from 0; "block b" means the tokens leaving block b. Every backend and
    ``ChannelAgnosticViT`` resolve through this function (docs/architecture.md, "Models").
    """
    b = default if block is None else block
    b = int(b)
    if b < 0:
        b += num_blocks
    if not 0 <= b < num_blocks:
        shown = default if block is None else block
        raise ModelError(
            f"block {shown} out of range: {name} has {num_blocks} blocks "
            f"(0..{num_blocks - 1}, or negative from the end)"
        )
    return b


#: Buffers the blocks of one forward pass share (see :func:`reused_buffers`); per thread and
#: per call, never shared between two forwards.
_BUFFERS: ContextVar[dict | None] = ContextVar("ncd_block_buffers", default=None)


@contextmanager
def reused_buffers() -> Iterator[None]:
    """Inside, :class:`ParallelBlock` writes its two largest intermediates (the joint
    projection, the MLP activations) into buffers kept from block to block.

    A bf16 block at 16 tiles allocates ~200 MB of them; above glibc's mmap threshold (32 MB)
    every allocation is fresh pages, and faulting them in cost ~10% of the forward on a 2-core
    EPYC. The buffers live for one forward pass (a context variable: each thread and call has
    its own) and are freed when it ends; the tokens a block returns are never one of them.
    """
    token = _BUFFERS.set({})
    try:
        yield
    finally:
        _BUFFERS.reset(token)


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor: the forward's reused one where there is one, else a new one."""
    buffers = _BUFFERS.get()
    if buffers is None:
        return torch.empty(shape, dtype=dtype)
    t = buffers.get(name)
    if t is None or t.shape != shape or t.dtype != dtype:
        t = buffers[name] = torch.empty(shape, dtype=dtype)
    return t


def run_blocks(vit: VisionTransformer, tokens: torch.Tensor, last: int) -> torch.Tensor:
    """Run a timm ViT's blocks 0..``last`` on prepared tokens and stop there.

    After the final block the model's closing norm is applied, as ``forward_features`` does, so
    stopping at the last block gives exactly ``forward_features``' tokens. Shared by the
    channel-agnostic ViT and the timm backend so both stop at a block the same way.
    """
    with reused_buffers():
        for blk in vit.blocks[: last + 1]:
            tokens = blk(tokens)
    if last == len(vit.blocks) - 1:
        tokens = vit.norm(tokens)
    return tokens


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel standardisation: instance norm without affine (OpenPhenom's input norm)."""
    return F.instance_norm(x.float(), eps=INSTANCE_NORM_EPS)


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class ParallelBlock(ParallelScalingBlock):
    """timm's ``ParallelScalingBlock`` (same parameters and names, same arithmetic up to where
    bf16 rounds) whose attention runs through the compiled bf16 kernel of :mod:`.cpu_bf16`
    where it is usable (bf16 on a CPU with AVX512-BF16, no gradient, no mask); everywhere else
    timm's own forward runs.

    The kernel reads q, k, v where they lie in the joint projection's output (strided views),
    applies the qk-norm while it packs them, and writes (B, N, H*D) for the output projection,
    so the copies, norms and head transposes of timm's forward are not separate passes; the
    MLP's bias and GELU are one pass, the two output projections one product.
    """

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if (
            attn_mask is not None
            or is_causal
            or self.training
            or self.out_proj is not None
            or not kernel_usable(x, self.head_dim)
        ):
            return super().forward(x, attn_mask, is_causal)
        b, n, c = x.shape
        proj = self.in_proj
        y = _buffer("in_proj", (b, n, proj.out_features), x.dtype)
        xn = self.in_norm(x).view(b * n, c)
        if proj.bias is None:
            torch.mm(xn, proj.weight.t(), out=y.view(b * n, -1))
        else:
            torch.addmm(proj.bias, xn, proj.weight.t(), out=y.view(b * n, -1))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        heads = (b, n, self.num_heads, self.head_dim)
        x_attn = attention(
            q.view(heads), k.view(heads), v.view(heads), self.scale, self.q_norm, self.k_norm
        )
        if isinstance(self.mlp_act, nn.GELU) and self.mlp_act.approximate == "none":
            out = _buffer("mlp", x_mlp.shape, x.dtype)
            x_mlp = bias_gelu(x_mlp, self.mlp_bias, out)  # one pass, not an add and a GELU
        else:
            x_mlp = self.mlp_act(x_mlp if self.mlp_bias is None else x_mlp + self.mlp_bias)
        # Both output projections into one product (one bias, no separate sum), and the layer
        # scale with the residual in one pass.
        pa, pm = self.attn_out_proj, self.mlp_out_proj
        y = F.linear(x_attn, pa.weight, _sum(pa.bias, pm.bias)).view(b * n, -1)
        y = y.addmm_(x_mlp.reshape(b * n, -1), pm.weight.t()).view(b, n, -1)
        if isinstance(self.ls, LayerScale) and isinstance(self.drop_path, nn.Identity):
            return torch.addcmul(x, y, self.ls.gamma)
        return x + self.drop_path(self.ls(y))


class ChannelAgnosticViT(VisionTransformer):
    """timm ViT with a shared per-channel patch embedding and fixed sin-cos positions.

    ``forward_tokens(x, block)`` runs the blocks up to and including ``block`` and stops there;
    ``block=None`` is ``default_block`` (the last block unless a loader or backend sets another).
    Input ``x`` is (B, C, H, W) float scaled to [0, 1]; standardisation happens inside.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        max_channels: int = 11,
        img_size: int = 256,
        patch_size: int = 16,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=1,
            num_classes=0,
            global_pool="avg",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=False,
            qk_norm=True,
            init_values=1e-4,
            fc_norm=None,
            class_token=True,
            block_fn=ParallelBlock,
            drop_path_rate=drop_path_rate,
        )
        self.max_channels = int(max_channels)
        self.patch_size = int(patch_size)
        self.img_size = int(img_size)
        grid = img_size // patch_size
        pos = sincos_2d(grid, grid, embed_dim).repeat(self.max_channels, 1)
        pos = torch.cat([torch.zeros(1, embed_dim), pos], dim=0)[None]
        # Same name and shape as OpenPhenom's (1, 1 + max_channels * grid^2, D); never trained.
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.default_block = int(depth) - 1

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def resolve_block(self, block: int | None) -> int:
        """Block index in [0, num_blocks) by the one rule of ``resolve_block``."""
        return resolve_block(block, self.num_blocks, self.default_block, type(self).__name__)

    def positions(self, rows: int, cols: int, channels: int) -> torch.Tensor:
        """Patch positions (1, channels*rows*cols, D), repeated per channel in channel-major order.

        A full tile uses the stored ``pos_embed`` (so a checkpoint's own table is honoured); other
        grids (training crops) compute the same sin-cos formula.
        """
        if channels > self.max_channels:
            raise ValueError(
                f"{channels} channels given, this model takes at most {self.max_channels}"
            )
        grid = self.img_size // self.patch_size
        n = rows * cols
        if rows == grid and cols == grid:
            return self.pos_embed[:, 1 : 1 + channels * n]
        key = (rows, cols)
        pos = self._pos_cache.get(key)
        if pos is None or pos.device != self.pos_embed.device:
            pos = sincos_2d(rows, cols, self.embed_dim).to(self.pos_embed.device)
            self._pos_cache[key] = pos
        return pos.to(self.pos_embed.dtype).repeat(channels, 1)[None]

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Standardise, embed every channel with the shared projection, add positions.

        Returns patch tokens (B, C*rows*cols, D) in channel-major order (no CLS) and (rows, cols).
        """
        # Standardised in float32, then in the weights' dtype (bf16 when cast for speed).
        x = standardize(x).to(self.patch_embed.proj.weight.dtype)
        b, c, h, w = x.shape
        t = self.patch_embed.proj(x.reshape(b * c, 1, h, w))  # (B*C, D, rows, cols)
        rows, cols = t.shape[-2:]
        t = t.reshape(b, c, self.embed_dim, rows * cols).transpose(2, 3)
        t = t.reshape(b, c * rows * cols, self.embed_dim)
        return t + self.positions(rows, cols, c), (rows, cols)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def forward_tokens(self, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """Tokens (B, 1 + C*rows*cols, D) after ``block``; later blocks are not run.

        After the last block the final norm is applied as ``forward_features`` does (an
        identity with these settings), so ``forward_tokens(x, -1)`` equals ``forward_features(x)``.
        """
        last = self.resolve_block(block)
        t, _ = self.embed_patches(x)
        return run_blocks(self, self.prepend_cls(t), last)

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not used by the channel-agnostic ViT")
        return self.forward_tokens(x, -1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Whole-image embedding: mean of the patch tokens with CLS dropped, then fc_norm."""
        return self.head(self.fc_norm(x[:, self.num_prefix_tokens :].mean(dim=1)))

    def architecture(self) -> dict:
        """Keyword arguments that rebuild this network (written into model cards)."""
        return {
            "embed_dim": self.embed_dim,
            "depth": self.num_blocks,
            "num_heads": self.blocks[0].num_heads,
            "max_channels": self.max_channels,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "mlp_ratio": self.blocks[0].in_split[0] / self.embed_dim,
        }
