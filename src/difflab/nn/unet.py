"""The denoising UNet (Ho et al. 2020 layout): eps_theta(x_t, t, context) with x_t (B, C, H, W).

It knows nothing of noise schedules: t is only an input (0-based integer step). ``cond_channels`` > 0: images given
beside x_t (B, cond_channels, H, W), concatenated to it at the input (an inpainting model: the known pixels and the mask).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import ConfigError
from difflab.nn.blocks import Downsample, ResBlock, SelfAttention, Upsample, zero_init
from difflab.nn.embeddings import ContextEmbedding, TimeEmbedding


class ResAttn(nn.Module):
    """A ResBlock, then self-attention when this resolution asks for it."""

    def __init__(self, res: ResBlock, attn: SelfAttention | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(
        self,
        image_size: int = 16,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (8,),
        attn_head_dim: int | None = None,
        dropout: float = 0.1,
        num_classes: int = 0,
        norm_groups: int = 32,
        scale_shift: bool = False,
        cond_channels: int = 0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        levels = len(channel_mult)
        self.size_multiple = 2 ** (levels - 1)
        if image_size % self.size_multiple:
            raise ConfigError(f"image_size {image_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)}")
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.context_embed = ContextEmbedding(num_classes, emb_dim) if num_classes > 0 else None

        def block(cin: int, cout: int, res: int) -> ResAttn:
            attn = SelfAttention(cout, norm_groups, attn_head_dim) if res in attn_resolutions else None
            return ResAttn(ResBlock(cin, cout, emb_dim, dropout, norm_groups, scale_shift), attn)

        self.conv_in = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResAttn(ResBlock(ch, ch, emb_dim, dropout, norm_groups, scale_shift), SelfAttention(ch, norm_groups, attn_head_dim)),
                ResAttn(ResBlock(ch, ch, emb_dim, dropout, norm_groups, scale_shift), None),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_keep: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) or scalar, context (B, K) or None, context_keep (B,) bool or None, cond (B, cond_channels,
        H, W): required when cond_channels > 0."""
        b = x.shape[0]
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(
                f"expected (B, {self.in_channels}, H, W) with H, W divisible by {self.size_multiple}, got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.time_embed(t)
        if self.context_embed is not None:
            emb = emb + self.context_embed(context, context_keep, b)
        elif context is not None:
            raise ValueError("this model was built unconditional (num_classes=0) but got a context")

        if self.cond_channels:
            if cond is None or cond.shape != (b, self.cond_channels, *x.shape[2:]):
                raise ValueError(f"this model takes {self.cond_channels} image channels beside x_t: expected cond "
                                 f"{(b, self.cond_channels, *x.shape[2:])}, got {None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this model was built without image conditioning (cond_channels=0) but got cond")
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResAttn) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResAttn) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
