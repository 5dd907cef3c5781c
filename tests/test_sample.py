"""sample.py end to end on a small trained checkpoint, and fine-tuning from one."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.train import train

from support import compose_cfg, read_metrics, run_script, straight_and_cut

QUIET = ["~callbacks.sample_grid", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny conditional sprites model after 120 steps (loss well below the initial 1.0)."""
    run = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(["model=unet_tiny", "data.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=120",
                       "trainer.limit_val_batches=2", "optim.optimizer.lr=2e-3", "callbacks.ema.decay=0.9", "timesteps=100", *QUIET], run)
    train(cfg)
    return run


def sample(run, out, *args):
    result = run_script("sample.py", f"ckpt={run}", f"hydra.run.dir={out}", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sample_writes_grid_gifs_npz_and_meta(trained, tmp_path):
    result = sample(trained, tmp_path / "s", "sampler=ddim", "steps=10", "n=4", "label=[hero,food]", "seed=3")
    folder = tmp_path / "s"
    with np.load(folder / "samples.npz") as z:
        assert z["images"].shape == (8, 16, 16, 3) and z["images"].dtype == np.uint8
        assert z["labels"].shape == (8, 6) and z["labels"][:4, 0].tolist() == [1] * 4 and z["labels"][4:, 2].tolist() == [1] * 4
        assert list(z["class_names"]) == ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]
    grid = Image.open(folder / "grid.png")
    assert grid.size[0] >= 4 * 16 * 4  # one row per class of 4 images, upscaled 4x
    chain = Image.open(folder / "chain.gif")
    assert chain.n_frames == 11  # x_T and the 10 steps
    assert Image.open(folder / "x0_chain.gif").n_frames == 10
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["steps"] == 10 and meta["rows"] == ["hero", "food"] and meta["seconds"] > 0
    assert meta["palette"] == "sprite" and meta["palette_colors"] == 16  # palette=auto on pixel art
    assert "img/s" in result.stdout and str(folder / "grid.png") in result.stdout


