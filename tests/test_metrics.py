"""The metrics: FD/KID behave as distances, accuracy matches the classifier's report, the real-feature cache,
memorization distances, the sample plan, and the offline errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from difflab.metrics import cache as cache_mod
from difflab.metrics.cache import real_features
from difflab.metrics.classifier import ClassifierError, SmallCNN, find_classifier, load_classifier, save_classifier
from difflab.metrics.features import ClassifierFeatures, InceptionUnavailable, inception_weights_path
from difflab.metrics.scores import KernelDistance, SampleMetrics, nearest_train
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.samplers import DDIMSampler
from difflab.sampling import EvalPlan, SamplingSpec

from support import compose_cfg

CLASSES = ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]


@pytest.fixture(scope="module")
def sprites():
    """The sprite DataModule, set up (train/val uint8 tensors)."""
    cfg = compose_cfg([], "/tmp/unused")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    return dm


def random_classifier(seed: int = 0) -> ClassifierFeatures:
    torch.manual_seed(seed)
    net = SmallCNN(len(CLASSES), channels=(8, 16)).eval()
    return ClassifierFeatures(net, {"class_names": CLASSES, "image_size": 16, "path": "random"})


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def scores(features_net, real: torch.Tensor, fake: torch.Tensor, **kw) -> dict:
    m = SampleMetrics(features_net, None, CLASSES, conditional=False, kid_subset_size=150, kid_subsets=4, sync=False, **kw)
    real_feats, _ = real_features(features_net, real, "t", "train", None)
    m.add_real(real_feats, torch.arange(len(real)))
    m.update(fake, None, torch.arange(len(fake)))
    return m.compute()


def test_fd_and_kid_are_zero_on_the_same_set_and_grow_with_noise(sprites):
    net = random_classifier()
    real = sprites.train_set.tensors[0][:300]
    same = scores(net, real, real)
    assert abs(same["fd"]) < 1e-6 * (1 + abs(scores(net, real, noisy(real, 8))["fd"]))
    assert abs(same["kid"]) < 1e-3
    fds, kids = [], []
    for sigma in (8, 24, 64):
        s = scores(net, real, noisy(real, sigma))
        fds.append(s["fd"])
        kids.append(s["kid"])
    assert 0 < fds[0] < fds[1] < fds[2]
    assert kids[0] < kids[1] < kids[2] and kids[2] > 0


def test_kid_does_not_depend_on_how_samples_were_split():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 16, generator=g), torch.randn(250, 16, generator=g) + 0.3
    one = KernelDistance(subsets=10, subset_size=100, seed=3)
    one.update(real, torch.arange(300), real=True)
    one.update(fake, torch.arange(250), real=False)
    two = KernelDistance(subsets=10, subset_size=100, seed=3)
    # the "rank 1" share first, in a different chunking
    for idx in (torch.arange(1, 250, 2), torch.arange(0, 250, 2)):
        two.update(fake[idx], idx, real=False)
    for idx in (torch.arange(150, 300), torch.arange(0, 150)):
        two.update(real[idx], idx, real=True)
    assert torch.allclose(torch.stack(one.compute()), torch.stack(two.compute()), atol=1e-12)


def test_nearest_train_distance_finds_copies_and_mirror_images(sprites):
    train = sprites.train_set.tensors[0][:500]
    copies = torch.cat([train[:10], train[10:20].flip(-1)])
    d, nearest = nearest_train(copies, train)
    assert d.max() < 1e-3
    assert (nearest[:10] == torch.arange(10)).all()
    d_noisy, _ = nearest_train(noisy(train[:20], 40), train)
    assert (d_noisy > 0.05).all()


def test_real_feature_cache_is_reused_and_invalidated(tmp_path, sprites, monkeypatch):
    net = random_classifier()
    images = sprites.val_set.tensors[0]
    calls = []
    original = cache_mod.extract
    monkeypatch.setattr(cache_mod, "extract", lambda *a, **k: calls.append(1) or original(*a, **k))

    first, _ = real_features(net, images, "sprites", "val", tmp_path)
    second, _ = real_features(net, images, "sprites", "val", tmp_path)
    assert len(calls) == 1 and torch.equal(first, second)  # the second call did no feature pass

    net.preprocessing = "uint8/255"  # a different preprocessing: a different key
    real_features(net, images, "sprites", "val", tmp_path)
    assert len(calls) == 2
    real_features(net, images[:-1], "sprites", "val", tmp_path)  # different images (e.g. another split)
    assert len(calls) == 3
    real_features(random_classifier(seed=1), images, "sprites", "val", tmp_path)  # different weights
    assert len(calls) == 4
    assert len(list(tmp_path.glob("*.pt"))) == 4


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """A classifier trained for a few batches by the real entry point's code; its report is what it wrote."""
    from difflab.train_classifier import train_classifier

    out = tmp_path_factory.mktemp("clf")
    cfg = compose_cfg(["trainer.max_epochs=1", "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=1",
                       "logger=none", "trainer.enable_progress_bar=false", "net.channels=[8,16]"], out, config_name="classifier")
    with open_dict(cfg):
        cfg.output = str(out / "sprites.ckpt")
    train_classifier(cfg)
    return Path(cfg.output)


