"""Fine-tuning SVD: the EDM v-objective (``loss``); the trainer is still to come."""

from .loss import denoising_loss, edm_preconditioning

__all__ = ["denoising_loss", "edm_preconditioning"]
