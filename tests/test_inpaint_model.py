"""A model tuned for inpainting: its training masks, the known pixels it sees beside x_t, the UNet's extra inputs (a
plain model widened with zero weights is the plain model), guidance with them, tuning one from a trained model (it
resumes exactly), and edit.py / sample.py with it and with the shipped one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab.checkpoint import with_cond_inputs
from difflab.editing import Inpaint
from difflab.errors import ConfigError
from difflab.guidance import guided_output
from difflab.masks import REGIONS, TRAINING_MIX, known_pixels, nothing_known, region, training_masks
from difflab.model import DiffusionModel, load_model
from difflab.objectives import VPrediction
from difflab.samplers import DDIMSampler
from difflab.sampling import SamplingSpec, generate
from difflab.schedules import LinearSchedule
from test_sample import QUIET, trained  # noqa: F401  (the fixture)
from test_unet import randomize_zero_inits, tiny

from support import reorder_tol, run_script, straight_and_cut

K = 6


def kinds(fill: torch.Tensor) -> list[str]:
    """Each mask's kind, read off its pixels."""
    named = {r: region(r, fill.shape[-1]) for r in REGIONS}
    out = []
    for m in fill[:, 0]:
        if m.all():
            out.append("all")
        elif any(torch.equal(m, named[r]) for r in REGIONS[:4]):
            out.append("halves")
        elif torch.equal(m, named["center"]):
            out.append("center")
        else:
            out.append("boxes")
    return out


def test_training_masks_follow_the_mix_and_boxes_are_at_least_3_pixels():
    n = 20000
    fill = training_masks(n, 16, torch.Generator().manual_seed(0))
    assert fill.shape == (n, 1, 16, 16) and fill.dtype == torch.bool
    assert torch.equal(fill, training_masks(n, 16, torch.Generator().manual_seed(0)))  # reproducible from the generator
    found = kinds(fill)
    for kind, share in TRAINING_MIX.items():
        # binomial standard error at n = 20000 is at most 0.0035: 5 of them, and 0.01 for the few box unions that equal
        # a half, the centre or everything (3 boxes of random size and place)
        assert abs(found.count(kind) / n - share) < 5 * (share * (1 - share) / n) ** 0.5 + 0.01, (kind, found.count(kind) / n)
    boxes = fill[torch.tensor([k == "boxes" for k in found])][:, 0]
    rows, cols = boxes.any(2), boxes.any(1)
    assert bool(boxes.flatten(1).any(1).all())  # never empty
    assert int(rows.sum(1).min()) >= 3 and int(cols.sum(1).min()) >= 3  # the union spans a 3-pixel box at least


def test_known_pixels_are_the_kept_pixels_and_the_mask():
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    fill = training_masks(4, 16, torch.Generator().manual_seed(1))
    known = known_pixels(x0, fill)
    f3 = fill.expand_as(x0)
    assert known.shape == (4, 4, 16, 16)
    assert torch.equal(known[:, :3][~f3], x0[~f3]) and bool((known[:, :3][f3] == 0).all())
    assert torch.equal(known[:, 3:], torch.where(fill, 1.0, -1.0))
    assert torch.equal(nothing_known(x0[:2]), torch.cat([torch.zeros(2, 3, 16, 16), torch.ones(2, 1, 16, 16)], 1))


@pytest.mark.usefixtures("one_thread")
def test_a_plain_model_widened_with_zero_weights_is_the_plain_model():
    torch.manual_seed(0)
    plain = randomize_zero_inits(tiny(K)).eval()
    wide = tiny(K, cond_channels=4).eval()
    wide.load_state_dict(with_cond_inputs(wide, plain.state_dict()))
    x, t, ctx = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 900]), torch.eye(K)[:3]
    cond = known_pixels(torch.rand(3, 3, 16, 16) * 2 - 1, training_masks(3, 16, torch.Generator().manual_seed(2)))
    with torch.no_grad():
        ref = plain(x, t, ctx)
        # the same sums with zero terms added (the input convolution's fan-in grows from 27 to 63)
        assert torch.allclose(wide(x, t, ctx, cond=cond), ref, rtol=0, atol=reorder_tol(ref, layers=40, width=1152))
        with torch.no_grad():
            wide.conv_in.weight[:, 3:].normal_(0, 0.1)
        assert not torch.allclose(wide(x, t, ctx, cond=cond), ref, atol=1e-3)  # once trained, the known pixels matter
    with pytest.raises(ValueError, match="cond"):
        wide(x, t, ctx)
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(x, t, ctx, cond=cond)