def test_accuracy_on_real_held_out_images_equals_the_reported_accuracy(trained_classifier, sprites):
    net, info = load_classifier(trained_classifier)
    cfg = MetricsConfig(classifier_ckpt=str(trained_classifier), cache_dir=None, memorization=False, kid_subsets=2)
    ctx = MetricsContext(cfg, sprites, {}, conditional=True)
    ref = ctx.reference()
    report = info["report"]
    assert ref["cond_acc_weighted"] == pytest.approx(report["val_accuracy"], abs=1e-9)
    assert ref["cond_acc"] == pytest.approx(report["val_accuracy_balanced"], abs=1e-9)
    for name, acc in report["val_accuracy_per_class"].items():
        assert ref[f"cond_acc/{name}"] == pytest.approx(acc, abs=1e-9)
    assert ref["n"] == report["n_val"] == len(sprites.val_set)


def test_classifier_is_found_by_its_classes_and_missing_one_says_how_to_train(tmp_path, trained_classifier):
    net, info = find_classifier("auto", CLASSES, 16, trained_classifier.parent, "sprites")
    assert info["path"] == str(trained_classifier) and isinstance(net, SmallCNN)
    with pytest.raises(ClassifierError, match=r"python train_classifier.py data=cifar10"):
        find_classifier("auto", ["airplane"] * 10, 32, trained_classifier.parent, "cifar10")
    with pytest.raises(ClassifierError, match=r"python train_classifier.py data=sprites"):
        find_classifier(str(tmp_path / "nope.ckpt"), CLASSES, 16, tmp_path, "sprites")


def test_saved_classifier_round_trips(tmp_path):
    net = SmallCNN(6, channels=(8, 16))
    path = save_classifier(tmp_path / "c.ckpt", net, CLASSES, 16, {"x": 1}, {"val_accuracy": 0.5})
    loaded, info = load_classifier(path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), net.eval()(x)) and info["report"]["val_accuracy"] == 0.5


def test_inception_without_weights_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr("difflab.metrics.features.reachable", lambda *a: False)
    with pytest.raises(InceptionUnavailable, match=r"metrics.inception_weights=.*weights-inception-2015-12-05"):
        inception_weights_path(None)
    with pytest.raises(InceptionUnavailable, match="does not exist"):
        inception_weights_path(str(tmp_path / "missing.pth"))
    cached = tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert inception_weights_path(None) == str(cached)  # the hub cache is used without the network


def test_sample_plan_shares_are_disjoint_and_their_union_independent_of_world_size():
    plan = EvalPlan(n=100, batch_size=16, num_classes=6, classes=range(6))
    for world in (1, 2, 3, 8):
        shares = [plan.chunks_for(r, world) for r in range(world)]
        flat = [c for s in shares for c in s if c >= 0]
        assert sorted(flat) == list(range(plan.n_chunks))
    assert plan.chunks_for(7, 8) == [-1]  # 7 chunks on 8 ranks: the last rank makes nothing
    labels = plan.labels(torch.arange(96))
    assert torch.bincount(labels).tolist() == [16] * 6


def test_a_chunk_is_the_same_whoever_makes_it():
    from difflab.model import DiffusionModel
    from difflab.nn.unet import UNet
    from difflab.objectives import EpsPrediction
    from difflab.schedules import LinearSchedule

    torch.manual_seed(0)
    net = UNet(16, 3, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=6, norm_groups=4)
    model = DiffusionModel(net, LinearSchedule(50), EpsPrediction())
    plan = EvalPlan(n=10, batch_size=4, num_classes=6, classes=range(6))
    bound = SamplingSpec(DDIMSampler(steps=2), batch_size=4, palette=None).bind(model)
    a, la, ia = plan.generate_chunk(bound, 2)
    plan.generate_chunk(bound, 0)  # another chunk in between changes nothing
    b, lb, ib = plan.generate_chunk(bound, 2)
    assert torch.equal(a, b) and ia.tolist() == [8, 9] and la.tolist() == [2, 3] and a.dtype == torch.uint8


