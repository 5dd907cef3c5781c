"""Prediction targets (eps, x0, v), their conversion to eps for the samplers, min-SNR-gamma weighting, EDM's preconditioning,
and the objective a model is sampled with."""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion import q_sample
from difflab.errors import ConfigError
from difflab.model import DiffusionModel
from difflab.objectives import EDMPreconditioning, EpsPrediction, MinSNR, Uniform, VPrediction, X0Prediction
from difflab.samplers import DDIMSampler, HeunSampler, UniPCSampler
from difflab.sampling import SamplingSpec, generate
from difflab.schedules import CosineSchedule, LinearSchedule, sigma_to_t, signal_noise_at, vp_sigmas

from support import compose_cfg

PREDICTIONS = {"eps": EpsPrediction, "x0": X0Prediction, "v": VPrediction}


def draws(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 4, 4, generator=g) * 2 - 1, torch.randn(b, 3, 4, 4, generator=g)


def test_signal_noise_at_is_the_schedule_at_integer_t_and_between_at_fractional_t() -> None:
    s = CosineSchedule(100)
    t = torch.tensor([0, 1, 50, 99])
    a, sig = signal_noise_at(s, t)
    torch.testing.assert_close(a, s.sqrt_alphas_cumprod[t].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sig, s.sqrt_one_minus_alphas_cumprod[t].double(), rtol=1e-6, atol=0)
    mid = signal_noise_at(s, torch.tensor([50.5]))[1]
    assert sig[2] < mid < signal_noise_at(s, torch.tensor([51]))[1]
    # sigma_to_t is its inverse: the trained steps exactly, fractional steps back, out-of-range sigmas clamped
    sigmas = vp_sigmas(s)
    torch.testing.assert_close(sigma_to_t(s, sigmas[t]), t.double(), rtol=0, atol=1e-9)
    frac = torch.tensor([0.25, 50.5, 98.75], dtype=torch.float64)
    a, sig = signal_noise_at(s, frac)
    torch.testing.assert_close(sigma_to_t(s, sig / a), frac, rtol=0, atol=1e-9)
    assert sigma_to_t(s, torch.tensor([1e-9, 1e9])).tolist() == [0.0, 99.0]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_and_their_eps_round_trip(prediction: str) -> None:
    s, obj = LinearSchedule(1000), PREDICTIONS[prediction]()
    x0, noise = draws()
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(s, x0, t, noise)
    a = s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sig = s.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = {"eps": noise, "x0": x0, "v": a * noise - sig * x0}[prediction]  # v = sqrt(ab) eps - sqrt(1 - ab) x_0
    target = obj.target(s, x0, t, noise)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    # a perfect network's output, converted, is the true noise: the samplers see eps whatever the network predicts;
    # x0 -> eps divides by sqrt(1 - ab), 0.01 at t = 0, which scales float32 rounding by 100
    torch.testing.assert_close(obj.to_eps(s, x_t, t, target), noise, rtol=1e-4, atol=1e-4)
    assert float(obj.loss(lambda x, t: target, s, x0, t, noise).max()) < 1e-12


def test_min_snr_weights_match_diffusers_compute_snr() -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    s = LinearSchedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)  # its float32 ab loses 1 - ab's digits at t = 0
    t = torch.tensor([0, 3, 100, 250, 500, 999])
    snr = compute_snr(ref, t).double()
    gamma = 5.0
    expected = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1), "x0": snr.clamp(max=gamma)}
    for prediction, w in expected.items():
        got = MinSNR(gamma)(PREDICTIONS[prediction](), s, t).double()
        torch.testing.assert_close(got, w, rtol=1e-5, atol=0)  # float32 in the last step of both
    assert torch.equal(Uniform()(VPrediction(), s, t), torch.ones(6))
    # eps with min-SNR: weight 1 where SNR <= 5 (high noise), gamma / SNR below: small t count less
    w = MinSNR()(EpsPrediction(), s, t)
    assert w[-1] == 1 and w[0] < 0.01


@pytest.mark.parametrize("objective", [*PREDICTIONS, "edm"])
def test_sampling_a_perfect_predictor_of_any_kind_lands_on_x0(objective: str) -> None:
    """A network that predicts (in its own parametrisation) the truth for one known x_0: DDIM (eta 0) and Heun
    both return that x_0, through the objective's conversion to eps."""
    s = LinearSchedule(200)
    obj = EDMPreconditioning() if objective == "edm" else PREDICTIONS[objective]()
    x0 = draws(1, 2)[0]

    class Oracle(torch.nn.Module):
        in_channels, image_size, num_classes = 3, 4, 0

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_in, t, context=None, keep=None):
            a, sig = (c.reshape(-1, 1, 1, 1).float() for c in signal_noise_at(s, t))
            if objective == "edm":  # the input is c_in x with x = x_t / a; F = (x_0 - c_skip x) / c_out
                c_skip, c_out, c_in = obj.coefs(sig / a)
                return (x0 - c_skip * x_in / c_in) / c_out
            eps = (x_in - a * x0) / sig
            return {"eps": eps, "x0": x0.expand_as(x_in), "v": a * eps - sig * x0}[objective]

    for sampler in (DDIMSampler(10, clip_x0=False), HeunSampler(8), UniPCSampler(6, clip_x0=False)):
        model = DiffusionModel(Oracle(), s, obj)
        out = generate(model, SamplingSpec(sampler, guidance=0, precision="32", palette=None), None, 2).images
        torch.testing.assert_close(out, x0, rtol=0, atol=2e-3)


def test_bad_objective_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="objective.weighting.gamma=0: must be a finite number >= 1e-06"):
        MinSNR(0)
    with pytest.raises(ConfigError, match="objective.sigma_data=-1: must be a finite number"):
        EDMPreconditioning(sigma_data=-1)


