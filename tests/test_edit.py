"""Editing existing sprites (difflab.editing, edit.py): RePaint's walk against diffusers, the noising jumps against their
closed form, inpainting keeps every kept pixel, SDEdit's strength, interpolation's ends and smoothness, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.editing import Inpaint, Interpolate, Vary, repaint_path, slerp
from difflab.images import to_unit_range
from difflab.model import load_model
from difflab.samplers import DDIMSampler, DPMSolverPP2MSampler, HeunSampler, spaced_timesteps
from difflab.samplers.base import walk
from difflab.sampling import SamplingSpec, generate
from difflab.schedules import LinearSchedule

from support import check_one_line, run_in_process, run_script

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches on a shared machine (conftest.py)


@pytest.fixture(scope="module")
def model():
    return load_model("pretrained")


@pytest.fixture(scope="module")
def held_out(model):
    from hydra.utils import instantiate

    dm = instantiate(model.config["data"])
    dm.setup("fit")
    return dm.val_set.tensors[0], dm.val_set.tensors[1].argmax(1)


@pytest.mark.parametrize("steps,length,n", [(15, 3, 4), (250, 10, 10), (20, 5, 1), (6, 10, 3)])
def test_repaint_walk_visits_the_timesteps_of_diffusers_repaint_scheduler(steps, length, n):
    from diffusers import RePaintScheduler

    ref = RePaintScheduler(num_train_timesteps=1000)
    ref.set_timesteps(steps, jump_length=length, jump_n_sample=n)
    ts = [*spaced_timesteps(1000, steps, "leading"), -1]  # diffusers' RePaint spacing; -1: the clean image
    path = repaint_path(steps, length, n)
    assert [ts[p] for p in path[:-1]] == ref.timesteps.tolist() and path[-1] == steps
    assert all(abs(q - p) == 1 for p, q in zip(path, path[1:]))


def test_a_jump_back_lands_on_the_forward_marginal():
    """x_t ~ q(x_t | x_0), then the jump to t' > t: x_t' must follow q(x_t' | x_0) = N(sqrt(ab_t') x_0, (1 - ab_t') I)."""
    s = LinearSchedule(1000)
    t, t_up, n = 300, 600, 200_000
    x0 = torch.full((n, 1), 0.7)
    noise = torch.Generator().manual_seed(0)
    x_t = s.alphas_cumprod[t].sqrt() * x0 + (1 - s.alphas_cumprod[t]).sqrt() * torch.randn(n, 1, generator=noise)

    # a two-position walk whose one move is a jump: from t (position 1) back to t_up (position 0)
    out = walk(DDIMSampler(2), None, s, [s.level_at(t_up), s.level_at(t)], x_t, noise, [1, 0])
    ab = float(s.alphas_cumprod[t_up])
    mean, var = out.images.mean().item(), out.images.var().item()
    # standard errors of a mean and a variance of n normal draws: sqrt(v / n), v sqrt(2 / n); 5 of them
    assert abs(mean - math.sqrt(ab) * 0.7) < 5 * math.sqrt((1 - ab) / n)
    assert abs(var - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)


def test_slerp_ends_exactly_and_keeps_the_norm_of_orthogonal_unit_vectors():
    a, b = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    w = torch.tensor([0.0, 0.3, 0.7, 1.0])
    out = slerp(a, b, w)
    assert torch.equal(out[0], a[0]) and torch.equal(out[3], b[3])
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(e1, e2, torch.tensor([0.25]))  # on the unit circle at a quarter of the right angle
    assert torch.allclose(mid, torch.tensor([[math.cos(math.pi / 8), math.sin(math.pi / 8)]]), atol=1e-6)


@pytest.mark.parametrize("method,palette", [("replace", None), ("replace", "sprite"), ("repaint", "sprite")])
def test_inpainting_keeps_every_kept_pixel_exactly(model, held_out, method, palette):
    images, labels = held_out
    source = images[:6]
    fill = torch.zeros(6, 1, 16, 16, dtype=torch.bool)
    fill[:, :, :8] = True  # the top half
    plan = SamplingSpec(DDIMSampler(6), palette=palette, seed=1).bind(model)
    out = generate(plan, torch.eye(6)[labels[:6]], edit=Inpaint(source, fill, method, jump_length=2, jump_n_sample=2))
    keep = ~fill.expand_as(source)
    assert torch.equal(out.pixels[keep], source[keep])  # after the output stage too
    assert torch.equal(out.images[keep], (source.float() / 127.5 - 1)[keep])
    assert (out.pixels[~keep] != source[~keep]).float().mean() > 0.5  # and the rest is redrawn


def test_repaint_costs_what_its_walk_says(model, held_out):
    images, labels = held_out
    calls = []
    plan = SamplingSpec(DDIMSampler(15), guidance=0.0, palette=None).bind(model)
    hook = plan.model.net.register_forward_hook(lambda *_: calls.append(1))  # the network the plan samples with
    try:
        edit = Inpaint(images[:1], torch.ones(1, 1, 16, 16, dtype=torch.bool).tril(), "repaint", 3, 4)
        generate(plan, torch.eye(6)[labels[:1]], edit=edit)
    finally:
        hook.remove()
    path = repaint_path(15, 3, 4)
    assert len(calls) == sum(q == p + 1 for p, q in zip(path, path[1:])) == 15 + 4 * 3 * 3


def test_sdedit_redoes_the_share_of_the_chain_strength_asks_for(model, held_out):
    images, labels = held_out
    source, contexts = images[:16], torch.eye(6)[labels[:16]]
    distance, calls = [], []
    plan = SamplingSpec(DDIMSampler(10), guidance=0.0, palette=None).bind(model)
    hook = plan.model.net.register_forward_hook(lambda *_: calls.append(1))
    for strength in (0.2, 0.6, 1.0):
        calls.clear()
        out = generate(plan, contexts, edit=Vary(source, strength))
        assert len(calls) == round(10 * strength)
        distance.append((out.pixels.float() - source.float()).abs().mean().item())
    hook.remove()
    # 16 sprites: at 0.2 the source's shapes survive, at 1.0 little does; each step of strength moves further away
    assert distance[0] < distance[1] < distance[2], distance


def test_interpolation_ends_are_the_two_samples_and_frames_change_smoothly(model, tmp_path):
    plan = SamplingSpec(DPMSolverPP2MSampler(8), seed=0).bind(model)
    frames = 9
    w = torch.linspace(0, 1, frames, dtype=torch.float64)
    ends = torch.eye(6)[[0, 5]]
    contexts = ((1 - w)[:, None] * ends[0] + w[:, None] * ends[1]).float()
    out = generate(plan, contexts, edit=Interpolate([(3, 0), (8, 0)], w))
    for seed, label, frame in ((3, 0, 0), (8, 5, frames - 1)):
        own = generate(SamplingSpec(DPMSolverPP2MSampler(8), seed=seed).bind(model), torch.eye(6)[[label]])
        assert torch.equal(own.pixels[0], out.pixels[frame])
    change = (out.pixels[1:].float() - out.pixels[:-1].float()).abs().mean((1, 2, 3))
    # smooth: no frame-to-frame change over 3x the mean change (a jump would carry most of the way in one frame)
    assert change.max() <= 3 * change.mean(), change.tolist()


def test_repaint_jumps_only_where_the_sampler_has_more_steps_than_a_jump(model, held_out):
    from difflab.errors import ConfigError

    images, labels = held_out
    fill = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()
    assert repaint_path(4, 3, 4) != list(range(5)) and repaint_path(3, 3, 4) == list(range(4))  # 4 steps jump, 3 do not
    auto = Inpaint(images[:1], fill, jump_length=3)
    assert auto.for_model(False, 4).method == "repaint" and auto.for_model(False, 3).method == "replace"
    with pytest.raises(ConfigError, match=r"takes 3: give it more steps \(steps=4 or more\)"):
        generate(SamplingSpec(DDIMSampler(3)).bind(model), torch.eye(6)[labels[:1]], edit=Inpaint(images[:1], fill, "repaint", 3, 4))
    assert Inpaint(images[:1], fill, "repaint", 3, 1).for_model(False, 3).method == "repaint"  # one pass: nothing to jump


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_heun_inpaints_keeping_every_kept_pixel_exactly(model, held_out, method):
    """Heun edits as every sampler does (its two network calls per step inside one step of the walk): the kept pixels
    are the source's exactly, before and after the output stage, and the rest is drawn; RePaint's jumps back up the
    grid (a fresh start of Heun's steps) are walked too."""
    images, labels = held_out
    source = images[:4]
    fill = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    fill[..., 4:12, 4:12] = True  # the middle
    plan = SamplingSpec(HeunSampler(4), palette="sprite", seed=2).bind(model)
    calls = []
    hook = plan.model.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(plan, torch.eye(6)[labels[:4]], edit=Inpaint(source, fill, method, jump_length=2, jump_n_sample=2))
    finally:
        hook.remove()
    keep = ~fill.expand_as(source)
    assert torch.equal(out.pixels[keep], source[keep]) and torch.equal(out.images[keep], to_unit_range(source)[keep])
    assert out.images.isfinite().all() and (out.pixels[~keep] != source[~keep]).float().mean() > 0.5
    path = repaint_path(4, 2, 2) if method == "repaint" else list(range(5))
    # Heun: two calls per step down, one for the last (to the clean image)
    assert len(calls) == sum(2 if q < 4 else 1 for p, q in zip(path, path[1:]) if q == p + 1)


def test_heun_varies_from_the_share_of_its_grid_strength_asks_for(model, held_out):
    images, labels = held_out
    plan = SamplingSpec(HeunSampler(5), palette=None).bind(model)
    for strength, steps in ((0.2, 1), (0.5, 2), (1.0, 5)):  # round(5 s), at least one
        out = generate(plan, torch.eye(6)[labels[:2]], record_every=1, edit=Vary(images[:2], strength))
        assert out.chain_t == [level.t for level in plan.levels[5 - steps:]] and out.images.isfinite().all()


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_edit_py_inpaints_a_4x_upscaled_png_and_writes_what_sample_py_writes(model, held_out, tmp_path):
    sprite = held_out[0][3].permute(1, 2, 0).numpy()
    png = _png(tmp_path / "hero.png", sprite.repeat(4, 0).repeat(4, 1))  # as pixel-art editors export
    result = run_script("edit.py", "edit=inpaint", f"image={png}", "mask=[4,0,12,8]", "label=hero", "n=3", "steps=4",
                        "sampler=ddim", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "out" / "samples.npz") as z:
        images, fill, source = z["images"], z["fill"], z["source"]
    assert images.shape == (3, 16, 16, 3) and np.array_equal(source, sprite) and fill.sum() == 8 * 8
    assert (images[:, ~fill] == sprite[~fill]).all()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["edit"] == "inpaint" and meta["label"] == "hero"
    # by default the shipped model tuned for inpainting, in one pass (it sees the kept pixels)
    assert meta["checkpoint"].endswith("sprites_inpaint.ckpt") and meta["method"] == "replace"
    assert Image.open(tmp_path / "out" / "grid.png").size == (5 * 64 + 6 * 4, 64 + 2 * 4)  # source, mask, 3 results


BAD = [
    (["edit=inpaint", "image=missing.png"], "image=missing.png: no such file"),
    (["edit=inpaint", "image={text}"], "not a readable image"),
    (["edit=inpaint", "image={odd}"], "is 20x20; this model draws 16x16"),
    (["edit=inpaint", "image={rgba}", "label=hero"], "transparent pixels"),
    (["edit=inpaint", "image=data:0", "mask={odd}"], "is 20x20; the image is 16x16"),
    (["edit=inpaint", "image=data:0", "mask=[3,3,3,8]"], "mask=[3, 3, 3, 8]: give a box"),
    (["edit=inpaint", "image=data:0", "mask={black}"], "selects no pixel: nothing to fill"),
    (["edit=inpaint", "image=data:0", "mask=[0,0,16,16]"], "selects every pixel: that is plain sampling"),
    (["edit=inpaint", "image={sprite}"], "label= is needed"),
    (["edit=inpaint", "image=data:99999"], "image=data:99999: give data:<i> with i in [0, 381]"),
    (["edit=inpaint", "image=data:0", "ckpt=pretrained", "edit.method=repaint", "steps=3"], "the sampler takes 3: give it more steps"),
    (["edit=vary", "image=data:0", "strength=0"], "strength=0 returns the source unchanged"),
    (["edit=vary", "image=data:0", "strength=1.5"], "strength=1.5: must be a finite number in [0, 1]"),
    (["edit=interpolate", "label=hero", "frames=1"], "frames=1: must be an integer >= 2"),
    (["edit=interpolate", "label=hero", "seeds=[2,2]"], "both ends are the same image"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_edit_input_is_one_line_exit_2_and_writes_nothing(held_out, tmp_path, capsys, monkeypatch, args, expected):
    files = {"text": tmp_path / "notes.png", "odd": _png(tmp_path / "odd.png", np.zeros((20, 20, 3), np.uint8)),
             "black": _png(tmp_path / "black.png", np.zeros((16, 16, 3), np.uint8)),
             "sprite": _png(tmp_path / "sprite.png", held_out[0][0].permute(1, 2, 0).numpy())}
    files["text"].write_text("not an image")
    rgba = np.concatenate([held_out[0][0].permute(1, 2, 0).numpy(), np.full((16, 16, 1), 255, np.uint8)], 2)
    rgba[0, 0, 3] = 0
    files["rgba"] = _png(tmp_path / "rgba.png", rgba)
    out = tmp_path / "out"
    check_one_line(*run_in_process("edit.py", [*(a.format(**files) for a in args), f"hydra.run.dir={out}"], capsys, monkeypatch), expected)
    assert not any(p.name in ("grid.png", "strip.png", "samples.npz", "meta.json") for p in out.rglob("*"))


def test_each_edit_sets_its_own_defaults_over_edit_yaml(tmp_path):
    from support import compose_cfg

    inpaint, vary, interpolate = (compose_cfg([f"edit={e}"], tmp_path, "edit") for e in ("inpaint", "vary", "interpolate"))
    assert (interpolate.frames, interpolate.gif) == (16, False)  # interpolation frames, not the chain GIF's 40
    assert (inpaint.frames, inpaint.gif, vary.frames) == (40, True, 40)
    assert (inpaint.ckpt, vary.ckpt, interpolate.ckpt) == ("pretrained_inpaint", "pretrained", "pretrained")
    assert compose_cfg(["edit=inpaint", "ckpt=pretrained"], tmp_path, "edit").ckpt == "pretrained"
