"""The generation's stages as pure functions of (modules, params, arrays, config), usable on their own.

* :func:`image_embeddings`: CLIP embedding of images resized the pipeline's way.
* :func:`image_latents`: VAE posterior mean (unscaled) of noise-augmented images.
* :func:`conditioning`: both, per video, from a generation's inputs.
* :func:`denoiser_input`, :func:`velocity`: the UNet's input for latents at a noise level, and its prediction
  (what a training loss calls, with the same conditioning).
* :func:`denoise`: every sampler step in one ``lax.scan``, with classifier-free guidance.
* :func:`decode`: latents -> frames, chunk by chunk within each video (streamed on one device past a size).
* :func:`generate`: the whole program (what ``StableVideoDiffusionPipeline`` jits); :func:`begin`,
  :func:`denoise_step` and :func:`finish`: the same, as three programs a host loop runs step by step (for
  progress reporting without host callbacks, which would keep programs out of the persistent compile cache).

The models are taken as given and run with ``config.model`` (:func:`with_options`); nothing here reads the
pipeline object.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import preprocessing as pre
from ..models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from ..models.vae import decode_streamed
from ..options import GenerationConfig, ModelOptions
from ..samplers import multistep_update
from ..scheduler import scale_model_input, step
from .inputs import GenerationInputs


class Modules(NamedTuple):
    """The three networks of a pipeline."""

    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    image_encoder: CLIPVisionModelWithProjection


def with_options(module, options: ModelOptions):
    """``module`` running with ``options`` (a copy; the same parameters)."""
    return module if module.options == options else module.clone(options=options)


def _pin(x, config: GenerationConfig):
    """Pin a (B, F, h, w, C) video tensor to the mesh's video layout (no-op without a mesh)."""
    part = config.partitioner
    return x if part is None else part.pin(x, part.video_spec())


def image_embeddings(image_encoder, params, clip_images, mean, std, dtype):
    """clip_images (N, H0, W0, 3) float32 in [0, 1], any size -> CLIP image embeddings (N, D) in ``dtype``:
    anti-aliased resize to the encoder's size (its ``image_size``: 224 for SVD, diffusers' hard-coded size),
    CLIP normalisation (``mean``, ``std``), the encoder."""
    pixels = pre.clip_preprocess(clip_images, mean, std, image_encoder.image_size)
    return image_encoder.apply({"params": params}, pixels.astype(dtype)).image_embeds


def image_latents(vae, params, vae_images, image_noise, noise_aug_strength, dtype):
    """vae_images (N, H, W, 3) in [-1, 1], image_noise like them, noise_aug_strength a scalar -> the VAE
    posterior mean (N, H/8, W/8, C) of ``vae_images + noise_aug_strength * image_noise``, unscaled, in ``dtype``.
    With ``vae.force_upcast`` the VAE encodes in float32."""
    if vae.force_upcast and jnp.dtype(dtype) != jnp.float32:
        vae = vae.clone(dtype=jnp.float32)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    x = vae_images + noise_aug_strength * image_noise
    return vae.apply({"params": params}, x, method="encode").mode().astype(dtype)


def conditioning(modules: Modules, params, inputs: GenerationInputs, config: GenerationConfig):
    """-> (embeddings (B, 1, D), image latents (B, h, w, C)): each video's image's CLIP embedding and latents
    (``inputs.video_src`` picks the image of every video)."""
    dt = jnp.dtype(config.dtype)
    emb = image_embeddings(with_options(modules.image_encoder, config.model), params["image_encoder"],
                           inputs.clip_images, config.clip_mean, config.clip_std, dt)
    emb = jnp.take(emb, inputs.video_src, axis=0)[:, None, :]
    z = image_latents(with_options(modules.vae, config.model), params["vae"], inputs.vae_images,
                      inputs.image_noise, inputs.noise_aug_strength, dt)
    return emb, jnp.take(z, inputs.video_src, axis=0)


def denoiser_input(latents, sigma, image_latents_per_frame, dtype):
    """The UNet's sample: ``concat([latents / sqrt(sigma^2 + 1), image latents], channels)``.

    latents (B, F, h, w, C) float32, sigma a scalar (or broadcastable to latents, e.g. (B, 1, 1, 1, 1) for one
    noise level per clip), image_latents_per_frame (B, F, h, w, C') -> (B, F, h, w, C + C') in ``dtype``."""
    return jnp.concatenate([scale_model_input(latents, sigma).astype(dtype), image_latents_per_frame], axis=-1)


def velocity(unet, params, sample, timestep, embeddings, time_ids):
    """The UNet's prediction in float32: sample (B, F, h, w, Cin), timestep scalar or (B,), embeddings (B, 1, D),
    time_ids (B, 3) -> (B, F, h, w, Cout)."""
    return unet.apply({"params": params}, sample, timestep, embeddings, time_ids).sample.astype(jnp.float32)


