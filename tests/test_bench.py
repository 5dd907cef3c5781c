"""Smoke tests of bench/: FLOP counting, one real training step through DiffusionModule + Trainer, sampling
through difflab.sampling.generate, the report (tiny sizes, one thread)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # the diffusers peer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("difflab_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    # tiny tensors on a shared 2-core machine: a second intra-op thread only spins
    yield


def _spec(bench, key):
    if key == "ours_tiny":
        return bench.ModelSpec("ours_tiny", "difflab unet_tiny", "ours", 16, ("data=sprites", "model=unet_tiny"))
    return bench.model_specs()[key]


def test_course_flops_and_params(bench):
    net = bench.peers.build_peer("course", 16)
    flops, attn_added = bench.flops.forward_flops(net)
    assert flops == pytest.approx(0.301e9, rel=0.01)  # shared/MEASURED.md
    assert attn_added == 0
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(1.48e6, rel=0.01)


def test_cpu_sdpa_flops_are_added(bench):
    # the flop counter skips the CPU SDPA kernel: bench adds 4 B heads L^2 d per call
    q = torch.randn(2, 4, 64, 32)

    class Attn(torch.nn.Module):
        def forward(self, x, t, context=None):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    flops, added = bench.flops.count_flops(Attn(), q, torch.zeros(2, dtype=torch.long))
    assert added == flops == 4 * 2 * 4 * 64 * 64 * 32 / 2


@pytest.mark.parametrize(("key", "variant"), [("ours_tiny", "fp32"), ("ours_tiny", "bf16"), ("course", "fp32")])
def test_one_real_training_step(bench, key, variant):
    from difflab.ema import EMA
    from difflab.module import DiffusionModule

    runner = bench.Runner(_spec(bench, key), bench.all_variants()[variant], "cpu", batch=2)
    try:
        assert isinstance(runner.module, DiffusionModule)
        assert runner.module.conditional  # ours: 6 classes, the course: 5 context features
        before = [p.detach().clone() for p in runner.net.parameters()]
        rc = bench.RunConfig(train_batch=2, train_warmup=1, train_repeats=1, sample_n=2, sample_warmup=0,
                             sample_warmup_steps=1, sample_repeats=0)
        train = runner.time_training(rc)
        trainer = runner.trainer
        assert trainer.global_step == 2 and len(train["step_s"]) == 1 and train["img_s"]["median"] > 0
        assert train["loss_finite"] and train["batch"] == 2
        # the Trainer as configured: clipping, the precision plugin, the EMA callback
        assert trainer.gradient_clip_val == 1.0 and train["gradient_clip_val"] == 1.0
        assert trainer.precision == {"fp32": "32-true", "bf16": "bf16-mixed"}[variant]
        assert any(isinstance(c, EMA) for c in trainer.callbacks) and train["ema"]
        # the module's own clipping hook ran (it logs the gradient norm)
        assert "train/grad_norm" in trainer.callback_metrics
        assert any(not torch.equal(a, b) for a, b in zip(before, runner.net.parameters()))
    finally:
        runner.close()


@pytest.mark.parametrize(("key", "variant"), [("ours_tiny", "fp32"), ("ours_tiny", "bf16"), ("course", "bf16"), ("diffusers_sprites", "fp32")])
def test_sampling_through_generate(bench, key, variant):
    runner = bench.Runner(_spec(bench, key), bench.all_variants()[variant], "cpu")
    try:
        out = runner.sample(2, steps=2)
        assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
        rc = bench.RunConfig(train_batch=2, train_warmup=0, train_repeats=0, sample_n=2, sample_warmup=0,
                             sample_warmup_steps=1, sample_repeats=1)
        if key == "ours_tiny":
            sample = runner.time_sampling(rc)
            assert sample["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[variant] and sample["images_finite"]
            assert len(sample["run_s"]) == 1 and sample["img_s"]["median"] > 0
            assert next(runner.net.parameters()).dtype == torch.float32  # the bf16 copy is a copy
    finally:
        runner.close()


def test_main_renders_tables_and_ratios(bench, capsys, tmp_path):
    argv = ["--models", "ours_sprites,course", "--precision", "fp32", "--rounds", "2", "--train-batch-16", "2",
            "--train-warmup", "0", "--train-repeats", "1", "--sample-n-16", "2", "--sample-warmup", "0", "--sample-repeats", "1",
            "--matmul-size", "128", "--matmul-repeats", "1", "--out", str(tmp_path), "--tag", "test"]
    report = bench.main(argv)
    rows = {r["model"]: r for r in report["results"]}
    assert all("error" not in r for r in rows.values()), rows
    assert math.isclose(rows["course"]["params"], 1.48e6, rel_tol=0.01)
    for row in rows.values():
        assert row["rounds"] == 2 and len(row["train"]["step_s"]) == 2 and len(row["sample"]["run_s"]) == 2
        assert row["train"]["gflops_s"] > 0 and row["sample"]["gflops_s"] > 0
    assert rows["course"]["model_target"].endswith("peers.build_peer")
    (ratio,) = report["ratios"]
    assert ratio["ours"] == "ours_sprites" and ratio["peer"] == "course" and ratio["train"] > 0 and ratio["sample"] > 0
    out = capsys.readouterr().out
    assert "| course ContextUnet" in out and "| 16 | fp32 | ours_sprites | course |" in out
    stem = tmp_path / f"{report['date'][:10]}_cpu_test"
    assert stem.with_suffix(".json").is_file() and stem.with_suffix(".md").is_file()
