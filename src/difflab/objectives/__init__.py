"""Parameterizations of one denoiser (conf/objective/): how a network's output becomes x_0 and eps given
x_t = alpha x_0 + sigma eps, what it is trained to output, how the loss weights the noise levels and where training
draws them. eps (Ho et al. 2020), x_0, v (Salimans & Ho 2022), each with uniform or min-SNR-gamma weighting (Hang et al.
2023); EDM's preconditioned denoiser (Karras et al. 2022); flow matching's velocity (Lipman et al. 2023, Liu et al.
2023); a consistency model tuned from any of those (Song et al. 2023; Geng et al. 2024). Every sampler reads every
objective's Denoised, on every schedule.
"""

from difflab.objectives.base import Objective
from difflab.objectives.consistency import Consistency
from difflab.objectives.edm import EDMPreconditioning
from difflab.objectives.flow import FlowMatching
from difflab.objectives.prediction import EpsPrediction, VPrediction, X0Prediction
from difflab.objectives.times import LogitNormal, LogNormal, TimeDistribution, UniformTime
from difflab.objectives.weighting import MinSNR, Uniform, Weighting

__all__ = ["Consistency", "EDMPreconditioning", "EpsPrediction", "FlowMatching", "LogNormal", "LogitNormal", "MinSNR", "Objective",
           "TimeDistribution", "Uniform", "UniformTime", "VPrediction", "Weighting", "X0Prediction"]
