"""Classifier-free guidance (Ho & Salimans 2022): bind a network and its context into a Denoiser.

eps = eps_c + w (eps_c - eps_u) = (1 + w) eps_c - w eps_u.  w = 0 is the plain conditional model (as
in the DeepLearning.AI course); diffusers' guidance_scale is 1 + w. eps_u is the network with its
learned null context, the one context dropout (p_uncond) trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.diffusion import Denoiser


def guided_denoiser(net: nn.Module, context: Tensor | None = None, guidance: float = 0.0,
                    interval: tuple[float, float] | None = None, rescale: float = 0.0) -> Denoiser:
    """context (B, K) or None (unconditional). Both branches share one batched forward when w != 0.

    interval (t_lo, t_hi): guide only at lo <= t <= hi, elsewhere the plain conditional eps (one forward): guidance in a
    limited interval of noise levels (Kynkaanniemi et al. 2024). rescale phi: CFG rescale (Lin et al. 2024, eq. 15-16
    on eps as diffusers' rescale_noise_cfg), eps <- phi eps_cfg std(eps_c) / std(eps_cfg) + (1 - phi) eps_cfg.

    Inputs are cast to the network's own dtype (a bf16 copy of the weights samples faster on CPU than
    autocast, which re-casts every weight at every step); the sampler's update math stays in float32.
    """
    dtype = next(net.parameters()).dtype

    def call(x: Tensor, t: Tensor, ctx: Tensor | None, keep: Tensor | None) -> Tensor:
        ctx = ctx.to(dtype) if ctx is not None else None
        with torch.autocast(x.device.type, enabled=False):  # the weights' dtype decides, also inside a bf16-mixed trainer
            return net(x.to(dtype), t, ctx, keep).float()

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if context is None:
            return call(x, t, None, None)
        if guidance == 0 or (interval is not None and not interval[0] <= float(t[0]) <= interval[1]):
            return call(x, t, context, None)
        b = x.shape[0]
        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=x.device), torch.zeros(b, dtype=torch.bool, device=x.device)])
        eps_c, eps_u = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, context]), keep).chunk(2)
        eps = eps_c + guidance * (eps_c - eps_u)
        if rescale:
            dims = list(range(1, eps.ndim))
            eps = rescale * eps * (eps_c.std(dims, keepdim=True) / eps.std(dims, keepdim=True)) + (1 - rescale) * eps
        return eps

    return denoise
