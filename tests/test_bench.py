"""Smoke test of bench/bench.py's pieces: FLOP counting, one training step, a 2-step DDIM loop (tiny batches)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # the peers' DDPM/DDIM schedulers

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("difflab_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _specs(bench):
    tiny = bench.ModelSpec(
        "ours_tiny", "difflab unet_tiny", "ours", "difflab", 16, 6, lambda **kw: bench.build_ours("unet_tiny", 16, 6, **kw)
    )
    return [tiny, bench.model_specs()["course"]]


@pytest.mark.parametrize("variant", ["fp32", "bf16-cl"])
@pytest.mark.parametrize("which", [0, 1], ids=["ours_tiny", "course"])
def test_flops_train_step_and_sampling(bench, which, variant):
    spec = _specs(bench)[which]
    device = torch.device("cpu")
    runner = bench.Runner(spec, bench.all_variants()[variant], device)
    flops, attn_added = bench.count_forward_flops(spec, runner.net, device)
    assert flops > 0 and attn_added >= 0
    if spec.kind == "course":
        assert flops == pytest.approx(0.301e9, rel=0.01)  # shared/MEASURED.md
        assert runner.params == pytest.approx(1.48e6, rel=0.01)

    rc = bench.RunConfig(train_batch=2, train_warmup=0, train_repeats=1, sample_n=2, sample_warmup=0, sample_warmup_steps=1, sample_repeats=0)
    train = runner.time_training(rc)
    assert train["loss_finite"] and len(train["step_s"]) == 1 and train["img_s"]["median"] > 0

    _, ctx = bench.make_inputs(spec, 2, device)
    images = runner.sample(2, steps=2, ctx=ctx)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_cpu_sdpa_flops_are_added(bench, monkeypatch):
    # the flop counter skips the CPU SDPA kernel: bench adds 4 B heads L^2 d per call
    q = torch.randn(2, 4, 64, 32)

    class Attn(torch.nn.Module):
        def forward(self, x, t, ctx=None):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    spec = bench.ModelSpec("attn", "attn", "peer", "lucidrains", 16, 0, Attn)
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: (q, None))
    flops, added = bench.count_forward_flops(spec, Attn(), torch.device("cpu"), batch=2)
    assert added == flops == 4 * 2 * 4 * 64 * 64 * 32 / 2


def test_main_renders_a_table(bench, capsys):
    report = bench.main(["--models", "course", "--precision", "fp32", "--skip-train", "--skip-sample", "--no-save",
                         "--matmul-size", "128", "--matmul-repeats", "1"])
    row = report["results"][0]
    assert "error" not in row and math.isclose(row["params"], 1.48e6, rel_tol=0.01)
    assert "| course ContextUnet" in capsys.readouterr().out