@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch, sprites):
    """metrics.inception_weights=<file> works offline (random weights stand in for the real file here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    from difflab.metrics.features import InceptionFeatures

    with monkeypatch.context() as m:  # build the network once without any weights to write a stand-in file
        m.setattr(tf, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.save(tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "w.pth")
    monkeypatch.setattr("difflab.metrics.features.reachable", lambda *a: pytest.fail("must not touch the network"))
    net = InceptionFeatures(str(tmp_path / "w.pth"))
    real = sprites.val_set.tensors[0][:10]
    feats, logits = net.features_and_logits(real)
    assert feats.shape == (10, 2048) and logits is None
    assert net.cache_id().startswith("inception-") and "299" in net.preprocessing
    same = scores(net, real, real)
    assert abs(same["fd"]) < 1e-3 * (1 + abs(scores(net, real, noisy(real, 60))["fd"]))


def test_the_scorer_names_the_classifier_weights(trained_classifier, sprites):
    """Two contexts on one classifier file share a scorer; another classifier (or the same one with a weight moved)
    is another ruler."""
    from difflab.config import PROJECT_ROOT

    cfg = lambda path: MetricsConfig(classifier_ckpt=str(path), cache_dir=None, memorization=False, kid_subsets=2)  # noqa: E731
    a, b = (MetricsContext(cfg(trained_classifier), sprites, {}, conditional=True) for _ in range(2))
    assert a.scorer == b.scorer and len(a.scorer) == 12 and int(a.scorer, 16) >= 0
    with torch.no_grad():
        next(b.classifier.net.parameters()).view(-1)[0] += 1e-3
    del b.__dict__["scorer"]  # cached: computed again from the moved weights
    assert b.scorer != a.scorer
    shipped = PROJECT_ROOT / "data" / "classifiers" / "sprites.ckpt"
    if shipped.is_file():
        assert MetricsContext(cfg(shipped), sprites, {}, conditional=True).scorer != a.scorer


def test_shipped_sprites_classifier_still_scores_its_reported_accuracy(sprites):
    """data/classifiers/sprites.ckpt (what metrics use by default) against today's data and split."""
    from difflab.config import PROJECT_ROOT

    path = PROJECT_ROOT / "data" / "classifiers" / "sprites.ckpt"
    if not path.is_file():
        pytest.skip("no data/classifiers/sprites.ckpt (python train_classifier.py)")
    ctx = MetricsContext(MetricsConfig(classifier_ckpt=str(path), cache_dir=None, memorization=False, kid_subsets=2), sprites, {},
                         conditional=True)
    report = load_classifier(path)[1]["report"]
    assert ctx.reference()["cond_acc_weighted"] == pytest.approx(report["val_accuracy"], abs=1e-9)


def test_train_classifier_defaults_are_the_recipe_of_the_shipped_classifier(tmp_path):
    """python train_classifier.py retrains the classifier every FD in the docs is measured with: its data settings
    (sampling, augmentation, split, batch) and network are the ones recorded in the shipped checkpoint, whatever the
    diffusion data defaults become (a class-balanced sampler on top of the class-weighted loss trades the held-out
    non-hero accuracy, 0.95 with the shipped recipe, down to about 0.78)."""
    from omegaconf import OmegaConf

    from difflab.config import PROJECT_ROOT

    path = PROJECT_ROOT / "data" / "classifiers" / "sprites.ckpt"
    if not path.is_file():
        pytest.skip("no data/classifiers/sprites.ckpt (python train_classifier.py)")
    info = load_classifier(path)[1]
    cfg = compose_cfg([], tmp_path, config_name="classifier")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    shipped = {k: v for k, v in info["data"].items() if k not in ("path", "num_workers")}
    assert {k: data.get(k) for k in shipped} == shipped
    assert {k: OmegaConf.to_container(cfg.net, resolve=True).get(k) for k in info["arch"]} == info["arch"]