class Guidance(NamedTuple):
    """What every denoising step needs besides the latents (made once by :func:`guidance_setup`): with CFG the
    [uncond; cond] halves of each."""

    embeddings: jax.Array  # (B or 2B, 1, D)
    image_latents: jax.Array  # (B or 2B, F, h, w, C'), broadcast over the frames
    time_ids: jax.Array  # (B or 2B, 3)
    scale: jax.Array  # (1, F, 1, 1, 1) float32 per-frame CFG scale


def guidance_setup(latents, embeddings, image_latents_, time_ids, guidance, config: GenerationConfig) -> Guidance:
    """latents (B, F, h, w, C) (for the shape), embeddings (B, 1, D), image_latents_ (B, h, w, C'), time_ids (3,)
    [fps - 1, motion bucket, aug], guidance (F,) -> :class:`Guidance`; negatives are zeros for both
    conditionings."""
    dt = jnp.dtype(config.dtype)
    b, f = latents.shape[:2]
    emb, z_img = embeddings, image_latents_
    ids = jnp.broadcast_to(time_ids.astype(dt), (b, time_ids.shape[0]))
    if config.cfg:  # [uncond; cond]
        emb = jnp.concatenate([jnp.zeros_like(emb), emb])
        z_img = jnp.concatenate([jnp.zeros_like(z_img), z_img])
        ids = jnp.concatenate([ids, ids])
    z_img = _pin(jnp.broadcast_to(z_img[:, None], (z_img.shape[0], f) + z_img.shape[1:]), config)
    return Guidance(emb, z_img, ids, guidance.astype(jnp.float32)[None, :, None, None, None])


def initial_carry(latents, coefs, config: GenerationConfig, deep=None):
    """The denoising loop's carry before the first step: the latents (B, F, h, w, C) float32, plus for a
    multistep sampler (``config.sampler == "multistep"``) the history of denoised predictions (K - 1, B, F, h, w,
    C) zeros, K = coefs.shape[1] - 1 the solver order; with step caching (``config.deep_cache``) the pair
    (that, the cached deep features ``deep``: zeros of :func:`deep_cache_shape`)."""
    lat = _pin(latents.astype(jnp.float32), config)
    inner = lat if config.sampler != "multistep" else (lat, jnp.zeros((coefs.shape[1] - 2,) + lat.shape, jnp.float32))
    return inner if config.deep_cache is None else (inner, deep)


def _unwrap(carry, config: GenerationConfig):
    """(the sampler's carry, the cached deep features or None)."""
    return carry if config.deep_cache is not None else (carry, None)


def carry_latents(carry, config: GenerationConfig):
    """The latents of a denoising carry (:func:`initial_carry`)."""
    inner, _ = _unwrap(carry, config)
    return inner[0] if config.sampler == "multistep" else inner


def _model_inputs(cond: Guidance, lat, sigma, t, config: GenerationConfig):
    """The UNet's (sample, timestep, embeddings, time_ids) for latents at ``sigma``: with CFG both halves, stacked
    on a new leading axis of 2 when they run one after the other."""
    dt = jnp.dtype(config.dtype)
    inp = denoiser_input(jnp.concatenate([lat, lat]) if config.cfg else lat, sigma, cond.image_latents, dt)
    args = (inp, t, cond.embeddings, cond.time_ids)
    if config.cfg and config.sequential_cfg:
        halves = lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:])
        args = (halves(inp), jnp.stack([t, t]), halves(cond.embeddings), halves(cond.time_ids))
    return args


def _run_unet(unet, params, args, config: GenerationConfig, deep=None, full: bool = True):
    """The UNet's prediction (float32, CFG halves still separate) and, with step caching, the deep features:
    a full pass makes them, a cached pass (``full=False``) reuses ``deep``."""
    branch = None if config.deep_cache is None else config.deep_cache[1]

    def one(a, d):
        sample, t, emb, ids = a
        out = unet.apply({"params": params}, sample, t, emb, ids, cache_branch=branch,
                         deep_features=None if full else d)
        return out.sample.astype(jnp.float32), (out.deep if full else d)

    if config.cfg and config.sequential_cfg:
        # The two CFG halves one after the other (a scan of 2): the same maths per sample, about half the
        # UNet's activation memory. Not with a data axis, which splits the halves over devices.
        v, d = jax.lax.map(lambda xs: one(xs[0], xs[1]), (args, deep))
        return v.reshape((-1,) + v.shape[2:]), d
    return one(args, deep)


