"""Configs of the published SVD-XT checkpoint (stabilityai/stable-video-diffusion-img2vid-xt), for building the
full-size architectures without downloading anything: compile-only analysis (benchmarks/), tests.

:func:`abstract_pipeline` builds a :class:`~svd_jax.StableVideoDiffusionPipeline` whose parameters are
``jax.ShapeDtypeStruct`` (no memory), for ``pipe.lower(...)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SVD_XT_UNET: dict = {}  # the module defaults are SVD-XT's UNet (25 frames, 320..1280 channels)
SVD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
               sample_size=768, scaling_factor=0.18215, force_upcast=True)
SVD_CLIP = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                num_attention_heads=16, num_channels=3, image_size=224, patch_size=14, hidden_act="gelu",
                layer_norm_eps=1e-5)
SVD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
                     sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                     steps_offset=1)


def abstract_pipeline(dtype=jnp.bfloat16, mesh=None, attention: str = "auto", fsdp: bool = False):
    """A full-size SVD-XT pipeline with abstract parameters (ShapeDtypeStruct in ``dtype``, placed on ``mesh``
    as :meth:`StableVideoDiffusionPipeline.from_pretrained` would); nothing is allocated."""
    from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
    from .pipeline import StableVideoDiffusionPipeline
    from .scheduler import EulerScheduler
    from .sharding import Partitioner

    part: Optional[Partitioner] = Partitioner(mesh, fsdp) if mesh is not None else None
    mods = (UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=dtype),
            AutoencoderKLTemporalDecoder.from_config(SVD_VAE, dtype=dtype),
            CLIPVisionModelWithProjection.from_config(SVD_CLIP, dtype=dtype))

    def abstract(m):
        tree = m.init_params_abstract()
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=part.param_sharding(s.shape) if part else None),
            tree)

    params = {name: abstract(m) for name, m in zip(("unet", "vae", "image_encoder"), mods)}
    return StableVideoDiffusionPipeline(*mods, EulerScheduler.from_config(SVD_SCHEDULER), params, dtype,
                                        partitioner=part, attention=attention)
