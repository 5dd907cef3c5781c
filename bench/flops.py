"""FLOPs per image of a network's forward pass, and the matmul peak the achieved rates are compared with.

torch.utils.flop_counter counts convolutions, matmuls and the CUDA scaled_dot_product_attention kernels
(flash / efficient / cudnn), not the CPU one: its QK^T and AV FLOPs are added here (``CPU_SDPA_OPS``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_ATEN = torch.ops.aten
# the counter has formulas for the CUDA SDPA kernels, not for the CPU one
CPU_SDPA_OPS = [_ATEN._scaled_dot_product_flash_attention_for_cpu]


def _sdpa_formula(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # QK^T and AV: 2 * B*heads*L*S*d + 2 * B*heads*L*S*d_v (= 4 B heads L^2 d for self-attention)
    return sdpa_flop_count(q, k, v)


def count_flops(net: nn.Module, x: Tensor, t: Tensor, context: Tensor | None = None) -> tuple[float, float]:
    """(forward FLOPs per image, of which CPU SDPA attention FLOPs added by hand per image): net(x, t, context),
    no grad, eval mode, in the inputs' dtype."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping={op: _sdpa_formula for op in CPU_SDPA_OPS}) as counter:
            net(x, t, context)
    finally:
        net.train(was_training)
    batch = x.shape[0]
    added = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items() if op in CPU_SDPA_OPS)
    return counter.get_total_flops() / batch, added / batch


def forward_flops(net: nn.Module, device: torch.device | str = "cpu", batch: int = 2, timesteps: int = 1000) -> tuple[float, float]:
    """count_flops on random fp32 inputs shaped from difflab's net interface (in_channels, image_size, num_classes)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn((batch, net.in_channels, net.image_size, net.image_size), generator=g).to(device)
    t = torch.randint(0, timesteps, (batch,), generator=g).to(device)
    k = getattr(net, "num_classes", 0)
    context = F.one_hot(torch.randint(0, k, (batch,), generator=g), k).float().to(device) if k else None
    return count_flops(net, x, t, context)


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict[str, float]:
    """median, min, max, quartiles (q1, q3: the IQR) and n."""
    v = sorted(values)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[::2]) if len(v) >= 2 else (v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


def _matmul_rates(device, dtype, n: int, repeats: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn((n, n), generator=g).to(device=device, dtype=dtype)
    b = torch.randn((n, n), generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def matmul_peak(device: torch.device | str, dtype: torch.dtype, n: int, repeats: int, max_s: float = 5.0) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in ``dtype`` (after one warm-up), summarized over ``repeats``. Where one product
    would take longer than ``max_s`` (bf16 emulated on a CPU without AVX512-BF16/AMX), a smaller power of two."""
    probe = min(n, 512)
    rate = max(_matmul_rates(device, dtype, probe, 1))
    while n > probe and 2 * n**3 / (rate * 1e9) > max_s:
        n //= 2
    return {**summarize(_matmul_rates(device, dtype, n, repeats)), "size": n}
