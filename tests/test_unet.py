"""The denoising UNet: shapes, conditioning, the null context, errors, parameter count, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.nn.blocks import SelfAttention
from difflab.nn.embeddings import sinusoidal_embedding
from difflab.nn.unet import UNet

from support import reorder_tol

K = 6  # classes of the conditional models
HERO, FOOD = 0, 2  # two context slots


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_classes: int = 0, image_size: int = 16, **kw) -> UNet:
    cfg = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, norm_groups=8)
    cfg.update(kw)
    return UNet(image_size=image_size, num_classes=num_classes, **cfg)


@torch.no_grad()
def randomize_zero_inits(model: nn.Module, seed: int = 0) -> nn.Module:
    """The output conv, the residual convs, the attention projections and the null embedding start at
    zero, which makes a fresh model output zeros whatever the input; give them small random values."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(b: int = 2, size: int = 16, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, c, size, size), generator=g), torch.randint(0, 1000, (b,), generator=g)


def one_hot(rows: list[int]) -> torch.Tensor:
    return torch.eye(K)[rows]


SHAPE_CASES = [
    # num_classes, image_size, channel_mult, num_res_blocks, attn_resolutions, attn_head_dim
    (0, 16, (1, 2), 1, (8,), None),
    (K, 16, (1, 2, 2), 2, (8, 4), 8),
    (0, 32, (1, 2, 2, 2), 1, (16,), None),
    (K, 32, (1, 1, 2), 1, (), 4),
    (K, 16, (1,), 2, (16,), None),
]


@pytest.mark.parametrize("num_classes,size,mult,nrb,attn,head_dim", SHAPE_CASES)
def test_output_shape_equals_input_shape(num_classes, size, mult, nrb, attn, head_dim) -> None:
    model = randomize_zero_inits(
        tiny(num_classes, size, channel_mult=mult, num_res_blocks=nrb, attn_resolutions=attn, attn_head_dim=head_dim)
    ).eval()
    n_attn = sum(isinstance(m, SelfAttention) for m in model.modules())
    # one per res block at each attention resolution (num_res_blocks down + num_res_blocks+1 up) + the middle one
    levels_with_attn = sum(size // 2**i in attn for i in range(len(mult)))
    assert n_attn == 1 + levels_with_attn * (2 * nrb + 1)
    x, t = inputs(3, size)
    with torch.no_grad():
        out = model(x, t, one_hot([0, 3, 5]) if num_classes else None)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_fresh_model_outputs_zero() -> None:
    # the zero-initialised output conv (residual blocks start as the identity)
    model = tiny().eval()
    x, t = inputs()
    assert torch.equal(model(x, t), torch.zeros_like(x))


def test_scalar_t_equals_batched_t() -> None:
    model = randomize_zero_inits(tiny()).eval()
    x, _ = inputs()
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7]))
        assert torch.equal(model(x, torch.tensor(7)), ref)
        assert torch.equal(model(x, 7), ref)
        assert not torch.allclose(model(x, torch.tensor([7, 300])), ref)  # t matters


def test_rows_are_independent() -> None:
    # each row gets its own t and context: the batched call equals row-by-row calls
    model = randomize_zero_inits(tiny(K)).eval()
    x, _ = inputs(3)
    t = torch.tensor([3, 400, 999])
    ctx = one_hot([5, 0, 2])
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        out = model(x, t, ctx, keep)
        for i in range(3):
            alone = model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1], keep[i : i + 1])
            assert (out[i : i + 1] - alone).abs().max() <= reorder_tol(alone, layers=8, width=9 * 32)


def test_mixed_context() -> None:
    model = randomize_zero_inits(tiny(K)).eval()
    x, t = inputs()
    mixed = torch.zeros(2, K)
    mixed[:, FOOD], mixed[:, HERO] = 0.6, 1.0
    with torch.no_grad():
        out = model(x, t, mixed)
        hero = model(x, t, one_hot([HERO, HERO]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, hero)  # the food component changes the prediction


def test_dropped_context_rows_equal_null_context() -> None:
    model = randomize_zero_inits(tiny(K)).eval()
    x, t = inputs(3)
    ctx = one_hot([1, 4, 5])
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        out = model(x, t, ctx, keep)
        cond = model(x, t, ctx)
        uncond = model(x, t, None)
    # same batch, same x and t: the dropped row is bit-identical to the unconditional call
    assert torch.equal(out[1], uncond[1])
    assert torch.equal(out[[0, 2]], cond[[0, 2]])
    assert not torch.allclose(cond[1], uncond[1], atol=1e-4)  # the null embedding differs from the context
    # all rows dropped: exactly the unconditional model
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, torch.zeros(3, dtype=torch.bool)), uncond)


def test_unconditional_model_rejects_context() -> None:
    model = tiny(0)
    x, t = inputs()
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, one_hot([0, 1]))


def test_wrong_input_shapes_raise() -> None:
    model = tiny(K)
    x, t = inputs(c=1)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\).*got \(2, 1, 16, 16\)"):
        model(x, t)
    with pytest.raises(ValueError, match=r"divisible by 2"):
        model(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError, match=r"context has 4 entries.*6 classes"):
        model(inputs()[0], t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"image_size 20 must be divisible by 2\^\(levels-1\) = 8"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2), base_channels=16, norm_groups=8)


