"""How far two float32 computations of the same math may differ when only their kernels (order of summation) differ:
batch sizes, chunking, AMX vs AVX-512 vs AVX2, ONNX Runtime vs PyTorch, a GPU vs a CPU. Used by the tests and by the
GPU check (bench/gpu_check.py) to compare results with a bound derived from the arithmetic, not from one machine."""

from __future__ import annotations

import math

import torch
from torch import nn

U32 = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff, 2^-24


def reorder_tol(ref: torch.Tensor, layers: int, width: int) -> float:
    """How far two float32 evaluations of one network may differ when only their order of summation differs
    (batch size, chunking, AMX vs AVX-512 vs AVX2 kernels): a sum of ``width`` terms in blocked/pairwise order
    carries a relative error of about log2(width) u; ``layers`` such sums compound; x4 headroom. Relative to the
    largest output, since the errors of a layer scale with its inputs' magnitude, not with each output's."""
    return 4 * layers * math.log2(width) * U32 * float(ref.abs().max())


def chain_tol(net: nn.Module, peak: float, steps: int, guidance: float, gain: float) -> float:
    """How far two float32 runs of a sampler may differ (ONNX Runtime vs PyTorch, a GPU vs a CPU): the same math in other
    kernels, step after step.

    One network evaluation: the kernels differ in their order of summation, reorder_tol(peak, layers, width) with the
    network's weight layers (an upper bound on its depth), its largest fan-in (or token count, for attention) and its
    largest output ``peak``. Guidance, (1 + w) out_c - w out_u, adds the errors of both branches: x (1 + 2|w|). The
    sampler turns eps into x_0 = (x_t - sigma_t eps) / alpha_t: x ``gain`` = max sigma_t / alpha_t over the visited t
    (v-prediction's x_0 = alpha_t x_t - sigma_t v is within it). DPM-Solver++(2M) combines the new and the last x_0
    with |1 + 1/2r| + |1/2r| = 1 + 1/r ~ 2 (r ~ 1 on linspace steps): x 2. x_t's error is carried with sigma_prev /
    sigma_t < 1, clipping and re-noising are 1-Lipschitz, and a stable solver carries earlier errors with gain about 1
    (the network's Jacobian is not bounded here: reorder_tol's x4 headroom covers it), so the steps add: x steps.
    ONNX Runtime vs PyTorch on a CPU: about 1e-6, against bounds of 3e-2 (15 guided DPM-Solver++ steps) and 7e-4 (2
    consistency steps)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    width = max(max(m.weight[0].numel() for m in layers), net.image_size**2)
    return steps * (1 + 2 * abs(guidance)) * gain * 2 * reorder_tol(torch.tensor(peak), len(layers), width)
