"""The training objective of SVD: v-prediction with EDM preconditioning (sigma_data = 1).

For clean latents x0, noise n and a per-clip noise level sigma: x = x0 + sigma n; the UNet sees
c_in x (with the image latents concatenated on the channels) at timestep c_noise = 0.25 ln sigma and predicts v;
the denoised estimate is D = c_skip x + c_out v, with c_in = 1 / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1),
c_out = -sigma / sqrt(sigma^2 + 1); the loss is the mean over all elements of w (D - x0)^2, w = (sigma^2 + 1) /
sigma^2. The UNet input and call are the generation's own (svd_jax/pipeline/stages.py ``denoiser_input`` and
``velocity``), so a fine-tuned UNet is trained on exactly what it sees when sampling.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..pipeline.stages import denoiser_input, velocity


def edm_preconditioning(sigma):
    """sigma (B,) -> (c_skip, c_out, c_noise, weight), each (B,) float32, for sigma_data = 1."""
    s = jnp.asarray(sigma, jnp.float32)
    s2 = jnp.square(s)
    return 1.0 / (s2 + 1.0), -s / jnp.sqrt(s2 + 1.0), 0.25 * jnp.log(s), (s2 + 1.0) / s2


def denoising_loss(unet, unet_params, x0, image_latents, image_embeds, added_time_ids, sigma, noise):
    """The EDM v-objective of one batch of clips: a scalar (float32), differentiable in ``unet_params``.

    Args:
      unet: the Flax UNetSpatioTemporalConditionModel (``UNetSpatioTemporalConditionModel.from_pretrained``).
      unet_params: its parameters.
      x0: (B, F, h, w, C) clean latents (VAE posterior mode of every frame times the VAE's scaling_factor).
      image_latents: (B, h, w, C') conditioning latents (VAE posterior mode of the noise-augmented first frame,
        unscaled), broadcast over the frames; zeros where they are dropped.
      image_embeds: (B, 1, D) CLIP embedding of the first frame; zeros where dropped.
      added_time_ids: (B, 3) [fps - 1, motion_bucket_id, noise_aug_strength].
      sigma: (B,) noise level of each clip (> 0).
      noise: like x0, N(0, 1).
    """
    if x0.ndim != 5 or noise.shape != x0.shape:
        raise ValueError(f"x0 must be (B, F, h, w, C) and noise like it; got {x0.shape} and {noise.shape}")
    b, f = x0.shape[:2]
    if image_latents.shape[0] != b or image_latents.shape[1:3] != x0.shape[2:4]:
        raise ValueError(f"image_latents must be ({b}, {x0.shape[2]}, {x0.shape[3]}, C'); got {image_latents.shape}")
    if jnp.shape(sigma) != (b,):
        raise ValueError(f"sigma must be ({b},), one noise level per clip; got {jnp.shape(sigma)}")
    dtype = unet.dtype
    c_skip, c_out, c_noise, weight = edm_preconditioning(sigma)
    per_clip = lambda c: c[:, None, None, None, None]
    x0 = x0.astype(jnp.float32)
    x = x0 + per_clip(jnp.asarray(sigma, jnp.float32)) * noise.astype(jnp.float32)
    z = jnp.broadcast_to(image_latents[:, None].astype(dtype), (b, f) + image_latents.shape[1:])
    sample = denoiser_input(x, per_clip(jnp.asarray(sigma, jnp.float32)), z, dtype)
    v = velocity(unet, unet_params, sample, c_noise, image_embeds.astype(dtype), added_time_ids.astype(dtype))
    denoised = per_clip(c_skip) * x + per_clip(c_out) * v
    return jnp.mean(per_clip(weight) * jnp.square(denoised - x0))
