"""Flax Linen modules of the three SVD networks."""

from .clip import CLIPVisionModelWithProjection
from .unet import UNetSpatioTemporalConditionModel
from .vae import AutoencoderKLTemporalDecoder, DiagonalGaussian

__all__ = ["AutoencoderKLTemporalDecoder", "CLIPVisionModelWithProjection", "DiagonalGaussian",
           "UNetSpatioTemporalConditionModel"]
