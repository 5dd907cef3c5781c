"""Samplers as step rules over a grid of noise levels (conf/sampler/), all run by the one loop in base.py (walk)."""

from difflab.samplers.base import SampleOutput, Sampler, walk
from difflab.samplers.consistency import ConsistencySampler
from difflab.samplers.ddim import DDIMSampler
from difflab.samplers.ddpm import DDPMSampler
from difflab.samplers.dpmpp import DPMSolverPP2MSampler
from difflab.samplers.euler import EulerSampler
from difflab.samplers.grids import spaced_timesteps
from difflab.samplers.heun import HeunSampler
from difflab.samplers.unipc import UniPCSampler

__all__ = ["ConsistencySampler", "DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "EulerSampler", "HeunSampler", "SampleOutput",
           "Sampler", "UniPCSampler", "spaced_timesteps", "walk"]
