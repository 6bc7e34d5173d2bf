"""From a call's arguments to the program's inputs: checks, image preparation, the named inputs and their layout.

:class:`GenerationRequest` is the one definition of what a call may ask for (every keyword of
``pipe(...)``, ``pipe.lower(...)`` and ``pipe.compile(...)``, with its default); :func:`prepare` checks it
against the pipeline, before anything is traced, and turns it into :class:`GenerationInputs` (host arrays, a
pytree with one sharding rule per field) and the :class:`~svd_jax.options.GenerationConfig` (the jit key).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from .. import preprocessing as pre
from ..options import GenerationConfig, check_byte_budget

OUTPUT_TYPES = ("pil", "np", "latent")
VIDEO, REPLICATED = "video", "replicated"  # input layouts on a mesh (svd_jax/sharding.py)


def _input(layout: str):
    return dataclasses.field(metadata={"layout": layout})


@dataclasses.dataclass(frozen=True)
class GenerationInputs:
    """The array inputs of one generation program (a pytree). N images, B videos, F frames, n steps.

    Each field's ``layout`` (dataclass field metadata) says how it is placed on a mesh: ``"video"`` splits
    like the video activations, ``"replicated"`` gives every device all of it.
    """

    clip_images: Any = _input(REPLICATED)  # (N, H0, W0, 3) float32 in [0, 1], the original size
    vae_images: Any = _input(REPLICATED)  # (N, H, W, 3) float32 in [-1, 1], resized to the output size
    image_noise: Any = _input(REPLICATED)  # like vae_images: N(0, 1) noise for the augmentation
    latents: Any = _input(VIDEO)  # (B, F, h, w, C) float32, unit noise times the schedule's init_noise_sigma
    video_src: Any = _input(REPLICATED)  # (B,) int32: the image of each video
    sigmas: Any = _input(REPLICATED)  # (n + 1,) float32, the terminal one included
    timesteps: Any = _input(REPLICATED)  # (n,) float32
    solver_coefs: Any = _input(REPLICATED)  # (n, 1 + K) float32 of a multistep sampler; (n, 0) for Euler
    guidance: Any = _input(REPLICATED)  # (F,) float32: per-frame CFG scale
    time_ids: Any = _input(REPLICATED)  # (3,) float32: [fps - 1, motion_bucket_id, noise_aug_strength]
    noise_aug_strength: Any = _input(REPLICATED)  # () float32

    @classmethod
    def layouts(cls) -> dict:
        """{field name: layout}."""
        return {f.name: f.metadata["layout"] for f in dataclasses.fields(cls)}

    def shardings(self, partitioner) -> GenerationInputs:
        """The ``NamedSharding`` of every field on ``partitioner``'s mesh (dimensions the mesh does not divide
        left whole: jit inputs must split evenly)."""
        specs = {VIDEO: partitioner.video_spec(), REPLICATED: jax.sharding.PartitionSpec()}
        return GenerationInputs(**{name: partitioner.input_sharding(specs[layout], np.shape(getattr(self, name)))
                                   for name, layout in self.layouts().items()})

    def place(self, partitioner) -> GenerationInputs:
        """Host arrays -> global jax.Arrays on the mesh, each device given its slice. Every process passes the
        same inputs."""
        def put(a, sharding):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

        return jax.tree_util.tree_map(put, self, self.shardings(partitioner))

    def abstract(self, partitioner=None) -> GenerationInputs:
        """``jax.ShapeDtypeStruct`` of every field (with its sharding on a mesh), for ``jit(...).lower``."""
        sh = self.shardings(partitioner) if partitioner is not None else None
        return GenerationInputs(**{
            name: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                       sharding=None if sh is None else getattr(sh, name))
            for name, a in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))})

    def signature(self) -> tuple:
        """Shapes and dtypes of the fields: with the config and parameter shapes, what a program depends on."""
        return tuple((tuple(np.shape(a)), str(np.asarray(a).dtype)) for a in jax.tree_util.tree_leaves(self))


jax.tree_util.register_dataclass(GenerationInputs, data_fields=[f.name for f in dataclasses.fields(GenerationInputs)],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
    """Everything a call may ask for besides the image, with the defaults (SVD-XT's).

    height, width: output size, multiples of 8 (576 x 1024 for SVD-XT).
    num_frames: frames per video (default: the UNet config's num_frames).
    num_inference_steps / sigmas: sampler steps, or explicit sigmas (terminal value included).
    min_guidance_scale, max_guidance_scale: per-frame linear CFG scale; CFG off when max <= 1.
    fps, motion_bucket_id, noise_aug_strength: micro-conditioning (the UNet sees fps - 1).
    decode_chunk_size: frames decoded at once within a video (default: all frames of a video).
    num_videos_per_prompt: videos per image (B = N * num_videos_per_prompt).
    seed / rng: an int or a jax PRNG key; it is split into (image-noise key, latent key).
    latents: (B, F, h, w, C) unit-variance noise (scaled by init_noise_sigma inside, as diffusers).
    output_type: "pil", "np" or "latent". progress: show a progress bar over denoising steps.
    callback_on_step_end: ``fn(step, sigma, latents)`` called on the host after every ``callback_steps``-th
      denoising step (and after the last): ``step`` the 0-based index of the step just taken, ``sigma`` (float)
      the noise level the latents are now at, ``latents`` (B', F, h, w, C) float32 numpy (B' >= B: a batch
      padded for a mesh included). Calls come in step order; an exception in ``fn`` fails the generation.
    cache_interval, cache_branch: step caching (DeepCache-style, off by default): every ``cache_interval``-th
      step (from the first) runs the whole UNet and keeps the features entering its up block
      ``levels - cache_branch``; the steps between run only the ``cache_branch`` shallowest down and up blocks on
      them. ``cache_interval=1`` runs every step whole (the exact generation). An approximation: its quality on
      the real weights is not measured here.
    """

    height: int = 576
    width: int = 1024
    num_frames: int | None = None
    num_inference_steps: int = 25
    sigmas: Sequence[float] | None = None
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int | None = None
    num_videos_per_prompt: int = 1
    seed: int | None = None
    rng: Any | None = None
    latents: Any = None
    output_type: str = "pil"
    progress: bool = False
    callback_on_step_end: Any = None
    callback_steps: int = 1
    cache_interval: int | None = None
    cache_branch: int = 1

    @classmethod
    def from_kwargs(cls, where: str, kwargs: dict) -> GenerationRequest:
        """A request from keyword arguments; an unknown name raises TypeError listing the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{where} got unexpected argument(s) {unknown}; its arguments are {names}")
        return cls(**kwargs)


def with_request_signature(fn=None, **defaults):
    """``fn`` (whose ``**kwargs`` are a :class:`GenerationRequest`) shown with the request's fields as its
    keyword arguments (``defaults`` where ``fn`` has its own), for ``help()``, notebooks and IDEs; the call itself
    is unchanged. Use as ``@with_request_signature`` or ``@with_request_signature(output_type="np")``."""
    if fn is None:
        return lambda f: with_request_signature(f, **defaults)
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in own}
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(f.name, f.default),
                                annotation=f.type)
              for f in dataclasses.fields(GenerationRequest) if f.name not in taken]
    fn.__signature__ = sig.replace(parameters=own + fields)
    return fn