def test_sample_labels_follow_the_data_class_frequencies():
    from difflab.sampling import proportional_labels

    counts = [474, 2202, 124, 277, 115, 627]  # the sprites' classes
    labels = proportional_labels(1000, range(6), counts)
    got = torch.bincount(labels, minlength=6)
    expected = torch.tensor(counts, dtype=torch.float64) * 1000 / sum(counts)
    assert got.sum() == 1000 and (got - expected).abs().max() < 1
    # spread along the index: every chunk of 250 has each class in proportion (up to a sample or two)
    for chunk in labels.split(250):
        assert (torch.bincount(chunk, minlength=6) - expected / 4).abs().max() <= 2
    # equal weights: round robin over a class subset
    assert proportional_labels(6, [2, 4], []).tolist() == [2, 4, 2, 4, 2, 4]


def test_headline_accuracy_is_class_balanced_and_the_majority_class_scores_low():
    """A model that draws the majority class for every label: frequency-weighted 0.58 on the sprites' mix, but
    class-balanced 1/6 (per class: 1 for non-hero, 0 elsewhere)."""
    from difflab.metrics.scores import ClassAccuracy

    counts = [474, 2202, 124, 277, 115, 627]
    labels = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    acc = ClassAccuracy(6)
    acc.update(torch.nn.functional.one_hot(torch.full_like(labels, 1), 6).float(), labels)
    balanced, per_class, weighted = acc.compute()
    assert float(weighted) == pytest.approx(2202 / sum(counts)) and float(weighted) > 0.57
    assert float(balanced) == pytest.approx(1 / 6) and per_class.tolist() == [0, 1, 0, 0, 0, 0]
    # classes without samples (a model trained on a subset) are left out of the mean, not counted as 0
    sub = ClassAccuracy(6)
    sub.update(torch.nn.functional.one_hot(torch.tensor([0, 0, 3, 2]), 6).float(), torch.tensor([0, 0, 2, 2]))
    balanced, per_class, weighted = sub.compute()
    assert float(balanced) == pytest.approx((1 + 0.5) / 2) and float(weighted) == pytest.approx(3 / 4)
    assert per_class[[0, 2]].tolist() == [1, 0.5] and per_class[[1, 3, 4, 5]].isnan().all()


def test_palette_stats_count_colours_and_the_top_16_share():
    from difflab.metrics.scores import palette_stats

    flat = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    flat[0, :, :8] = torch.tensor([200, 10, 30], dtype=torch.uint8)[:, None, None]  # two colours, half each
    noisy_img = torch.arange(256 * 3).reshape(1, 3, 16, 16).remainder(256).to(torch.uint8)  # 256 distinct colours
    colors, share = palette_stats(torch.cat([flat, noisy_img]))
    assert colors.tolist() == [2, 256]
    assert share.tolist() == [1.0, 16 / 256]


def test_real_sprites_have_the_pixel_art_statistics_the_issue_names(sprites):
    """The shipped sprites: a median of 8 colours per sprite, all pixels covered by each sprite's 16 most frequent."""
    from difflab.metrics.scores import PaletteStats

    stats = PaletteStats()
    stats.update(sprites.train_set.tensors[0])
    out = stats.compute()
    assert out["colors_median"] == 8 and out["top16_share"] > 0.999


def test_snap_to_palette_per_sprite_and_to_the_data_colours(sprites):
    from difflab.images import data_palette, snap_to_palette
    from difflab.metrics.scores import palette_stats

    g = torch.Generator().manual_seed(0)
    noisy_img = torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8)
    colors, share = palette_stats(snap_to_palette(noisy_img, colors=8))
    assert colors.max() <= 8 and bool((share == 1).all())
    real = sprites.train_set.tensors[0][:200]
    assert torch.equal(snap_to_palette(real, colors=16), real)  # real sprites have at most 16 colours: unchanged
    pal = data_palette(sprites.train_set.tensors[0], 32)
    snapped = snap_to_palette(noisy_img, palette=pal)
    pixels = noisy_img.permute(0, 2, 3, 1).reshape(-1, 1, 3).float()
    dist = (pixels - torch.as_tensor(pal).float()).square().sum(-1)  # brute force nearest colour
    got = snapped.permute(0, 2, 3, 1).reshape(-1, 3).float()
    assert torch.allclose((pixels[:, 0] - got).square().sum(-1), dist.min(1).values)


def test_data_palette_is_most_frequent_first():
    from difflab.images import data_palette

    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    img[0, :, 0, 0] = torch.tensor([9, 8, 7])  # one pixel of (9, 8, 7), three black
    assert data_palette(img, 2).tolist() == [[0, 0, 0], [9, 8, 7]]