def test_cifar_preset_parameter_count_matches_diffusers() -> None:
    """Ho et al.'s CIFAR-10 network: 35.7M parameters, the same as diffusers' UNet2DModel layout."""
    from diffusers import UNet2DModel

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ours = UNet(
            image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
        )
        ref = UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert n_ours == 35_746_307


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = randomize_zero_inits(tiny(K, attn_head_dim=8)).train()
    x, t = inputs(4)
    ctx = one_hot([0, 1, 2, 3])
    keep = torch.tensor([True, False, True, False])  # context dropout: two rows use the null embedding
    model(x, t, ctx, keep).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_null_embedding_gets_gradient_only_from_dropped_rows() -> None:
    model = randomize_zero_inits(tiny(K)).train()
    x, t = inputs()
    model(x, t, one_hot([0, 1]), torch.tensor([True, True])).square().mean().backward()
    assert model.context_embed.null.grad is not None and not model.context_embed.null.grad.any()
    assert model.context_embed.mlp[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    model(x, t, one_hot([0, 1]), torch.tensor([False, False])).square().mean().backward()
    assert model.context_embed.null.grad.abs().sum() > 0
    assert not model.context_embed.mlp[0].weight.grad.any()


def test_fresh_model_gradient_graph_is_connected() -> None:
    # with the zero inits only the output conv gets a non-zero gradient at step 0, but every parameter is in the graph
    model = tiny(K).train()
    x, t = inputs(2)
    (model(x, t, one_hot([0, 1]), torch.tensor([True, False])) - 1).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.conv_out.weight.grad.abs().sum() > 0


# ---- attention and embeddings ----


def reference_attention(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, with the q, k, v channel blocks of the qkv conv split by head."""
    b, c, h, w = x.shape
    qkv = attn.qkv(attn.norm(x)).reshape(b, 3 * c, h * w)
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    d = c // attn.heads
    heads = []
    for i in range(attn.heads):
        qi, ki, vi = (z[:, i * d : (i + 1) * d] for z in (q, k, v))  # (b, d, hw)
        weights = torch.softmax(qi.transpose(1, 2) @ ki / math.sqrt(d), dim=-1)  # (b, hw, hw)
        heads.append(vi @ weights.transpose(1, 2))  # (b, d, hw)
    return x + attn.proj(torch.cat(heads, 1).reshape(b, c, h, w))


@pytest.mark.parametrize("head_dim,heads", [(None, 1), (8, 2), (4, 4)])
def test_self_attention_matches_reference(head_dim, heads) -> None:
    attn = randomize_zero_inits(SelfAttention(16, 8, head_dim))
    assert attn.heads == heads
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = attn(x), reference_attention(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - x).abs().max() > 1e-2  # the attention branch contributes


def test_self_attention_bf16_autocast_on_cpu() -> None:
    attn = randomize_zero_inits(SelfAttention(16, 8, 8))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
            out_bf16 = attn(x.bfloat16())
    assert out.dtype == torch.float32
    assert out_bf16.dtype == torch.bfloat16
    branch = (ref - x).abs().max()
    assert branch > 1e-2
    # bf16 keeps 8 bits of mantissa (relative error 2^-8 ~ 4e-3 per rounding): a few % of the branch
    assert (out - ref).abs().max() <= 0.05 * branch
    assert (out_bf16.float() - ref).abs().max() <= 0.05 * branch + 2 * x.abs().max() * 2**-8


def test_cpu_autocast_attention_runs_in_float32(monkeypatch) -> None:
    # documented: on CPU the attention product itself stays float32 under bf16 autocast
    import difflab.nn.blocks as blocks

    seen = []
    sdpa = blocks.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", spy)
    attn = randomize_zero_inits(SelfAttention(16, 8))
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
    assert seen == [(torch.float32, False)]


def test_sinusoidal_embedding_closed_form() -> None:
    t = torch.tensor([0, 1, 7, 999])
    dim = 8  # w_i = 10000^(-i/4), i = 0..3
    emb = sinusoidal_embedding(t, dim)
    expected = [
        [math.sin(tt * 10000 ** (-i / 4)) for i in range(4)] + [math.cos(tt * 10000 ** (-i / 4)) for i in range(4)]
        for tt in t.tolist()
    ]
    torch.testing.assert_close(emb.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)
    odd = sinusoidal_embedding(t, 9)
    assert odd.shape == (4, 9) and bool((odd[:, -1] == 0).all())


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_equals_diffusers_resnetblock2d(scale_shift: bool) -> None:
    """Our ResBlock, added embedding or AdaGN (GN(h) (1 + s) + b), is diffusers' ResnetBlock2D with
    time_embedding_norm default / scale_shift, given the same weights."""
    from diffusers.models.resnet import ResnetBlock2D

    from difflab.nn.blocks import ResBlock

    torch.manual_seed(0)
    ours = ResBlock(16, 32, 64, dropout=0.0, groups=8, scale_shift=scale_shift).eval()
    ref = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=64, groups=8, dropout=0.0, eps=1e-5,
                        time_embedding_norm="scale_shift" if scale_shift else "default").eval()
    with torch.no_grad():
        for p in ours.conv2.parameters():
            p.normal_(0, 0.05)  # zero-initialised: give it weights, or both outputs are the skip alone
        names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                 "skip": "conv_shortcut"}
        for mine, theirs in names.items():
            getattr(ref, theirs).load_state_dict(getattr(ours, mine).state_dict())
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, emb), ref(x, emb), rtol=1e-5, atol=1e-5)


def test_scale_shift_unet_has_twice_the_embedding_projections() -> None:
    plain = UNet(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=6, norm_groups=8)
    ada = UNet(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=6, norm_groups=8, scale_shift=True)
    extra = sum(p.numel() for p in ada.parameters()) - sum(p.numel() for p in plain.parameters())
    blocks = [m for m in ada.modules() if type(m).__name__ == "ResBlock"]
    assert extra == sum(m.emb_proj.out_features // 2 * (m.emb_proj.in_features + 1) for m in blocks)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([1, 500]), torch.eye(6)[:2]
    assert ada(x, t, c).shape == (2, 3, 16, 16)