def test_same_seed_gives_byte_identical_npz(trained, tmp_path):
    digests = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        sample(trained, tmp_path / name, "sampler=dpmpp", "steps=5", "n=6", "label=weapon", f"seed={seed}", "gif=false")
        digests.append(hashlib.sha256((tmp_path / name / "samples.npz").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_ddpm_and_context_mix(trained, tmp_path):
    sample(trained, tmp_path / "d", "sampler=ddpm", "n=3", "context={hero:1.0,food:0.6}", "gif=false")
    with np.load(tmp_path / "d" / "samples.npz") as z:
        assert np.allclose(z["labels"][0], [1.0, 0, 0.6, 0, 0, 0])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["steps"] == 100 and meta["rows"] == ["1 hero, 0.6 food"]


def test_bad_label_lists_the_labels(trained, tmp_path):
    result = run_script("sample.py", f"ckpt={trained}", "label=dragon", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "unknown label 'dragon'" in result.stderr and "0=hero" in result.stderr and "5=side-facing" in result.stderr


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"\x00" * 100)
    result = run_script("sample.py", f"ckpt={bogus}", f"hydra.run.dir={tmp_path / 'o'}")
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr


def test_steps_with_ddpm_is_ignored_with_a_warning_as_in_evaluate(trained, tmp_path):
    result = run_script("sample.py", f"ckpt={trained}", "sampler=ddpm", "steps=10", "n=1", "gif=false", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runs all T steps: steps=10 does not apply" in result.stderr + result.stdout
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == 100


def test_finetune_starts_from_the_pretrained_weights(trained, tmp_path):
    common = ["model=unet_tiny", "timesteps=100", "data.batch_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", *QUIET]
    fresh = compose_cfg([*common, "data.classes=[food]"], tmp_path / "fresh")
    train(fresh)
    tuned = compose_cfg(["experiment=sprites_finetune", f"init_from={trained}", *common], tmp_path / "tuned")
    train(tuned)
    first = [next(float(r["train/loss"]) for r in read_metrics(run) if r["train/loss"]) for run in (tmp_path / "fresh", tmp_path / "tuned")]
    assert first[1] < 0.6 * first[0], first


def test_finetune_experiment_requires_init_from(tmp_path):
    with pytest.raises(ValueError, match="init_from="):
        train(compose_cfg(["experiment=sprites_finetune", "model=unet_tiny"], tmp_path))


def test_palette_output_stage_limits_the_colours(trained, tmp_path):
    from difflab.metrics.scores import palette_stats

    for palette, bound in (("sprite", 6), ("data", 6)):
        sample(trained, tmp_path / palette, "sampler=ddim", "steps=4", "n=3", "label=all", "gif=false", f"palette={palette}",
               "palette_colors=6")
        with np.load(tmp_path / palette / "samples.npz") as f:
            images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2)
        colors, _ = palette_stats(images)
        assert colors.max() <= bound and json.loads((tmp_path / palette / "meta.json").read_text())["palette"] == palette


def test_exported_checkpoint_is_the_ema_weights_in_float16(trained, tmp_path):
    """python -m difflab.export: only the network's EMA weights, rounded to float16; sampling from it equals sampling
    from the training checkpoint with its weights rounded the same way (bit for bit), and init_from= loads it."""
    from difflab.checkpoint import check_compatible, load_checkpoint, net_state_dict, resolve_checkpoint
    from difflab.model import load_model
    from difflab.samplers import DDIMSampler
    from difflab.sampling import SamplingSpec, generate

    out = tmp_path / "shipped.ckpt"
    result = run_script("-m", "difflab.export", str(trained), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    source = load_checkpoint(resolve_checkpoint(trained, tmp_path))
    shipped = load_checkpoint(out)
    ema = net_state_dict(source, ema=True)
    assert set(shipped["state_dict"]) == {f"net.{k}" for k in ema} and "optimizer_states" not in shipped
    assert all(torch.equal(shipped["state_dict"][f"net.{k}"], v.half()) for k, v in ema.items())
    assert out.stat().st_size < 0.3 * resolve_checkpoint(trained, tmp_path).stat().st_size

    model_a = load_model(trained)
    with torch.no_grad():
        for p in model_a.net.parameters():
            p.copy_(p.half().float())
    model_b = load_model(out)
    assert model_b.net.training is False and next(model_b.net.parameters()).dtype == torch.float32
    ctx = torch.eye(6)[[0, 2, 4]]
    spec = SamplingSpec(DDIMSampler(steps=5), guidance=1.0, seed=1, precision="32")
    a, b = (generate(spec.bind(m), ctx).pixels for m in (model_a, model_b))
    assert torch.equal(a, b)
    fresh = load_model(trained).net
    check_compatible(fresh, net_state_dict(shipped), "init_from")  # what train.py does with init_from=
    fresh.load_state_dict(net_state_dict(shipped))


def test_a_checkpoint_from_another_clone_finds_its_data_here(tmp_path):
    from difflab.checkpoint import relocated

    saved = {"paths": {"root_dir": "/old/clone", "data_dir": "/old/clone/data"},
             "data": {"path": "/old/clone/data/sprites/x.npz", "classes": ["hero"], "note": "/old/clone-2/y"}, "lr": 1e-3}
    moved = relocated(saved, tmp_path)
    assert moved["data"]["path"] == f"{tmp_path}/data/sprites/x.npz" and moved["paths"]["root_dir"] == str(tmp_path)
    assert moved["data"]["note"] == "/old/clone-2/y" and moved["data"]["classes"] == ["hero"] and moved["lr"] == 1e-3
    assert relocated(moved, tmp_path) == moved


def test_missing_pretrained_model_says_how_to_restore_it(tmp_path, monkeypatch):
    import difflab.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "PRETRAINED", tmp_path / "nowhere.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="git checkout data/pretrained"):
        checkpoint.resolve_checkpoint("pretrained", tmp_path)


def test_palette_auto_snaps_pixel_art_only(tmp_path):
    from difflab.model import DiffusionModel
    from difflab.objectives import VPrediction
    from difflab.samplers import DDIMSampler
    from difflab.sampling import SamplingSpec
    from difflab.schedules import LinearSchedule

    sprites, cifar = (DiffusionModel(None, LinearSchedule(10), VPrediction(), config={"data": compose_cfg([f"data={d}"], tmp_path).data})
                      for d in ("sprites", "cifar10"))
    auto, raw, data = (SamplingSpec(DDIMSampler(2), palette=p) for p in ("auto", None, "data"))
    assert auto.palette_for(sprites) == "sprite" and auto.palette_for(cifar) is None
    assert raw.palette_for(sprites) is None and data.palette_for(cifar) == "data"


def test_the_shipped_model_samples_every_class_on_a_fresh_clone(tmp_path):
    """ckpt=pretrained (data/pretrained/sprites.ckpt, committed): pixel art of the asked class, no training needed."""
    from difflab.checkpoint import PRETRAINED
    from difflab.metrics.classifier import load_classifier, predict_logits
    from difflab.metrics.scores import palette_stats

    assert PRETRAINED.stat().st_size < 10e6  # EMA weights in float16 only
    sample("pretrained", tmp_path / "p", "label=all", "n=8", "gif=false")
    with np.load(tmp_path / "p" / "samples.npz") as z:
        images, labels = torch.from_numpy(z["images"]).permute(0, 3, 1, 2), torch.from_numpy(z["labels"]).argmax(1)
    assert images.shape == (48, 3, 16, 16) and labels.bincount().tolist() == [8] * 6
    colors, top16 = palette_stats(images)
    assert colors.max() <= 16 and top16.min() == 1.0  # the default output stage: 16 colours per sprite
    net, _ = load_classifier(PRETRAINED.parents[1] / "classifiers" / "sprites.ckpt")
    with torch.no_grad():
        hits = predict_logits(net, images).argmax(1) == labels
    per_class = [hits[labels == c].float().mean().item() for c in range(6)]
    # the model card's n=1000 accuracy is 0.94 or more for every class: 8 samples of a class then hit 3 or fewer with
    # probability under 0.01% each
    assert min(per_class) >= 0.5, per_class


def test_init_from_pretrained_fine_tunes_the_shipped_weights(tmp_path):
    common = ["data.classes=[weapon]", "data.batch_size=16", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "~callbacks.model_checkpoint",
              "trainer.enable_checkpointing=false", *QUIET]
    runs = {"fresh": common, "tuned": ["experiment=sprites_finetune", "init_from=pretrained", *common]}
    for name, overrides in runs.items():
        train(compose_cfg(overrides, tmp_path / name))
    first = [next(float(r["train/loss"]) for r in read_metrics(tmp_path / name) if r["train/loss"]) for name in runs]
    assert first[1] < 0.5 * first[0], first


def test_consistency_tuning_resumes_exactly_and_samples_in_two_calls_by_default(trained, tmp_path):
    """experiment=sprites_consistency from a trained model: the stage curriculum advances (stage_steps=2), a run cut after
    its first epoch resumes bit for bit (the teacher is read again from init_from), and sample.py with no sampler
    settings samples it with consistency sampling in 2 steps."""
    common = ["experiment=sprites_consistency", f"init_from={trained}", "model=unet_tiny", "model.dropout=0.1", "timesteps=100",
              "data.limit=48", "data.batch_size=8", "trainer.max_epochs=2", "trainer.max_time=null", "trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "objective.stage_steps=2", "trainer.precision=32", *QUIET]
    a, b = straight_and_cut(common, tmp_path)
    assert a["global_step"] == b["global_step"] == 12
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    stages = sorted({float(r["train/stage"]) for r in read_metrics(tmp_path / "straight") if r.get("train/stage")})
    assert stages == [0.0, 1.0, 2.0, 3.0]  # max_stage 3
    assert not any(k.startswith("teacher") for k in a["state_dict"])  # the teacher is read from init_from, never saved
    assert any(k.startswith("target_net.") for k in a["state_dict"])  # the slow target network is: resumed above
    sample(tmp_path / "straight", tmp_path / "out", "label=all", "n=2")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sampler"] == "consistency" and meta["steps"] == 2 and meta["guidance"] == 2.0