@pytest.mark.parametrize("objective,kind", [("v_min_snr", (VPrediction, MinSNR)), ("x0", (X0Prediction, Uniform)),
                                            ("edm", (EDMPreconditioning, type(None)))])
def test_training_saves_the_objective_and_samples_from_it(tmp_path, objective, kind) -> None:
    from difflab.model import load_model
    from difflab.sample import sample
    from difflab.train import train

    cfg = compose_cfg(["model=unet_tiny", "debug=fast", f"objective={objective}", "timesteps=50", "~callbacks.sample_grid",
                       "~callbacks.progress_bar", "trainer.enable_progress_bar=false"], tmp_path / "run")
    train(cfg)
    obj = load_model(tmp_path / "run").objective
    assert (type(obj), type(getattr(obj, "weighting", None))) == kind
    files = sample(compose_cfg([f"ckpt={tmp_path / 'run'}", "n=2", "steps=3", "gif=false", "device=cpu"], tmp_path / "s", "sample"))
    assert files["grid"].is_file()


def test_edm_preconditioning_round_trips_and_its_noise_levels_are_log_normal() -> None:
    s, obj = LinearSchedule(1000), EDMPreconditioning()
    x0, noise = draws(2)
    torch.manual_seed(0)
    t = obj.sample_t(s, 20000, "cpu")
    a, sig = signal_noise_at(s, t)
    log_sigma = (sig / a).log()
    # ln sigma ~ N(-1.2, 1.2^2), clipped to the schedule's [sigma_0, sigma_{T-1}] = [0.01, 157]: mean and std hold
    assert abs(float(log_sigma.mean()) + 1.2) < 0.05 and abs(float(log_sigma.std()) - 1.2) < 0.05
    t4 = t[:4]
    a4, sig4 = (c.reshape(-1, 1, 1, 1).float() for c in signal_noise_at(s, t4))
    sigma = sig4 / a4
    c_skip, c_out, c_in = obj.coefs(sigma)
    # Karras et al. Table 1 at sigma_data = 0.5: c_in = 1 / sqrt(sigma^2 + sd^2), c_skip = sd^2 / (sigma^2 + sd^2)
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones_like(sigma))
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    x = x0 + sigma * noise
    perfect = (x0 - c_skip * x) / c_out  # the F that makes D(x; sigma) = x_0
    assert float(obj.loss(lambda inp, t: perfect, s, x0, t4, noise).max()) < 1e-10
    # the samplers' view: x_t = sqrt(ab) x_0 + sqrt(1 - ab) n, and the converted output is n
    eps = obj.eps_denoiser(lambda inp, t: perfect, s)(a4 * x0 + sig4 * noise, t4)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)


def test_checkpoints_of_earlier_versions_keep_their_objective() -> None:
    """Configs saved before the objectives were classes name one class with string switches; loading maps them."""
    from difflab.checkpoint import PRETRAINED, load_checkpoint, upgraded

    def objective(node):
        return upgraded({"objective": node} if node else {})["objective"]

    assert objective({"_target_": "difflab.objectives.Objective", "prediction": "v", "weighting": "min_snr", "snr_gamma": 3.0}) == {
        "_target_": "difflab.objectives.VPrediction", "weighting": {"_target_": "difflab.objectives.MinSNR", "gamma": 3.0}}
    assert objective({"_target_": "difflab.objectives.Objective", "prediction": "x0", "weighting": "uniform", "snr_gamma": 5.0}) == {
        "_target_": "difflab.objectives.X0Prediction", "weighting": {"_target_": "difflab.objectives.Uniform"}}
    assert objective(None)["_target_"] == "difflab.objectives.EpsPrediction"  # from before objectives were saved
    assert objective({"_target_": "difflab.objectives.EDM", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}) == {
        "_target_": "difflab.objectives.EDMPreconditioning", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}
    current = {"_target_": "difflab.objectives.EpsPrediction", "weighting": {"_target_": "difflab.objectives.Uniform"}}
    assert objective(current) == current
    # the shipped model was saved with the old form: it loads as v-prediction with min-SNR-5
    saved = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["difflab_config"]["objective"]
    assert saved["_target_"] == "difflab.objectives.Objective" and saved["prediction"] == "v"
    assert load_checkpoint(PRETRAINED)["difflab_config"]["objective"]["_target_"] == "difflab.objectives.VPrediction"


def test_a_network_is_sampled_only_with_its_own_objective() -> None:
    """The samplers get eps only from a DiffusionModel, converted by the objective the model carries: a bare network is
    refused, and a v-predicting network's denoiser returns eps = s x_t + a v, not v."""
    from difflab.nn.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=4, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=0,
               norm_groups=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output conv would make v = eps = 0
    s = LinearSchedule(100)
    spec = SamplingSpec(DDIMSampler(4), guidance=0, precision="32", palette=None)
    with pytest.raises(TypeError, match="generate samples a DiffusionModel"):
        generate(net, spec, None, 2)
    x_t, t = draws(1)[0], torch.tensor([5, 30, 60, 99])
    a, sig = (c.reshape(-1, 1, 1, 1).float() for c in signal_noise_at(s, t))
    with torch.no_grad():
        v = net(x_t, t)
        eps = DiffusionModel(net, s, VPrediction()).denoiser()(x_t, t)
    torch.testing.assert_close(eps, sig * x_t + a * v)
    assert (eps - v).abs().max() > 0.1
    as_v, as_eps = (generate(DiffusionModel(net, s, obj), spec, None, 2).images for obj in (VPrediction(), EpsPrediction()))
    assert (as_v - as_eps).abs().max() > 0.1  # the objective decides the samples
