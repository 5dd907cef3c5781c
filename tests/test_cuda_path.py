"""The CUDA choices, checked on any machine by faking the GPU: bf16 only where the GPU runs it natively (compute
capability 8.0+), else 16-mixed for training and float32 for sampling; TF32 matmuls on CUDA only, switchable."""

from __future__ import annotations

import pytest
import torch

from difflab.config import fast_precision, use_tf32
from difflab.samplers import DDIMSampler
from difflab.sampling import SamplingSpec

from support import compose_cfg


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA GPU of a chosen compute capability (nothing runs on it)."""

    def fake(major: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # what a V100 answers too

    return fake


@pytest.mark.parametrize("major,training,sampling", [(7, "16-mixed", torch.float32), (8, "bf16-mixed", torch.bfloat16),
                                                     (9, "bf16-mixed", torch.bfloat16)])
def test_bf16_only_on_gpus_that_run_it_natively(gpu, tmp_path, major, training, sampling):
    gpu(major)
    assert fast_precision("gpu") == fast_precision("auto") == training
    assert compose_cfg(["trainer=gpu"], tmp_path).trainer.precision == training  # trainer=gpu follows the same rule
    assert SamplingSpec(DDIMSampler(2)).dtype("cuda") == sampling


def test_tf32_is_switched_on_cuda_only(gpu):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        use_tf32(True)  # no GPU: nothing changes (CPU matmuls keep full float32)
        assert torch.get_float32_matmul_precision() == "highest" or torch.cuda.is_available()
        gpu(8)
        use_tf32(True)
        assert torch.get_float32_matmul_precision() == "high"
        use_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