def _pos_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")


def check(req: GenerationRequest, num_frames: int, chunk: int, scale: int) -> None:
    """ValueError for a request the pipeline cannot run (``scale``: the VAE's downscale factor)."""
    for name, v in (("height", req.height), ("width", req.width)):
        _pos_int(name, v)
        if v % scale:
            raise ValueError(f"{name} must be a multiple of {scale}; got {v} (e.g. {v // scale * scale or scale})")
    _pos_int("num_frames", num_frames)
    _pos_int("decode_chunk_size", chunk)
    _pos_int("num_videos_per_prompt", req.num_videos_per_prompt)
    if req.sigmas is None:
        _pos_int("num_inference_steps", req.num_inference_steps)
    elif len(req.sigmas) < 2:
        raise ValueError(f"sigmas must hold at least 2 values (the terminal one included); got {list(req.sigmas)}")
    elif not all(math.isfinite(float(s)) and s >= 0 for s in req.sigmas):
        raise ValueError(f"sigmas must be finite and >= 0; got {list(req.sigmas)}")
    for name in ("min_guidance_scale", "max_guidance_scale", "fps", "motion_bucket_id", "noise_aug_strength"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    if req.fps <= 0:
        raise ValueError(f"fps must be > 0 (the UNet is conditioned on fps - 1); got {req.fps}")
    if req.noise_aug_strength < 0:
        raise ValueError(f"noise_aug_strength must be >= 0; got {req.noise_aug_strength}")
    if req.callback_on_step_end is not None and not callable(req.callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be a function fn(step, sigma, latents); got "
                         f"{type(req.callback_on_step_end).__name__}")
    _pos_int("callback_steps", req.callback_steps)
    if req.cache_interval is not None:
        _pos_int("cache_interval", req.cache_interval)
        _pos_int("cache_branch", req.cache_branch)
    if req.callback_on_step_end is not None and jax.process_count() > 1:
        raise ValueError("callback_on_step_end runs on one host; it is not supported with several processes")
    if req.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {req.output_type!r}")
    if req.min_guidance_scale > req.max_guidance_scale:
        what = ("CFG is off (max_guidance_scale <= 1)" if req.max_guidance_scale <= 1 else
                "the guidance decreases from the first frame to the last")
        warnings.warn(f"min_guidance_scale {req.min_guidance_scale} > max_guidance_scale {req.max_guidance_scale}: "
                      f"{what}", stacklevel=4)
    if not 0 <= req.motion_bucket_id <= 255:
        warnings.warn(f"motion_bucket_id={req.motion_bucket_id} is outside the trained range [0, 255]", stacklevel=4)


def prepare_images(image, height: int, width: int):
    """A PIL image, a list of them (same size) or an array (N, H0, W0, 3) in [0, 1] -> (clip_images (N, H0, W0, 3)
    float32 [0, 1] at the original size, vae_images (N, height, width, 3) float32 [-1, 1])."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, PIL.Image.Image) for i in image):
            raise ValueError("image must be a PIL image, a non-empty list of PIL images, or an array (N, H, W, 3)")
        rgb = [pre.to_rgb(i) for i in image]
        if len({i.size for i in rgb}) > 1:
            raise ValueError(f"all images in a list must have the same size; got {[i.size for i in rgb]}")
        clip = np.stack([pre.pil_to_float(i) for i in rgb])
        vae = np.stack([pre.vae_preprocess_pil(i, height, width) for i in rgb])
        return clip, vae
    arr = np.asarray(image, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"an image array must be (N, H, W, 3) in [0, 1]; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("an image array must hold finite values in [0, 1]; it holds NaN or inf")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"an image array must hold values in [0, 1]; got [{arr.min():.3g}, {arr.max():.3g}]")
    if arr.shape[1:3] == (height, width):
        vae = arr * 2 - 1
    else:  # same LANCZOS as the PIL path, on float channels
        vae = np.stack([pre.resize_float_lanczos(a, height, width) for a in arr]) * 2 - 1
    return arr, vae.astype(np.float32)


def padded_batch(b: int, cfg: bool, data_size: int) -> int:
    """The number of videos in the program: the fewest >= b whose UNet batch (x2 with CFG) the mesh's data axis
    divides."""
    per = 2 if cfg else 1
    bp = b
    while (bp * per) % data_size:
        bp += 1
    return bp


def prepare(pipe, image, req: GenerationRequest):
    """Check ``req`` against ``pipe`` and build the program's inputs and static config.

    Returns (GenerationInputs of host arrays, GenerationConfig, videos B, videos in the program B' >= B).
    Everything is checked before anything is traced or computed on a device.
    """
    num_frames = pipe.unet.num_frames if req.num_frames is None else req.num_frames
    chunk = num_frames if req.decode_chunk_size is None else req.decode_chunk_size
    scale = pipe.vae_scale_factor
    check(req, num_frames, chunk, scale)
    levels = len(pipe.unet.block_out_channels)
    if req.cache_interval is not None and req.cache_branch > levels:
        raise ValueError(f"cache_branch must be in 1..{levels} (the UNet's levels); got {req.cache_branch}")
    check_byte_budget("stream_decode_bytes", pipe.stream_decode_bytes, minimum=0)  # 0: always streamed
    clip_images, vae_images = prepare_images(image, req.height, req.width)
    n = clip_images.shape[0]
    b = n * req.num_videos_per_prompt
    cfg = req.max_guidance_scale > 1
    video_src = np.repeat(np.arange(n, dtype=np.int32), req.num_videos_per_prompt)  # each video's image
    h, w = req.height // scale, req.width // scale
    c = pipe.unet.in_channels // 2
    rng = req.rng if req.rng is not None else jax.random.PRNGKey(0 if req.seed is None else req.seed)
    k_img, k_lat = jax.random.split(rng)
    image_noise = jax.random.normal(k_img, vae_images.shape, jnp.float32)
    shape = (b, num_frames, h, w, c)
    latents = req.latents
    if latents is None:
        latents = jax.random.normal(k_lat, shape, jnp.float32)
    elif tuple(np.shape(latents)) != shape:
        raise ValueError(f"latents must have shape {shape} (B, F, h, w, C); got {tuple(np.shape(latents))}")
    schedule = pipe.scheduler.set_timesteps(req.num_inference_steps if req.sigmas is None else None,
                                            sigmas=req.sigmas)
    latents = np.asarray(latents, np.float32) * np.float32(schedule.init_noise_sigma)
    kind = getattr(pipe.scheduler, "kind", "euler")
    n_steps = int(np.shape(schedule.timesteps)[0])
    coefs = (pipe.scheduler.coefficients(schedule.sigmas) if kind == "multistep"
             else np.zeros((n_steps, 0), np.float32))
    part = pipe.partitioner
    bp = padded_batch(b, cfg, 1 if part is None else part.data_size)
    if bp > b:  # videos padded to split evenly over the mesh's data axis (copies of the last); cropped after
        video_src = np.concatenate([video_src, np.full(bp - b, video_src[-1], np.int32)])
        latents = np.concatenate([latents, np.repeat(latents[-1:], bp - b, axis=0)])
    guidance = jnp.linspace(req.min_guidance_scale, req.max_guidance_scale, num_frames, dtype=jnp.float32)
    time_ids = jnp.asarray([req.fps - 1, req.motion_bucket_id, req.noise_aug_strength], jnp.float32)
    model = pipe.options if part is None else part.model_options(pipe.options)
    config = GenerationConfig(
        cfg=cfg, decode_chunk_size=chunk, latent_output=req.output_type == "latent",
        dtype=jnp.dtype(pipe.dtype).name, prediction_type=pipe.scheduler.prediction_type,
        clip_mean=pipe.image_mean, clip_std=pipe.image_std, stream_decode_bytes=pipe.stream_decode_bytes,
        model=model, partitioner=part, sampler=kind,
        callback_steps=req.callback_steps if req.callback_on_step_end is not None and not req.progress else None,
        deep_cache=None if req.cache_interval is None else (req.cache_interval, req.cache_branch))
    inputs = GenerationInputs(
        clip_images=np.asarray(clip_images, np.float32), vae_images=np.asarray(vae_images, np.float32),
        image_noise=np.asarray(image_noise), latents=latents, video_src=video_src,
        sigmas=np.asarray(schedule.sigmas, np.float32), timesteps=np.asarray(schedule.timesteps, np.float32),
        solver_coefs=np.asarray(coefs, np.float32),
        guidance=np.asarray(guidance), time_ids=np.asarray(time_ids),
        noise_aug_strength=np.float32(req.noise_aug_strength))
    return inputs, config, b, bp
