"""The peer networks the benchmark compares against: what a user would pick instead of difflab.

- ``ContextUnet``: the DeepLearning.AI "How Diffusion Models Work" course network, written here from the
  course's description (n_feat=64, n_cfeat=5, height=16 gives 1.48M parameters).
- diffusers ``UNet2DModel`` in the google/ddpm-cifar10-32 layout and a sprite-sized layout.
- lucidrains ``denoising_diffusion_pytorch.Unet`` (bench-only dependency, see requirements-bench.txt).

Every builder returns a plain nn.Module. ``PeerAdapter`` gives each one difflab's network interface
(``forward(x, t, context=None, context_keep=None) -> eps``; ``in_channels``, ``image_size``, ``num_classes``),
so the peers train through the same ``DiffusionModule`` + Lightning ``Trainer`` and sample through the same
``difflab.sampling.generate`` as our networks: ``build_peer`` is the Hydra ``_target_`` the benchmark puts in
``cfg.model`` (bench.py loads this file as the module ``difflab_bench_peers``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------
# The course's ContextUnet
# ---------------------------------------------------------------------------------------------------


class ResidualConvBlock(nn.Module):
    """Two (Conv3x3-BatchNorm-GELU); with is_res, add the input (or a 1x1 projection of it) and divide by 1.414.

    The course builds the 1x1 projection as a fresh, untrained nn.Conv2d inside every forward call; here
    it is registered once (same FLOPs, 4*n_feat extra parameters, works with torch.compile).
    """

    def __init__(self, in_channels: int, out_channels: int, is_res: bool = False) -> None:
        super().__init__()
        self.is_res = is_res
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if is_res and in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x2 = self.conv2(self.conv1(x))
        if not self.is_res:
            return x2
        return (self.shortcut(x) + x2) / 1.414


class UnetDown(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(ResidualConvBlock(in_channels, out_channels), ResidualConvBlock(out_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class UnetUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
            ResidualConvBlock(out_channels, out_channels),
            ResidualConvBlock(out_channels, out_channels),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.model(torch.cat((x, skip), 1))


class EmbedFC(nn.Module):
    def __init__(self, input_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.view(-1, self.input_dim))


class ContextUnet(nn.Module):
    """forward(x, t, c): x (B, C, H, W); t = timestep / T as a float (B, 1, 1, 1); c (B, n_cfeat) one-hot or None."""

    def __init__(self, in_channels: int = 3, n_feat: int = 64, n_cfeat: int = 5, height: int = 16) -> None:
        super().__init__()
        self.in_channels, self.n_feat, self.n_cfeat, self.h = in_channels, n_feat, n_cfeat, height
        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True)
        self.down1 = UnetDown(n_feat, n_feat)
        self.down2 = UnetDown(n_feat, 2 * n_feat)
        self.to_vec = nn.Sequential(nn.AvgPool2d(4), nn.GELU())
        self.timeembed1 = EmbedFC(1, 2 * n_feat)
        self.timeembed2 = EmbedFC(1, n_feat)
        self.contextembed1 = EmbedFC(n_cfeat, 2 * n_feat)
        self.contextembed2 = EmbedFC(n_cfeat, n_feat)
        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, height // 4, height // 4),
            nn.GroupNorm(8, 2 * n_feat),
            nn.ReLU(),
        )
        self.up1 = UnetUp(4 * n_feat, n_feat)
        self.up2 = UnetUp(2 * n_feat, n_feat)
        self.out = nn.Sequential(
            nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1),
            nn.GroupNorm(8, n_feat),
            nn.ReLU(),
            nn.Conv2d(n_feat, in_channels, 3, 1, 1),
        )

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        x = self.init_conv(x)
        down1 = self.down1(x)
        down2 = self.down2(down1)
        hiddenvec = self.to_vec(down2)
        if c is None:
            c = torch.zeros(x.shape[0], self.n_cfeat, device=x.device, dtype=x.dtype)
        cemb1 = self.contextembed1(c).view(-1, self.n_feat * 2, 1, 1)
        temb1 = self.timeembed1(t).view(-1, self.n_feat * 2, 1, 1)
        cemb2 = self.contextembed2(c).view(-1, self.n_feat, 1, 1)
        temb2 = self.timeembed2(t).view(-1, self.n_feat, 1, 1)
        up1 = self.up0(hiddenvec)
        up2 = self.up1(cemb1 * up1 + temb1, down2)
        up3 = self.up2(cemb2 * up2 + temb2, down1)
        return self.out(torch.cat((up3, x), 1))


def course_context_unet(image_size: int = 16) -> ContextUnet:
    return ContextUnet(in_channels=3, n_feat=64, n_cfeat=5, height=image_size)


# ---------------------------------------------------------------------------------------------------
# diffusers UNet2DModel
# ---------------------------------------------------------------------------------------------------


def diffusers_ddpm_cifar10(image_size: int = 32) -> nn.Module:
    """The google/ddpm-cifar10-32 config (35.75M parameters): attention at 16x16, one head."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=32,
    )


