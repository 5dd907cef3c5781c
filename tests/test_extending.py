"""Adding an objective or a sampler is one module and one YAML (docs/extending.md), and then it works everywhere: every
sampler and objective class has its conf entry, and every objective samples with every sampler on every schedule.

The matrix runs a small random network (no training): what it checks is that each combination runs the one loop to
finite images of the right shape, and that it is deterministic where the sampler is (the objectives' conversions are
checked against perfect predictors in test_objectives.py, the samplers against diffusers and closed forms in
test_samplers.py). Editing and export for every sampler: test_matrix.py."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import pytest
import torch
import yaml
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import difflab.objectives as objectives
import difflab.samplers as samplers
from difflab.config import PROJECT_ROOT
from difflab.model import DiffusionModel
from difflab.nn.unet import UNet
from difflab.sampling import SamplingSpec, generate

CONF = PROJECT_ROOT / "conf"


def targets(group: str) -> dict[str, str]:
    """{option: its _target_} of a conf group (options that only compose others, as sampler/auto, have none)."""
    out = {}
    for path in sorted((CONF / group).glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        node = node.get(group.split("/")[-1], node) if "_target_" not in node else node  # a @package _global_ option
        if "_target_" in node:
            out[path.stem] = node["_target_"]
    return out


def classes(package, base: type) -> set[type]:
    """Every concrete subclass of ``base`` defined in a module of ``package`` (exported or not)."""
    found = set()
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        found |= {c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, base) and c is not base
                  and c.__module__ == module.__name__ and not inspect.isabstract(c)}
    return found


def conf_classes(group: str) -> set[type]:
    return {get_class(t) for t in targets(group).values()}


def test_every_sampler_class_has_a_conf_entry_named_by_it():
    conf = targets("sampler")
    missing = classes(samplers, samplers.Sampler) - conf_classes("sampler")
    assert not missing, f"sampler classes without a conf/sampler/ file: {missing}"
    for option, target in conf.items():  # the file is named by the sampler's own name (what records and reports show)
        assert get_class(target).name == option


def test_every_objective_and_time_distribution_class_has_a_conf_entry():
    missing = classes(objectives, objectives.Objective) - conf_classes("objective")
    assert not missing, f"objective classes without a conf/objective/ file: {missing}"
    missing = classes(objectives, objectives.TimeDistribution) - conf_classes("objective/time")
    assert not missing, f"time distributions without a conf/objective/time/ file: {missing}"


def test_every_schedule_class_has_a_conf_entry():
    import difflab.schedules as schedules

    found = {c for c in vars(schedules).values() if inspect.isclass(c) and issubclass(c, schedules.NoiseSchedule)
             and c not in (schedules.NoiseSchedule, schedules.VPSchedule)}
    assert found == conf_classes("schedule")


SCHEDULES = {"linear": dict(timesteps=10), "cosine": dict(timesteps=10), "flow": {}, "edm": {}}
OBJECTIVES = [o for o in targets("objective") if o != "consistency"]
DIFFUSION_SAMPLERS = [s for s in targets("sampler") if s != "consistency"]


def build(name: str, **kwargs):
    path = CONF / "schedule" / f"{name}.yaml"
    node = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "timesteps"}
    return instantiate({**node, **kwargs})


@functools.cache
def objective_node(name: str) -> dict:
    from support import compose_cfg

    return OmegaConf.to_container(compose_cfg([f"objective={name}"], "/tmp").objective)


def objective(name: str):
    return instantiate(objective_node(name))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = UNet(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
               num_classes=3, norm_groups=4).eval()
    with torch.no_grad():  # the zero-initialised output conv would make every prediction 0
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def sample(net, schedule, obj, sampler: str, steps: int = 3, seed: int = 0):
    spec = SamplingSpec(instantiate({**yaml.safe_load((CONF / "sampler" / f"{sampler}.yaml").read_text()),
                                     **({"steps": steps} if sampler not in ("ddpm",) else {})}),
                        guidance=obj.distilled_guidance or 1.0, precision="32", palette=None, seed=seed)
    return generate(spec.bind(DiffusionModel(net, schedule, obj)), torch.eye(3)[[0, 2]]).images


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("obj", OBJECTIVES)
def test_every_objective_samples_with_every_sampler_on_every_schedule(net, schedule, obj):
    # eps-prediction cannot read pure noise (alpha = 0, rectified flow's t = 1): it refuses it (below), so it samples
    # rectified flow from t = 0.999
    s, o = build(schedule, **SCHEDULES[schedule], **({"t_max": 0.999} if (schedule, obj) == ("flow", "eps") else {})), objective(obj)
    for sampler in DIFFUSION_SAMPLERS:
        if sampler == "ddpm" and s.timesteps is None:
            s_ddpm = instantiate({"_target_": "difflab.samplers.DDPMSampler", "steps": 10})
            spec = SamplingSpec(s_ddpm, guidance=1.0, precision="32", palette=None)
            images = generate(spec.bind(DiffusionModel(net, s, o)), torch.eye(3)[[0, 2]]).images
        else:
            images = sample(net, s, o, sampler)
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all(), (sampler, images.abs().max())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("teacher", OBJECTIVES)
def test_a_consistency_model_of_every_objective_samples_on_every_schedule(net, schedule, teacher):
    s = build(schedule, **SCHEDULES[schedule], **({"t_max": 0.999} if (schedule, teacher) == ("flow", "eps") else {}))
    obj = objectives.Consistency(objective(teacher), guidance=2.0)
    images = sample(net, s, obj, "consistency", steps=2)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert not torch.equal(images, sample(net, s, obj, "consistency", steps=2, seed=1))  # it re-noises: the seed matters


def test_eps_prediction_refuses_pure_noise_with_the_fix(net):
    from difflab.errors import ConfigError

    with pytest.raises(ConfigError, match="objective=eps cannot recover x_0 where alpha = 0.*schedule.t_max=0.999"):
        DiffusionModel(net, build("flow"), objective("eps"))


def test_docs_extending_names_the_files_it_says_to_add():
    text = (PROJECT_ROOT / "docs" / "extending.md").read_text()
    for path in ("src/difflab/samplers/", "conf/sampler/", "src/difflab/objectives/", "conf/objective/"):
        assert path in text
    for rel in sorted({p for p in __import__("re").findall(r"`((?:src|conf|tests)/[\w/.]+)`", text)}):
        assert (PROJECT_ROOT / rel).exists() or rel.endswith("/") or "<" in rel, rel
