from difflab.samplers.base import SampleOutput, Sampler, spaced_timesteps
from difflab.samplers.consistency import ConsistencySampler
from difflab.samplers.ddim import DDIMSampler
from difflab.samplers.ddpm import DDPMSampler
from difflab.samplers.dpmpp import DPMSolverPP2MSampler
from difflab.samplers.heun import HeunSampler
from difflab.samplers.unipc import UniPCSampler

__all__ = ["ConsistencySampler", "DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "HeunSampler", "SampleOutput", "Sampler", "UniPCSampler", "spaced_timesteps"]
