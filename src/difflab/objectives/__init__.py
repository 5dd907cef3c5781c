"""What the network learns and how its output becomes eps for the samplers (conf/objective/).

The network knows nothing of schedules. With x_t = a x_0 + s eps, a = sqrt(ab_t), s = sqrt(1 - ab_t), SNR_t = a^2 / s^2,
it predicts one of eps (Ho et al. 2020), x_0, or v = a eps - s x_0 (Salimans & Ho 2022), its loss weighted uniformly
or by min-SNR-gamma (Hang et al. 2023); or it is EDM's preconditioned denoiser (Karras et al. 2022), or a consistency
model tuned from one of those (Song et al. 2023; Geng et al. 2024). Every objective turns its network's output into eps,
so every sampler runs with every objective.
"""

from difflab.objectives.base import Objective
from difflab.objectives.consistency import Consistency
from difflab.objectives.edm import EDMPreconditioning
from difflab.objectives.prediction import EpsPrediction, Prediction, VPrediction, X0Prediction
from difflab.objectives.weighting import MinSNR, Uniform, Weighting

__all__ = ["Consistency", "EDMPreconditioning", "EpsPrediction", "MinSNR", "Objective", "Prediction", "Uniform", "VPrediction", "Weighting",
           "X0Prediction"]
