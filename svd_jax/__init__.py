"""svd-jax: Stable Video Diffusion (SVD / SVD-XT image-to-video) in JAX/Flax, equal to diffusers."""

from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = ["AutoencoderKLTemporalDecoder", "CLIPVisionModelWithProjection", "CheckpointError", "UNetSpatioTemporalConditionModel",
           "__version__"]
