"""Batched, seeded generation: n images in chunks of ``batch_size`` with any sampler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.samplers.base import SampleOutput, Sampler
from difflab.samplers.guidance import guided_denoiser
from difflab.schedules import NoiseSchedule


@torch.no_grad()
def generate(
    net: nn.Module,
    schedule: NoiseSchedule,
    sampler: Sampler,
    n: int,
    image_shape: tuple[int, int, int],
    contexts: Tensor | None = None,
    guidance: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    record_every: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SampleOutput:
    """contexts: (n, K) or None. The same seed gives the same images whatever the device.

    x_T for all n images comes from one CPU generator, step noise from one generator per chunk.
    """
    device = schedule.betas.device
    was_training = net.training
    net.eval()
    x_T = torch.randn((n, *image_shape), generator=torch.Generator().manual_seed(seed))
    parts: list[SampleOutput] = []
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            ctx = contexts[start : start + batch_size].to(device) if contexts is not None else None
            denoise = guided_denoiser(net, ctx, guidance, autocast_dtype)
            step_gen = torch.Generator().manual_seed(seed + 1 + i)
            parts.append(
                sampler.sample(denoise, schedule, x_T[start : start + batch_size].to(device), step_gen, record_every, progress)
            )
    finally:
        net.train(was_training)
    return SampleOutput(
        images=torch.cat([p.images.cpu() for p in parts]),
        chain=[torch.cat(frames) for frames in zip(*(p.chain for p in parts))],
        x0_chain=[torch.cat(frames) for frames in zip(*(p.x0_chain for p in parts))],
        chain_t=parts[0].chain_t,
    )


def to_uint8(images: Tensor) -> Tensor:
    # [-1, 1] -> [0, 255]
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