def deep_cache_shape(unet, params, cond: Guidance, latents, config: GenerationConfig):
    """The ShapeDtypeStruct of the cached deep features of step caching (None without it)."""
    if config.deep_cache is None:
        return None
    lat = jnp.asarray(latents, jnp.float32)
    args = _model_inputs(cond, lat, jnp.float32(1.0), jnp.float32(0.0), config)
    return jax.eval_shape(lambda a: _run_unet(unet, params, a, config)[1], args)


def denoise_step(unet, params, cond: Guidance, carry, i, sigmas, timesteps, coefs, config: GenerationConfig):
    """One sampler step at step index ``i`` (traced): the carry (:func:`initial_carry`) -> the next one.

    sigmas (n + 1,), timesteps (n,), coefs (n, 1 + K) the multistep sampler's coefficients (unused by Euler).
    With step caching (``config.deep_cache`` = (interval, branch)) every interval-th step (from step 0) runs the
    whole UNet and keeps its deep features; the steps between run only the shallow branch on them."""
    inner, deep = _unwrap(carry, config)
    lat = carry_latents(carry, config)
    sigma, sigma_next, t = sigmas[i], sigmas[i + 1], timesteps[i]
    args = _model_inputs(cond, lat, sigma, t, config)
    if config.deep_cache is None or config.deep_cache[0] == 1:
        v, deep = _run_unet(unet, params, args, config, deep, full=True)
    else:
        v, deep = jax.lax.cond(i % config.deep_cache[0] == 0,
                               lambda d: _run_unet(unet, params, args, config, d, full=True),
                               lambda d: _run_unet(unet, params, args, config, d, full=False), deep)
    if config.cfg:
        v_u, v_c = jnp.split(v, 2)
        v = v_u + cond.scale * (v_c - v_u)
    if config.sampler == "multistep":
        x, history = multistep_update(v, lat, inner[1], sigma, coefs[i], config.prediction_type)
        inner = (_pin(x, config), history)
    else:
        inner = _pin(step(v, lat, sigma, sigma_next, config.prediction_type), config)
    return inner if config.deep_cache is None else (inner, deep)


# The host function of the generation's step callbacks: set by the pipeline for the duration of one call (a
# program holds a reference to host_callback only, so one compiled program serves every user function).
_CALLBACK = None


def host_callback(step, sigma, latents) -> None:
    """Called by the compiled program (``io_callback``): forwards to the current callback, the latents as numpy
    (jax hands host callbacks numpy or jax CPU arrays depending on its version)."""
    if _CALLBACK is not None:
        _CALLBACK(int(step), float(sigma), np.asarray(latents))


def set_callback(fn):
    """Make ``fn(step, sigma, latents)`` the function :func:`host_callback` forwards to; returns the previous."""
    global _CALLBACK
    previous, _CALLBACK = _CALLBACK, fn
    return previous


def _maybe_callback(carry, i, sigmas, n, config: GenerationConfig):
    """After step ``i``: hand the latents to the host every ``config.callback_steps`` steps and after the last
    (ordered: the calls keep the steps' order)."""
    k = config.callback_steps
    if k is None:
        return
    from jax.experimental import io_callback

    lat = carry_latents(carry, config)
    due = ((i + 1) % k == 0) | (i == n - 1)
    jax.lax.cond(due, lambda: io_callback(host_callback, None, i, sigmas[i + 1], lat, ordered=True),
                 lambda: None)


def denoise(unet, params, latents, embeddings, image_latents_, time_ids, sigmas, timesteps, guidance,
            config: GenerationConfig, coefs=None):
    """Every sampler step in one ``lax.scan``.

    Args:
      latents: (B, F, h, w, C) initial noisy latents (already scaled by the schedule's init_noise_sigma).
      embeddings: (B, 1, D); image_latents_: (B, h, w, C'); time_ids: (3,) [fps - 1, motion bucket, aug].
      sigmas: (n + 1,); timesteps: (n,); guidance: (F,) per-frame CFG scale (used when ``config.cfg``);
      coefs: (n, 1 + K) a multistep sampler's coefficients (``config.sampler == "multistep"``).
    Returns:
      the final latents (B, F, h, w, C) float32.
    """
    unet = with_options(unet, config.model)
    cond = guidance_setup(latents, embeddings, image_latents_, time_ids, guidance, config)
    n = timesteps.shape[0]

    def body(c, i):
        c = denoise_step(unet, params, cond, c, i, sigmas, timesteps, coefs, config)
        _maybe_callback(c, i, sigmas, n, config)
        return c, None

    deep = deep_cache_shape(unet, params, cond, latents, config)
    deep = None if deep is None else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), deep)
    carry, _ = jax.lax.scan(body, initial_carry(latents, coefs, config, deep), jnp.arange(n))
    return carry_latents(carry, config)