class Spy(torch.nn.Module):
    """out = x * (1 + t/1000) + sum(context) + mean(cond): each input moves the output; it records what it got."""

    cond_channels, in_channels, image_size, num_classes = 4, 3, 16, K

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, context=None, context_keep=None, cond=None):
        self.seen.append(cond)
        ctx = context * (context_keep[:, None] if context_keep is not None else 1)
        return self.w * x * (1 + t.view(-1, 1, 1, 1) / 1000) + ctx.sum(1).view(-1, 1, 1, 1) + cond.mean(1, keepdim=True)


def test_guidance_gives_both_branches_the_same_known_pixels():
    net = Spy()
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([10, 10]), torch.eye(K)[[0, 3]]
    cond = torch.randn(2, 4, 16, 16)
    got = guided_output(net, ctx, 2.0, cond=cond)(x, t)
    assert torch.equal(net.seen[-1], torch.cat([cond, cond]))
    out_c = net(x, t, ctx, None, cond)
    out_u = net(x, t, ctx, torch.zeros(2, dtype=torch.bool), cond)
    assert torch.allclose(got, out_c + 2.0 * (out_c - out_u))


def test_an_inpainting_model_sees_nothing_known_when_sampled_and_the_known_pixels_when_inpainting():
    net = Spy()
    model = DiffusionModel(net, LinearSchedule(100), VPrediction(), ["c"] * K)
    assert model.inpainting
    spec = SamplingSpec(DDIMSampler(3), guidance=0.0, palette=None, precision="32")  # float32: the network itself runs
    generate(spec.bind(model), torch.eye(K)[:2])
    assert all(torch.equal(c, nothing_known(torch.zeros(2, 3, 16, 16))) for c in net.seen) and len(net.seen) == 3
    net.seen.clear()
    source = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    fill = torch.stack([region("top", 16), region("left", 16)])[:, None]
    edit = Inpaint(source, fill)  # method auto: one pass for a model that sees the known pixels
    assert edit.for_model(True, 15).method == "replace" and edit.for_model(False, 15).method == "repaint"
    out = generate(spec.bind(model), torch.eye(K)[:2], edit=edit)
    assert len(net.seen) == 3 and all(torch.equal(c, known_pixels(source.float() / 127.5 - 1, fill)) for c in net.seen)
    assert torch.equal(out.pixels[~fill.expand_as(source)], source[~fill.expand_as(source)])


def test_a_plain_model_refuses_known_pixels():
    model = load_model("pretrained")
    with pytest.raises(ConfigError, match="not tuned for inpainting"):
        model.denoiser(torch.eye(K)[:1], known=nothing_known(torch.zeros(1, 3, 16, 16)))


def test_inpaint_tuning_starts_from_the_trained_model_resumes_exactly_and_edits(trained, tmp_path):  # noqa: F811
    """experiment=sprites_inpaint from a trained model: a run cut after its first epoch resumes bit for bit; sample.py
    samples the result from scratch and edit.py inpaints with it in one pass (method auto)."""
    from difflab.checkpoint import load_checkpoint, net_state_dict

    common = ["experiment=sprites_inpaint", f"init_from={trained}", "model=unet_tiny", "model.dropout=0.1", "timesteps=100",
              "data.limit=48", "data.batch_size=8", "trainer.max_epochs=2", "trainer.max_time=null", "trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "trainer.precision=32", *QUIET]
    a, b = straight_and_cut(common, tmp_path)
    assert a["global_step"] == b["global_step"] == 12
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    start = net_state_dict(load_checkpoint(trained / "checkpoints" / "last.ckpt"), ema=True)["conv_in.weight"]
    tuned = net_state_dict(a, ema=True)["conv_in.weight"]
    assert tuned.shape[1] == start.shape[1] + 4 and tuned[:, 3:].abs().max() > 0  # 4 new input channels, trained
    run = run_script("sample.py", f"ckpt={tmp_path / 'straight'}", f"hydra.run.dir={tmp_path / 's'}", "label=all", "n=1", "gif=false")
    assert run.returncode == 0, run.stderr[-3000:]
    run = run_script("edit.py", f"ckpt={tmp_path / 'straight'}", f"hydra.run.dir={tmp_path / 'e'}", "image=data:3", "mask=left",
                     "n=2", "gif=false")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["method"] == "replace"


def test_the_shipped_inpainting_model_keeps_the_kept_pixels_and_redraws_the_rest(tmp_path):
    from difflab.checkpoint import PRETRAINED_INPAINT

    assert PRETRAINED_INPAINT.stat().st_size < 10e6  # EMA weights in float16 only
    run = run_script("edit.py", "ckpt=pretrained_inpaint", f"hydra.run.dir={tmp_path}", "image=data:4", "mask=top", "n=8", "gif=false")
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(tmp_path / "samples.npz") as z:
        images, source, fill = z["images"], z["source"], z["fill"]
    assert (images[:, ~fill] == source[~fill]).all()
    assert (images[:, fill] != source[fill]).mean() > 0.3
