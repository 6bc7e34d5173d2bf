"""Fine-tuning SVD: the EDM v-objective (``loss``), the settings (``config``), the jitted train step (``step``)."""

from .config import TrainConfig, TrainConfigError
from .loss import denoising_loss, edm_preconditioning
from .step import TrainState, TrainStep, make_optimizer

__all__ = ["TrainConfig", "TrainConfigError", "TrainState", "TrainStep", "denoising_loss", "edm_preconditioning",
           "make_optimizer"]