def streams_decode(vae, latent_shape, chunk: int, config: GenerationConfig) -> bool:
    """Whether :func:`decode` decodes chunks of ``chunk`` frames of latents (B, F, h, w, C) streamed: on one
    device, when a chunk's full-resolution activations exceed ``config.stream_decode_bytes``."""
    if config.partitioner is not None or config.stream_decode_bytes is None:
        return False
    s = vae.downscale
    full_res = chunk * latent_shape[2] * s * latent_shape[3] * s * vae.block_out_channels[0]
    return full_res * jnp.dtype(config.dtype).itemsize > config.stream_decode_bytes


def decode(vae, params, latents, config: GenerationConfig):
    """latents (B, F, h, w, C) -> frames (B, F, H, W, 3) float32 in [0, 1], decoding at most
    ``config.decode_chunk_size`` consecutive frames of one video at a time (lax.map), so peak memory is set by the
    chunk, not by B*F. With a mesh whose data axis (size d) divides B, d videos' chunks decode side by side, one
    per device group. Chunks past :func:`streams_decode`'s size are decoded streamed (the same maths)."""
    vae = with_options(vae, config.model)
    b, f = latents.shape[:2]
    chunk = config.decode_chunk_size
    d = config.data_size if b % config.data_size == 0 else 1
    z = (latents / vae.scaling_factor).astype(jnp.dtype(config.dtype))
    streamed = streams_decode(vae, latents.shape, chunk, config)

    def dec(zc):  # (d, c, h, w, C) -> (d, c, H, W, 3): d videos' chunks of c frames
        flat = zc.reshape((-1,) + zc.shape[2:])
        if streamed:
            out = decode_streamed(vae, params, flat, zc.shape[1])
        else:
            out = vae.apply({"params": params}, flat, num_frames=zc.shape[1], method="decode")
        return out.reshape(zc.shape[:2] + out.shape[1:])

    n_full, rest = divmod(f, chunk)
    parts = []
    if n_full:
        parts.append(_decode_chunks(dec, z[:, : n_full * chunk], n_full, chunk, d))
    if rest:
        parts.append(_decode_chunks(dec, z[:, n_full * chunk:], 1, rest, d))
    frames = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _decode_chunks(dec, z, n, c, d):
    """z (B, n*c, h, w, C) -> dec over (B//d * n) map steps of (d, c, h, w, C) -> (B, n*c, H, W, 3).
    Video v = i * (B // d) + j sits in data group i, so each step's d chunks are one per group."""
    b = z.shape[0]
    zs = z.reshape((d, b // d, n, c) + z.shape[2:])
    zs = jnp.moveaxis(zs, 0, 2).reshape((-1, d, c) + z.shape[2:])  # step (j, k): videos i*(B//d)+j, chunk k
    out = jax.lax.map(dec, zs)  # (B//d * n, d, c, H, W, 3)
    out = out.reshape((b // d, n, d, c) + out.shape[3:])
    out = jnp.moveaxis(out, 2, 0)  # (d, B//d, n, c, ...)
    return out.reshape((b, n * c) + out.shape[4:])


def begin(modules: Modules, params, inputs: GenerationInputs, config: GenerationConfig):
    """The stepwise generation's first program: conditioning -> (the initial carry (:func:`initial_carry`),
    Guidance)."""
    emb, z_img = conditioning(modules, params, inputs, config)
    cond = guidance_setup(inputs.latents, emb, z_img, inputs.time_ids, inputs.guidance, config)
    unet = with_options(modules.unet, config.model)
    deep = deep_cache_shape(unet, params["unet"], cond, inputs.latents, config)
    deep = None if deep is None else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), deep)
    return initial_carry(inputs.latents, inputs.solver_coefs, config, deep), cond


def finish(modules: Modules, params, carry, config: GenerationConfig):
    """The stepwise generation's last program: the final carry -> what :func:`generate` returns."""
    latents = carry_latents(carry, config)
    return latents if config.latent_output else decode(modules.vae, params["vae"], latents, config)


def generate(modules: Modules, params, inputs: GenerationInputs, config: GenerationConfig):
    """The whole generation: conditioning, every denoising step, decode.

    params: {"unet", "vae", "image_encoder"} parameter trees; inputs: :class:`GenerationInputs`.
    Returns frames (B, F, H, W, 3) float32 in [0, 1], or the final latents (B, F, h, w, C) when
    ``config.latent_output``.
    """
    emb, z_img = conditioning(modules, params, inputs, config)
    lat = denoise(modules.unet, params["unet"], inputs.latents, emb, z_img, inputs.time_ids, inputs.sigmas,
                  inputs.timesteps, inputs.guidance, config, inputs.solver_coefs)
    if config.latent_output:
        return lat
    return decode(modules.vae, params["vae"], lat, config)
