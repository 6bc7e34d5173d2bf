"""The project's configs, one copy each.

``SVD_*``: the published SVD-XT checkpoint (stabilityai/stable-video-diffusion-img2vid-xt), for building the
full-size architectures without downloading anything (compile-only analysis in benchmarks/, tests). ``TINY_*``:
the tiny random checkpoint of :mod:`svd_jax.tiny` (the tests' tiny torch reference models are derived from them).
The scheduler, feature-extractor and model-index files are the same for both.

:func:`abstract_pipeline` builds a :class:`~svd_jax.StableVideoDiffusionPipeline` whose parameters are
``jax.ShapeDtypeStruct`` (no memory), for ``pipe.lower(...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .preprocessing import CLIP_MEAN, CLIP_STD

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
# The hub's scheduler/scheduler_config.json: SVD_SCHEDULER plus diffusers' class name and the keys only diffusers
# reads (the port ignores them).
SVD_SCHEDULER_CONFIG = dict(_class_name="EulerDiscreteScheduler", **SVD_SCHEDULER, clip_sample=False,
                            set_alpha_to_one=False, skip_prk_steps=True, trained_betas=None)
# The hub's feature_extractor/preprocessor_config.json (transformers' CLIPImageProcessor, OpenAI CLIP mean/std).
CLIP_PROCESSOR_CONFIG = dict(
    crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
    do_rescale=True, do_resize=True, image_mean=list(CLIP_MEAN),
    image_processor_type="CLIPImageProcessor", image_std=list(CLIP_STD), resample=3,
    rescale_factor=0.00392156862745098, size={"shortest_edge": 224})
# The hub's model_index.json: which library and class loads each component folder.
MODEL_INDEX = dict(
    _class_name="StableVideoDiffusionPipeline", feature_extractor=["transformers", "CLIPImageProcessor"],
    image_encoder=["transformers", "CLIPVisionModelWithProjection"],
    scheduler=["diffusers", "EulerDiscreteScheduler"], unet=["diffusers", "UNetSpatioTemporalConditionModel"],
    vae=["diffusers", "AutoencoderKLTemporalDecoder"])

# The tiny random checkpoint (svd_jax.tiny), as its config.json files: the SVD-XT structure (cross-attention and
# plain blocks, 4 VAE levels, CLIP with projection) at 32..64 channels.
TINY_UNET = dict(
    _class_name="UNetSpatioTemporalConditionModel", sample_size=8, in_channels=8, out_channels=4,
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    num_attention_heads=[2, 4], cross_attention_dim=32, addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, transformer_layers_per_block=1, num_frames=4)
TINY_VAE = dict(
    _class_name="AutoencoderKLTemporalDecoder", in_channels=3, out_channels=3,
    block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=1,
    latent_channels=4, sample_size=64, scaling_factor=0.18215, force_upcast=True)
TINY_CLIP = dict(
    architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model", hidden_size=32,
    intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
    image_size=224, patch_size=32, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    initializer_factor=1.0, initializer_range=0.02, dropout=0.0)


def abstract_pipeline(dtype=jnp.bfloat16, mesh=None, attention: str = "auto", fsdp: bool = False):
    """A full-size SVD-XT pipeline with abstract parameters (ShapeDtypeStruct in ``dtype``, placed on ``mesh``
    as :meth:`StableVideoDiffusionPipeline.from_pretrained` would); nothing is allocated."""
    from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
    from .pipeline import StableVideoDiffusionPipeline
    from .scheduler import EulerScheduler
    from .sharding import Partitioner

    part: Partitioner | None = Partitioner(mesh, fsdp) if mesh is not None else None
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
