"""The shipped checkpoints sample the same images as the code that shipped them: every sampler and edit, four images
each, against tests/data/shipped_samples.npz (made by the discrete-time core before the continuous schedules; see
tests/data/shipped_samples.py). The arithmetic of the sampling changed (noise levels in float64, x_0 read from each
objective's own output), so the images are compared within the float32 chain bound (difflab.tolerance.chain_tol: other
kernels, step after step, as on another CPU) and within half an 8-bit level, the resolution the images are kept at: a
pixel may then move by one level where its value sits on a rounding boundary, and by no more."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.images import to_uint8
from difflab.tolerance import chain_tol

sys.path.insert(0, str(Path(__file__).parent / "data"))
import shipped_samples  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "shipped_samples.npz"
HALF_LEVEL = 1 / 255  # images in [-1, 1] are kept as 255 levels: half of one


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "ddpm" in n else n for n in shipped_samples.CASES])
def test_shipped_checkpoints_sample_the_same_images(reference, name):
    plan = shipped_samples.plan_of(name)
    outputs = []  # the largest network output along these chains, for the bound
    hook = plan.model.net.register_forward_hook(lambda module, inputs, output: outputs.append(float(output.abs().max())))
    try:
        got = shipped_samples.make(name, plan, reference["sources"])
    finally:
        hook.remove()
    expected = reference[name]
    # x_0 = (x_t - sigma eps) / alpha multiplies errors by up to sigma / alpha; a consistency model's guidance is in its
    # weights (plan.guidance: none)
    gain = max(level.edm_sigma for level in plan.levels[:-1])
    bound = chain_tol(plan.model.net, max(outputs), plan.steps, plan.guidance.scale, gain)
    diff = float((got - expected).abs().max())
    assert diff <= min(bound, HALF_LEVEL), (diff, bound)
    assert int((to_uint8(got).int() - to_uint8(expected).int()).abs().max()) <= 1
