"""CIFAR-10 offline: the shipped classifier (found by class names, its held-out accuracy reproduced on the real
val split), a CIFAR-10 checkpoint scored by evaluate.py with it, the hour recipe's and the ship fine-tuning's configs.
Small slices of the real data (data.limit), never the hour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from difflab.config import PROJECT_ROOT
from difflab.metrics.classifier import find_classifier, predict_logits

from support import compose_cfg

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHIPPED = PROJECT_ROOT / "data" / "classifiers" / "cifar10.ckpt"


def cifar(root: Path, *extra: str) -> list[str]:
    return ["data=cifar10", f"data.root={root}", "data.verify_checksums=false", *extra]


@pytest.mark.filterwarnings("ignore:CIFAR-10 in")
def test_the_shipped_classifier_is_found_by_its_classes_and_reproduces_its_held_out_accuracy(cifar_root, tmp_path):
    from hydra.utils import instantiate

    net, info = find_classifier("auto", NAMES, 32, SHIPPED.parent, "cifar10")
    assert Path(info["path"]).resolve() == SHIPPED.resolve() and SHIPPED.stat().st_size <= 10e6
    report = info["report"]
    assert report["val_accuracy"] >= 0.80 and report["split"]["val_size"] == 1000
    # the val split of train.py's deterministic split (the images the classifier never saw), classified again here
    dm = instantiate(compose_cfg(cifar(cifar_root), tmp_path).data)
    dm.setup("fit")
    images, labels = dm.val_set.tensors[:2]
    assert len(images) == report["n_val"] == 1000
    correct = (predict_logits(net, images).argmax(1) == labels.argmax(1)).float()
    # a CPU kind may flip an argmax whose two logits tie to the last float bits: a few of 1000 images at most
    assert abs(correct.mean().item() - report["val_accuracy"]) <= 3 / 1000
    per_class = [correct[labels.argmax(1) == c].mean().item() for c in range(10)]
    assert min(per_class) > 0.5, dict(zip(NAMES, per_class))


@pytest.mark.filterwarnings("ignore:CIFAR-10 in")
def test_evaluate_scores_a_cifar10_checkpoint_offline_with_the_shipped_classifier(cifar_root, tmp_path):
    from difflab.evaluate import evaluate
    from difflab.train import train

    run = tmp_path / "run"
    cfg = compose_cfg(cifar(cifar_root, "data.limit=256", "model=unet_tiny", "optim=cosine", "timesteps=20", "debug=fast",
                            "trainer.max_epochs=1", "final_eval=none", "logger=none", "~callbacks.sample_grid"), run)
    train(cfg)
    cfg = compose_cfg([f"ckpt={run}", "n=40", "steps=2", "batch_size=20", f"metrics.cache_dir={tmp_path / 'cache'}",
                       "metrics.kid_subsets=5", "trainer.enable_progress_bar=false"], tmp_path / "eval", config_name="evaluate")
    row = evaluate(cfg)
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert result["row"]["n"] == 40 and math.isfinite(row["fd"]) and row["fd"] > 0
    assert {f"cond_acc/{c}" for c in NAMES} <= set(result["row"])
    reference = result["reference"]  # the real held-out images scored as samples: the floor
    assert reference["n"] == 1000 and 0.80 <= reference["cond_acc_weighted"] <= 1.0 and reference["fd"] < row["fd"]
    assert 0.0 <= row["memorized"] <= 1.0 and "nn_dist_q50" in row


def test_the_hour_recipe_is_a_small_conditional_network_on_a_time_budget(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=cifar10_60min"], tmp_path)
    net = instantiate(cfg.model)
    assert cfg.data.image_size == 32 and net.num_classes == 10 and cfg.trainer.max_time == "00:01:00:00"
    assert sum(p.numel() for p in net.parameters()) < 2e6  # the DDPM network (35.7M) makes a few hundred steps an hour
    assert cfg.schedule._target_.endswith("CosineSchedule") and cfg.objective._target_.endswith("VPrediction")


def test_the_ship_fine_tuning_trains_ships_only_from_the_given_model(cifar_root, tmp_path):
    from difflab.train import train

    base = tmp_path / "base"
    short = ["timesteps=20", "debug=fast", "trainer.max_epochs=1", "final_eval=none", "logger=none", "~callbacks.sample_grid"]
    train(compose_cfg(cifar(cifar_root, "data.limit=128", "model=unet_tiny", "optim=cosine", "objective=flow", *short), base))
    tuned = tmp_path / "ship"
    # no model= here: the fine-tune takes init_from's network, schedule and objective, not experiment=cifar10's DDPM setup
    cfg = compose_cfg(["experiment=cifar10_ship_finetune", f"init_from={base}", *cifar(cifar_root, "data.limit=64"), *short,
                       "trainer.max_steps=3", "trainer.max_epochs=-1"], tuned)
    assert list(cfg.data.classes) == ["ship"] and cfg.model.base_channels == 128
    train(cfg)
    before, after = (torch.load(next((run / "checkpoints").glob("last.ckpt")), map_location="cpu", weights_only=False)
                     for run in (base, tuned))
    assert after["global_step"] == 3
    for key in ("model", "schedule", "objective"):
        assert after["difflab_config"][key] == before["difflab_config"][key], key
