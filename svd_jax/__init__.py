"""svd-jax: Stable Video Diffusion (SVD / SVD-XT image-to-video) in JAX/Flax, equal to diffusers.

The public names load on first use, so that importing a light submodule (the command line's ``--help``) does not
start jax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "AutoencoderKLTemporalDecoder": ".models",
    "CLIPVisionModelWithProjection": ".models",
    "UNetSpatioTemporalConditionModel": ".models",
    "ModelOptions": ".options",
    "StableVideoDiffusionPipeline": ".pipeline",
    "StableVideoDiffusionPipelineOutput": ".pipeline",
    "export_to_gif": ".video",
    "export_to_video": ".video",
    "load_image": ".video",
    "CheckpointError": ".weights",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