def diffusers_sprites(image_size: int = 16) -> nn.Module:
    """A sprite-sized UNet2DModel (10.33M parameters): (64, 128, 256), one layer per block, attention at 8x8.

    Everything else is UNet2DModel's default (attention_head_dim=8).
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


# ---------------------------------------------------------------------------------------------------
# lucidrains denoising-diffusion-pytorch
# ---------------------------------------------------------------------------------------------------


def lucidrains_unet(dim: int, dim_mults: tuple[int, ...]) -> nn.Module:
    """Its defaults: linear attention at every level, full attention (einsum, not SDPA) in the innermost level."""
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=dim, dim_mults=dim_mults)


# ---------------------------------------------------------------------------------------------------
# Adapters: a peer network behind difflab's net interface
# ---------------------------------------------------------------------------------------------------


def _cast_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class PeerAdapter(nn.Module):
    """forward(x, t, context=None, context_keep=None) -> eps, as difflab's UNet, around a peer network.

    kind: "course" (conditional on ``num_classes`` one-hot features; t is fed as t / T, a float (B, 1, 1, 1);
    a dropped context, context_keep False, is the course's zero context), "diffusers" (``net(x, t).sample``) or
    "lucidrains" (``net(x, t)``), both unconditional (num_classes 0: DiffusionModule then calls ``net(x_t, t)``).
    The inputs keep the weights' dtype, so generate's bf16 copy of the weights runs as it does for ours.
    """

    def __init__(self, net: nn.Module, kind: str, image_size: int, in_channels: int = 3, num_classes: int = 0,
                 timesteps: int = 1000) -> None:
        super().__init__()
        if kind not in ("course", "diffusers", "lucidrains"):
            raise ValueError(f"unknown peer kind {kind!r}")
        self.net, self.kind = net, kind
        self.image_size, self.in_channels, self.num_classes, self.timesteps = image_size, in_channels, num_classes, timesteps
        if kind == "lucidrains":
            # its sinusoidal time embedding is float32 whatever the weights are: cast it to the next Linear's dtype
            # (a hook that reads the module it is called with, so it holds for a bf16 copy of the network too)
            net.time_mlp[1].register_forward_pre_hook(_cast_to_weight_dtype)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_keep: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.kind == "course":
            if context is not None and context_keep is not None:
                context = context * context_keep[:, None].to(context.dtype)
            return self.net(x, (t.float() / self.timesteps).to(x.dtype).view(-1, 1, 1, 1), context)
        if context is not None:
            raise ValueError(f"the {self.kind} peer is unconditional but got a context")
        if self.kind == "diffusers":
            return self.net(x, t).sample
        return self.net(x, t)


# name -> (kind, builder(image_size), number of one-hot context features)
PEERS = {
    "course": ("course", course_context_unet, 5),
    "diffusers_sprites": ("diffusers", diffusers_sprites, 0),
    "diffusers_cifar": ("diffusers", diffusers_ddpm_cifar10, 0),
    "lucidrains_sprites": ("lucidrains", lambda image_size: lucidrains_unet(64, (1, 2, 4)), 0),
    "lucidrains_cifar": ("lucidrains", lambda image_size: lucidrains_unet(128, (1, 2, 2, 2)), 0),
}


def build_peer(name: str, image_size: int, timesteps: int = 1000) -> PeerAdapter:
    """The Hydra target for cfg.model: peer ``name`` (a key of PEERS) behind PeerAdapter."""
    kind, builder, num_classes = PEERS[name]
    return PeerAdapter(builder(image_size), kind, image_size, num_classes=num_classes, timesteps=timesteps)
