"""svd-jax: Stable Video Diffusion (SVD / SVD-XT image-to-video) in JAX/Flax, equal to diffusers."""

from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from .options import ModelOptions
from .pipeline import StableVideoDiffusionPipeline, StableVideoDiffusionPipelineOutput
from .video import export_to_gif, export_to_video, load_image
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKLTemporalDecoder",
    "CLIPVisionModelWithProjection",
    "CheckpointError",
    "ModelOptions",
    "StableVideoDiffusionPipeline",
    "StableVideoDiffusionPipelineOutput",
    "UNetSpatioTemporalConditionModel",
    "__version__",
    "export_to_gif",
    "export_to_video",
    "load_image",
]
