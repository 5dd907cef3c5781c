"""Data modules on the real data: the shipped sprites, the course file formats, and CIFAR-10."""

import hashlib

import numpy as np
import pytest
import torch

from difflab.data.cifar10 import CIFAR10DataModule, load_cifar10
from difflab.data.sprites import SpritesDataModule, load_sprite_arrays
from difflab.errors import DataError

from conftest import SHARED_DATA, SPRITES

NAMES = ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]


def sprites(**kw) -> SpritesDataModule:
    dm = SpritesDataModule(path=str(SPRITES), class_names=NAMES, **kw)
    dm.setup("fit")
    return dm


def test_shipped_sprites_are_the_documented_file():
    assert hashlib.sha256(SPRITES.read_bytes()).hexdigest() == "501f3eae14514382ec1bcd2f138da1183e270ee6d8271374699f352bd439f4d7"
    images, labels, names = load_sprite_arrays(SPRITES)
    assert images.shape == (3819, 16, 16, 3) and images.dtype == np.uint8
    assert names == NAMES
    assert labels.sum(0).tolist() == [474, 2202, 124, 277, 115, 627]


def test_split_is_deterministic_disjoint_and_in_memory_uint8():
    a, b = sprites(), sprites()
    xa, ya = a.train_set.tensors
    assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 16, 16) and ya.shape[1] == 6
    assert len(a.train_set) + len(a.val_set) == 3819 and len(a.val_set) == 382
    assert torch.equal(xa, b.train_set.tensors[0]) and torch.equal(a.val_set.tensors[2], b.val_set.tensors[2])
    train_rows = {bytes(x.numpy()) for x in xa}
    # near-duplicate frames exist, but the same rows are never in both splits
    assert len(a.val_set) > 0 and sum(bytes(x.numpy()) in train_rows for x in a.val_set.tensors[0]) < len(a.val_set)
    other = sprites(split_seed=1)
    assert not torch.equal(other.val_set.tensors[0], a.val_set.tensors[0])


def test_val_batches_carry_fixed_noise_and_stratified_t():
    dm = sprites()
    x, ctx, noise, u = dm.val_set.tensors
    assert noise.shape == (382, 3, 16, 16) and noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    # u_i = (k + 1/2) / N for a permutation k: every quarter of [0, 1) gets a quarter of the images
    quarters = torch.bincount((u * 4).long(), minlength=4)
    assert quarters.min() >= 382 // 4 - 1


def test_batches_are_gathered_whole_and_scaled_after_transfer():
    dm = sprites(batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (32, 3, 16, 16) and batch[0].dtype == torch.uint8
    x, ctx = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, batch[0].float() / 127.5 - 1)  # no trainer: no flips
    assert torch.equal(ctx, batch[1])


def test_class_subset_keeps_the_full_context_and_the_held_out_split():
    full, sub = sprites(), sprites(classes=["food", "weapon"])
    y = sub.train_set.tensors[1]
    assert y[:, [0, 1, 3, 5]].sum() == 0 and y.shape[1] == 6
    assert len(sub.train_set) + len(sub.val_set) == 124 + 115
    # a held-out image of the full run stays held out in the subset run
    full_val = {bytes(x.numpy()) for x in full.val_set.tensors[0]}
    assert all(bytes(x.numpy()) in full_val for x in sub.val_set.tensors[0])


def test_unknown_class_lists_the_classes():
    with pytest.raises(ValueError, match="unknown class.*dragon.*hero"):
        SpritesDataModule(path=str(SPRITES), class_names=NAMES, classes=["dragon"])


def test_balanced_sampling_draws_classes_equally():
    dm = sprites(balanced=True, batch_size=256)
    torch.manual_seed(0)
    counts = torch.zeros(6)
    for i, (_, y) in enumerate(dm.train_dataloader()):
        counts += y.sum(0)
        if i == 9:
            break
    share = counts / counts.sum()
    assert (share - 1 / 6).abs().max() < 0.03, share  # unbalanced data: food would be 3%


def test_limit_keeps_a_seeded_subset():
    a, b = sprites(limit=50), sprites(limit=50)
    assert len(a.train_set) == 50 and torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert a.train_set.tensors[1].sum(0).count_nonzero() >= 3  # not all from one source sheet


def test_missing_sprites_file_names_the_path_and_how_to_get_it(tmp_path):
    dm = SpritesDataModule(path=str(tmp_path / "nope.npz"), class_names=NAMES)
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*data/sprites/pixel_sprites_16x16\.npz"):
        dm.setup("fit")


def test_course_format_npy_images_with_npz_labels(tmp_path):
    """The course ships (N,16,16,3) uint8 .npy images and (N,5) one-hot labels: read both formats."""
    course_labels = SHARED_DATA / "sprites" / "sprite_labels_nc_1788_16x16.npz"
    if not course_labels.is_file():
        pytest.skip("course labels not available")
    with np.load(course_labels) as z:
        labels, names = z["labels"], [str(n) for n in z["class_names"]]
    assert names == ["hero", "non-hero", "food", "spell", "side-facing"]
    # the course images could not be obtained: real sprites stand in for the pixels, N matched to the labels
    images, _, _ = load_sprite_arrays(SPRITES)
    n = 894  # the label sequence repeats every 894 rows
    np.save(tmp_path / "sprites_1788_16x16.npy", images[:n])
    np.save(tmp_path / "labels.npy", labels[:n])
    dm = SpritesDataModule(path=str(tmp_path / "sprites_1788_16x16.npy"), labels_path=str(course_labels),
                           class_names=names)
    with pytest.raises(ValueError, match="894 images but 89400 labels"):
        dm.setup("fit")
    dm = SpritesDataModule(path=str(tmp_path / "sprites_1788_16x16.npy"), labels_path=str(tmp_path / "labels.npy"), class_names=names)
    dm.setup("fit")
    assert dm.train_set.tensors[1].shape[1] == 5 and len(dm.train_set) + len(dm.val_set) == n


def test_cifar10_with_unverified_checksums_loads_and_warns(cifar_root):
    with pytest.warns(UserWarning, match="md5"):
        ds = load_cifar10(cifar_root, train=True, download=False, verify_checksums=False)
    assert ds.data.shape == (50000, 32, 32, 3) and ds.targets[:10] == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_cifar10_checksum_mismatch_is_a_clear_error(cifar_root):
    with pytest.raises(DataError, match="verify_checksums=false"):
        load_cifar10(cifar_root, train=True, download=False, verify_checksums=True)


def test_cifar10_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, verify_checksums=False)


def test_cifar10_ship_subset(cifar_root):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dm = CIFAR10DataModule(root=str(cifar_root), verify_checksums=False, class_names=names, classes=["ship"], val_size=1000)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    y = dm.train_set.tensors[1]
    assert (y.argmax(1) == 8).all() and 4800 < len(dm.train_set) < 5000
    assert dm.train_set.tensors[0].shape[1:] == (3, 32, 32)
